//! The writer thread.
