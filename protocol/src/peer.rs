//! Messages between peers on `kappakv-peer/1` connections.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// A peer message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PeerMessage {
    /// Opens a sync: what the sender holds, author → highest seq.
    Hello {
        /// The sender's version vector.
        version_vector: Vec<(NodeId, u64)>,
    },
    /// Entries in the sender's log order, as record payloads (see [`crate::SignedEntry`]).
    Entries {
        /// The payloads.
        payloads: Vec<serde_bytes::ByteBuf>,
    },
}
