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

impl crate::frame::MessageKinds for PeerMessage {
    const KINDS: &'static [&'static str] = &["Hello", "Entries"];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FRAME_HEADER_LEN, MessageKinds, encode_frame, message_kind};

    #[test]
    fn every_kind_is_listed() {
        for m in [
            PeerMessage::Hello {
                version_vector: vec![],
            },
            PeerMessage::Entries { payloads: vec![] },
        ] {
            // Adding a kind fails to compile here until it is listed.
            match &m {
                PeerMessage::Hello { .. } | PeerMessage::Entries { .. } => {}
            }
            let frame = encode_frame(&m);
            let kind = message_kind(&frame[FRAME_HEADER_LEN..]).expect("a tagged message");
            assert!(PeerMessage::KINDS.contains(&kind), "{kind} is not listed");
        }
    }
}
