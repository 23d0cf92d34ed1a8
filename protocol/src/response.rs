//! Responses, and the wire error codes kept apart from the Rust error types.

use serde::{Deserialize, Serialize};

use crate::entry::Timestamp;
use crate::ids::{EntryId, NodeId, StateRoot};
use crate::index::IndexStatus;
use crate::request::Lsn;

/// One version of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The entry that wrote it.
    pub id: EntryId,
    /// Who wrote it.
    pub author: NodeId,
    /// When, by the author's clock.
    pub timestamp: Timestamp,
    /// The value, or `None` for a delete (a tombstone).
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

/// A key with its current versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersions {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Current values, tombstones left out, ordered by (timestamp, id).
    pub values: Vec<Version>,
    /// Ids of every current version, tombstones included, ascending: pass it to a write to
    /// supersede exactly what was read.
    pub context: Vec<EntryId>,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The LSN of the entry in the node's log.
    pub lsn: Lsn,
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The version written.
    pub version: Version,
    /// The versions it supersedes.
    pub supersedes: Vec<EntryId>,
}

/// A peer as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer's id.
    pub node_id: NodeId,
    /// Where it is dialled, if known.
    pub addr: Option<String>,
    /// Whether a session is up.
    pub connected: bool,
    /// Since when (Unix milliseconds) it is connected or disconnected.
    pub since_ms: u64,
    /// Entries sent to it.
    pub sent: u64,
    /// Entries received from it.
    pub received: u64,
    /// Entries it lacks that this node has, as far as this node knows.
    pub they_lack: u64,
    /// Entries this node lacks that it has, as far as this node knows.
    pub we_lack: u64,
    /// How it came to be a peer.
    #[serde(default)]
    pub origin: PeerOrigin,
}

/// How a peer came to be on a node's peer list.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerOrigin {
    /// Given by `--peer`, `KAPPAKV_PEERS` or the config file.
    Configured,
    /// Added at run time (`kappactl peer add`).
    #[default]
    Added,
    /// Joined with an invite, either way (`serve --join`, `kappactl peer join`, or the node
    /// that made the invite).
    Joined,
    /// Found on the local network (`discovery = "local"`), sharing this node's swarm secret;
    /// dropped when it stays gone.
    Discovered,
}

impl PeerOrigin {
    /// Its name in lower case, as `peer list` shows it and the peers file keeps it.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerOrigin::Configured => "configured",
            PeerOrigin::Added => "added",
            PeerOrigin::Joined => "joined",
            PeerOrigin::Discovered => "discovered",
        }
    }
}

impl std::str::FromStr for PeerOrigin {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        [
            PeerOrigin::Configured,
            PeerOrigin::Added,
            PeerOrigin::Joined,
            PeerOrigin::Discovered,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or(())
    }
}

/// The node's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node_id: Option<NodeId>,
    /// The server's version.
    pub version: String,
    /// The LSN of the last record in the log.
    pub log_lsn: Lsn,
    /// The LSN the key/value view has applied.
    pub indexed_lsn: Lsn,
    /// Author → highest seq held.
    pub version_vector: Vec<(NodeId, u64)>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Whether the node takes writes (false after a storage failure).
    pub writable: bool,
    /// Equivocations detected.
    pub equivocations: u64,
    /// The declared secondary indexes.
    #[serde(default)]
    pub indexes: Vec<IndexStatus>,
    /// The root of the key/value view's state digest at `indexed_lsn`: equal on two nodes
    /// whose views hold the same entries.
    #[serde(default)]
    pub state_root: Option<StateRoot>,
    /// Where a node that started from a peer's snapshot stands; `None` for a node that
    /// replayed its log from the start.
    #[serde(default)]
    pub bootstrap: Option<BootstrapStatus>,
}

