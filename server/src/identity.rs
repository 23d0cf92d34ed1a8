//! The node identity.
