//! The node: the threads that own the log and the views.

pub mod writer;