/// A node that started from a trusted peer's snapshot of its key/value state, and how far its
/// own replay of the log behind the snapshot has come.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapStatus {
    /// The peer that sent the snapshot.
    pub peer: NodeId,
    /// The version vector the snapshot is the state at.
    pub version_vector: Vec<(NodeId, u64)>,
    /// The snapshot's state root, as the peer sent it and this node recomputed it.
    pub state_root: StateRoot,
    /// Where reads come from: `true` while they are answered from the snapshot, `false` once
    /// the node's own views have replayed the log up to the snapshot.
    pub serving_snapshot: bool,
    /// The node's own replay of the log up to the snapshot's version vector ended with the
    /// snapshot's state root. `false` until then.
    pub verified: bool,
    /// The replay ended with another state root: the peer's snapshot differed from its log,
    /// so its state was dropped and the node serves what its own log proves.
    pub refused: bool,
}

/// What went wrong, as a client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is not valid (bad key, bad context, bad range).
    BadRequest,
    /// The bytes are not a request this node understands.
    Malformed,
    /// A request type this node does not know.
    UnknownRequest,
    /// Over a size limit.
    TooLarge,
    /// No valid token was presented.
    Unauthorized,
    /// The token does not allow this request.
    Forbidden,
    /// The node is at capacity; retry later.
    Busy,
    /// The request did not finish in time; retry may help.
    Timeout,
    /// The node cannot take writes now (storage failure or full disk).
    Unavailable,
    /// A watcher fell too far behind and was ended.
    SlowConsumer,
    /// The node is shutting down.
    ShuttingDown,
    /// A bug or an unexpected failure on the node.
    Internal,
    /// The secondary index asked for is still being built from the log; the message says how
    /// far it has come. Retry later, or ask the node to wait.
    IndexBuilding,
    /// A conditional write found other current versions than it named: nothing was written.
    /// Read the key again and decide.
    Conflict,
}

impl ErrorCode {
    /// Every code.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::Malformed,
        ErrorCode::UnknownRequest,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::Busy,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::SlowConsumer,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::IndexBuilding,
        ErrorCode::Conflict,
    ];

    /// Whether sending the same request again later can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Busy
                | ErrorCode::Timeout
                | ErrorCode::Unavailable
                | ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
                | ErrorCode::IndexBuilding
        )
    }
}

/// A response frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// The connection is authenticated.
    Hello {
        /// The node.
        node_id: NodeId,
        /// Whether the token only allows reads.
        read_only: bool,
    },
    /// A write is durable in the log.
    Written {
        /// Its LSN; send it as `min_lsn` to read it back.
        lsn: Lsn,
        /// The id of the new entry (the version of each key it wrote).
        id: EntryId,
    },
    /// A key's current versions (get, and each key of a scan).
    Versions(KeyVersions),
    /// The end of a scan.
    ScanEnd {
        /// The last key sent, if the limit cut the scan short: pass it as `start_after`.
        resume_after: Option<serde_bytes::ByteBuf>,
    },
    /// The end of a query page.
    QueryEnd {
        /// Where the next page starts, if the limit cut the query short: pass it as
        /// `start_after`. Opaque to clients.
        resume_after: Option<serde_bytes::ByteBuf>,
    },
    /// A key's history, newest first.
    History {
        /// The versions.
        versions: Vec<Version>,
    },
    /// A change seen by a watch.
    Change(Change),
    /// A watch is alive; the log is at `log_lsn`.
    Heartbeat {
        /// The node's log LSN.
        log_lsn: Lsn,
    },
    /// The node's state.
    Status(Box<Status>),
    /// A `Sync` request was taken: peer messages follow on the stream.
    SyncStarted,
    /// Done, nothing to return.
    Ok,
    /// One key of a `Near` query, with its distance from the query's point: its current
    /// versions and the great-circle distance of its nearest point, in millimetres.
    Nearby {
        /// The key and its current versions.
        versions: KeyVersions,
        /// Millimetres.
        distance_mm: u64,
    },
    /// An invite (`PeerInvite`), to give to the node that should join.
    Invite {
        /// `kappakv-invite://NODEID@ADDR[,ADDR…]/SECRET`.
        invite: String,
    },
    /// A `Join` was taken: the joining node is on this node's peer list.
    Joined {
        /// This node.
        node_id: NodeId,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// One line saying what went wrong and what to do.
        message: String,
    },
}

