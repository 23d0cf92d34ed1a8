//! Messages between peers on `kappakv-peer/1` connections.

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, StateRoot};
use crate::limits::{MAX_ENTRY_BYTES, MAX_FRAME_BYTES, MAX_RECORD_BYTES};
use crate::response::Version;

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
    /// Asks for a snapshot of the receiver's key/value state. Sent as the first message of a
    /// bidirectional stream of a peer connection, by a new node with an empty log.
    SnapshotRequest,
    /// Starts a snapshot: the state is that of the sender's log at `version_vector`, where
    /// every author's chain ends at a signed entry.
    SnapshotStart {
        /// The version vector of the log the state is derived from.
        version_vector: Vec<(NodeId, u64)>,
        /// The root of the state's digest.
        state_root: StateRoot,
        /// Keys that follow.
        keys: u64,
        /// The version of the state digest's definition the root is of: a receiver with
        /// another cannot check the rows against it, and replays instead.
        digest_version: u32,
    },
    /// Keys of a snapshot in key order, each with every current version, tombstones
    /// included, ascending by id.
    SnapshotRows {
        /// The keys and their versions.
        rows: Vec<(serde_bytes::ByteBuf, Vec<Version>)>,
    },
    /// Ends a snapshot: every key was sent.
    SnapshotEnd,
}

/// Most entries one `Entries` message carries.
pub const MAX_ENTRIES_PER_MESSAGE: usize = 2048;
/// What a record payload adds to an `Entries` message besides its bytes: its MessagePack `bin`
/// header, at most.
const PAYLOAD_HEADER_MAX: usize = 5;

/// Packs record payloads, in order, into `Entries` messages that each fit a frame: at most
/// [`MAX_ENTRIES_PER_MESSAGE`] payloads and [`MAX_ENTRY_BYTES`] of payloads and their headers,
/// or one payload alone.
pub fn entries_messages(payloads: impl IntoIterator<Item = Vec<u8>>) -> Vec<PeerMessage> {
    let mut messages = Vec::new();
    let mut batch: Vec<serde_bytes::ByteBuf> = Vec::new();
    let mut bytes = 0usize;
    for p in payloads {
        let cost = p.len() + PAYLOAD_HEADER_MAX;
        if !batch.is_empty()
            && (bytes + cost > MAX_ENTRY_BYTES || batch.len() == MAX_ENTRIES_PER_MESSAGE)
        {
            messages.push(PeerMessage::Entries {
                payloads: std::mem::take(&mut batch),
            });
            bytes = 0;
        }
        bytes += cost;
        batch.push(serde_bytes::ByteBuf::from(p));
    }
    if !batch.is_empty() {
        messages.push(PeerMessage::Entries { payloads: batch });
    }
    messages
}

/// The largest `Entries` message fits a frame: payloads and headers up to [`MAX_ENTRY_BYTES`]
/// plus the message's own few bytes, or one record alone.
const _: () = assert!(MAX_ENTRY_BYTES + 64 <= MAX_FRAME_BYTES);
const _: () = assert!(MAX_RECORD_BYTES + PAYLOAD_HEADER_MAX + 64 <= MAX_FRAME_BYTES);

impl crate::frame::MessageKinds for PeerMessage {
    const KINDS: &'static [&'static str] = &[
        "Hello",
        "Entries",
        "Synced",
        "Taken",
        "SnapshotRequest",
        "SnapshotStart",
        "SnapshotRows",
        "SnapshotEnd",
    ];
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
            PeerMessage::SnapshotRequest,
            PeerMessage::SnapshotStart {
                version_vector: vec![],
                state_root: StateRoot([0; 32]),
                keys: 0,
                digest_version: 1,
            },
            PeerMessage::SnapshotRows { rows: vec![] },
            PeerMessage::SnapshotEnd,
        ] {
            // Adding a kind fails to compile here until it is listed.
            match &m {
                PeerMessage::Hello { .. }
                | PeerMessage::Entries { .. }
                | PeerMessage::Synced
                | PeerMessage::Taken { .. }
                | PeerMessage::SnapshotRequest
                | PeerMessage::SnapshotStart { .. }
                | PeerMessage::SnapshotRows { .. }
                | PeerMessage::SnapshotEnd => {}
            }
            let frame = encode_frame(&m);
            let kind = message_kind(&frame[FRAME_HEADER_LEN..]).expect("a tagged message");
            assert!(PeerMessage::KINDS.contains(&kind), "{kind} is not listed");
        }
    }

    #[test]
    fn packed_entries_always_fit_a_frame() {
        use crate::frame::frame_len;
        // Many small payloads: the entry cap and the per-payload headers decide.
        let small = (0..10_000).map(|i| vec![i as u8; 117]);
        // Payloads of all sizes, one as large as a record gets.
        let mixed = (0..40).map(|i| vec![7u8; (i * 104_729) % (MAX_RECORD_BYTES + 1)]);
        for (payloads, count) in [
            (small.collect::<Vec<_>>(), 10_000),
            (mixed.collect::<Vec<_>>(), 40),
        ] {
            let messages = entries_messages(payloads);
            let mut seen = 0;
            for m in &messages {
                let frame = encode_frame(m);
                let header: [u8; FRAME_HEADER_LEN] = frame[..FRAME_HEADER_LEN].try_into().unwrap();
                frame_len(header, MAX_FRAME_BYTES).expect("the message fits a frame");
                let PeerMessage::Entries { payloads } = m else {
                    panic!("only entries")
                };
                assert!(payloads.len() <= MAX_ENTRIES_PER_MESSAGE);
                seen += payloads.len();
            }
            assert_eq!(seen, count);
        }
    }
}
