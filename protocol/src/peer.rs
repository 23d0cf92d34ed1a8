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
    /// The sender has sent every entry it held when the session began that the receiver
    /// lacked. Sent on sessions that end once synced (`Request::Sync` without `live`): a
    /// receiver that has taken in everything before it holds what the sender had.
    Synced,
    /// What the node took in from the other side of a session through a client stream
    /// (`Request::Sync`), sent before the node ends a session that is not live.
    Taken {
        /// Entries appended to the node's log.
        appended: u64,
        /// Entries the node already had.
        present: u64,
        /// Entries refused (bad signature or link, equivocation, gap, not an allowed writer).
        refused: u64,
    },
}

impl crate::frame::MessageKinds for PeerMessage {
    const KINDS: &'static [&'static str] = &["Hello", "Entries", "Synced", "Taken"];
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
            PeerMessage::Synced,
            PeerMessage::Taken {
                appended: 0,
                present: 0,
                refused: 0,
            },
        ] {
            // Adding a kind fails to compile here until it is listed.
            match &m {
                PeerMessage::Hello { .. }
                | PeerMessage::Entries { .. }
                | PeerMessage::Synced
                | PeerMessage::Taken { .. } => {}
            }
            let frame = encode_frame(&m);
            let kind = message_kind(&frame[FRAME_HEADER_LEN..]).expect("a tagged message");
            assert!(PeerMessage::KINDS.contains(&kind), "{kind} is not listed");
        }
    }
}