impl crate::frame::MessageKinds for Response {
    const KINDS: &'static [&'static str] = &[
        "Hello",
        "Written",
        "Versions",
        "ScanEnd",
        "QueryEnd",
        "History",
        "Change",
        "Heartbeat",
        "Status",
        "SyncStarted",
        "Ok",
        "Nearby",
        "Invite",
        "Joined",
        "Error",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FRAME_HEADER_LEN, MessageKinds, encode_frame, message_kind};

    #[test]
    fn peer_origins_read_back_what_they_print() {
        for origin in [
            PeerOrigin::Configured,
            PeerOrigin::Added,
            PeerOrigin::Joined,
            PeerOrigin::Discovered,
        ] {
            assert_eq!(origin.as_str().parse(), Ok(origin));
        }
    }

    #[test]
    fn every_error_code_is_in_all() {
        for code in ErrorCode::ALL {
            // Adding a code fails to compile here until it is listed.
            match code {
                ErrorCode::BadRequest
                | ErrorCode::Malformed
                | ErrorCode::UnknownRequest
                | ErrorCode::TooLarge
                | ErrorCode::Unauthorized
                | ErrorCode::Forbidden
                | ErrorCode::Busy
                | ErrorCode::Timeout
                | ErrorCode::Unavailable
                | ErrorCode::SlowConsumer
                | ErrorCode::ShuttingDown
                | ErrorCode::Internal
                | ErrorCode::IndexBuilding
                | ErrorCode::Conflict => {}
            }
        }
        let distinct: std::collections::BTreeSet<String> =
            ErrorCode::ALL.iter().map(|c| format!("{c:?}")).collect();
        assert_eq!(distinct.len(), 14, "each code once");
    }

    #[test]
    fn every_response_kind_is_listed() {
        let version = Version {
            id: EntryId([1; 32]),
            author: NodeId([2; 32]),
            timestamp: Timestamp(3),
            value: None,
        };
        let responses = [
            Response::Hello {
                node_id: NodeId([1; 32]),
                read_only: false,
            },
            Response::Written {
                lsn: 1,
                id: EntryId([1; 32]),
            },
            Response::Versions(KeyVersions {
                key: vec![],
                values: vec![],
                context: vec![],
            }),
            Response::ScanEnd { resume_after: None },
            Response::QueryEnd { resume_after: None },
            Response::History { versions: vec![] },
            Response::Change(Change {
                lsn: 1,
                key: vec![],
                version,
                supersedes: vec![],
            }),
            Response::Heartbeat { log_lsn: 1 },
            Response::Status(Box::default()),
            Response::SyncStarted,
            Response::Ok,
            Response::Nearby {
                versions: KeyVersions {
                    key: b"k".to_vec(),
                    values: vec![],
                    context: vec![],
                },
                distance_mm: 5,
            },
            Response::Invite {
                invite: String::new(),
            },
            Response::Joined {
                node_id: NodeId([1; 32]),
            },
            Response::Error {
                code: ErrorCode::Busy,
                message: String::new(),
            },
        ];
        for r in &responses {
            match r {
                Response::Hello { .. }
                | Response::Written { .. }
                | Response::Versions(_)
                | Response::ScanEnd { .. }
                | Response::QueryEnd { .. }
                | Response::History { .. }
                | Response::Change(_)
                | Response::Heartbeat { .. }
                | Response::Status(_)
                | Response::SyncStarted
                | Response::Ok
                | Response::Nearby { .. }
                | Response::Invite { .. }
                | Response::Joined { .. }
                | Response::Error { .. } => {}
            }
            let frame = encode_frame(r);
            let kind = message_kind(&frame[FRAME_HEADER_LEN..]).expect("a tagged message");
            assert!(Response::KINDS.contains(&kind), "{kind} is not listed");
        }
        assert_eq!(responses.len(), Response::KINDS.len());
    }
}
