//! Client requests. One request per bidirectional stream; the first stream of a connection
//! carries [`Request::Hello`] with the client's token.

use serde::{Deserialize, Serialize};

use crate::ids::{EntryId, InviteSecret, NodeId, RequestId, Signature};
use crate::index::IndexQuery;

/// A log sequence number: the 1-based position of a record in a node's log. `0` means "none".
pub type Lsn = u64;

/// One change in a write request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteOp {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The new value, or `None` to delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The versions to supersede: a context from a read. `None` supersedes every version current
    /// on the node when the write is ordered into its log.
    pub supersedes: Option<Vec<EntryId>>,
}

/// Which keys a scan covers. Bounds combine: a key must match all that are given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Keys starting with these bytes.
    #[serde(with = "serde_bytes")]
    pub prefix: Option<Vec<u8>>,
    /// Keys at or after this one.
    #[serde(with = "serde_bytes")]
    pub start: Option<Vec<u8>>,
    /// Keys before this one.
    #[serde(with = "serde_bytes")]
    pub end: Option<Vec<u8>>,
    /// Keys strictly after this one: the resume key of a previous page.
    #[serde(with = "serde_bytes")]
    pub start_after: Option<Vec<u8>>,
}

impl KeyRange {
    /// Whether `key` lies in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.prefix.as_deref().is_none_or(|p| key.starts_with(p))
            && self.start.as_deref().is_none_or(|s| key >= s)
            && self.end.as_deref().is_none_or(|e| key < e)
            && self.start_after.as_deref().is_none_or(|a| key > a)
    }
}

/// A request, the first frame on a client stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Authenticates the connection. Answered with [`crate::response::Response::Hello`].
    Hello {
        /// The token from the ticket.
        token: String,
    },
    /// Writes one or more ops atomically, as one entry. Answered with `Written`.
    Write {
        /// The ops, at most one per key.
        ops: Vec<WriteOp>,
        /// Makes a repeat of the request safe: a node that has written a request with this id
        /// (within its memory of recent writes) answers with that write instead of writing again.
        #[serde(default)]
        request_id: Option<RequestId>,
    },
    /// Writes ops like `Write`, only if each op's `supersedes` names exactly the current
    /// versions of its key on this node (an empty one: only if the key has no value); otherwise
    /// nothing is written and the answer is `Error` with `Conflict`. Every op must name its
    /// context. Answered with `Written`.
    WriteIf {
        /// The ops, at most one per key, each with `supersedes`.
        ops: Vec<WriteOp>,
        /// As for `Write`.
        #[serde(default)]
        request_id: Option<RequestId>,
    },
    /// Reads the current versions of a key. Answered with `Versions`.
    Get {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// Wait until the node has indexed at least this LSN.
        min_lsn: Lsn,
    },
    /// Lists keys with their current versions, in key order. Answered with a stream of
    /// `Versions` frames, then `ScanEnd`.
    Scan {
        /// Which keys.
        range: KeyRange,
        /// At most this many keys.
        limit: u32,
        /// Wait until the node has indexed at least this LSN.
        min_lsn: Lsn,
    },
    /// Every version of a key ever written, newest first. Answered with `History`.
    History {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// At most this many versions.
        limit: u32,
        /// Wait until the node has indexed at least this LSN.
        min_lsn: Lsn,
    },
    /// Streams changes to keys with a prefix: those after `from_lsn` from the log, then live ones.
    /// Answered with `Change` and `Heartbeat` frames until the client closes the stream.
    Watch {
        /// Only keys with this prefix.
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        /// Replay changes after this LSN; `None` starts with live changes.
        from_lsn: Option<Lsn>,
    },
    /// The node's state. Answered with `Status`.
    Status,
    /// Adds a peer at run time. Answered with `Ok`.
    PeerAdd {
        /// The peer's id.
        node_id: NodeId,
        /// Where it listens, `HOST:PORT`.
        addr: String,
    },
    /// Removes a peer. Answered with `Ok`.
    PeerRemove {
        /// The peer's id.
        node_id: NodeId,
    },
    /// Lists peers. Answered with `Status` (its peer list).
    PeerList,
    /// Makes an invite: a secret that makes its holder this node's peer once, within
    /// `expires_secs`. Answered with `Invite`.
    PeerInvite {
        /// Its lifetime, in seconds.
        expires_secs: u64,
    },
    /// Joins this node to the one that made `invite`: this node asks it with `Join`, and each
    /// adds the other to its peer list. Answered with `Ok` once both have.
    PeerJoin {
        /// The invite, as `PeerInvite` made it.
        invite: String,
    },
    /// A node shows an invite's secret to the node that made it, to become its peer; allowed
    /// before `Hello`, since the secret is the credential. Answered with `Joined`, or `Error`
    /// with `Unauthorized` for a used, expired or unknown secret or a bad proof.
    Join {
        /// The joining node.
        node_id: NodeId,
        /// Where it can be dialled, `HOST:PORT`, in order of preference.
        addrs: Vec<String>,
        /// The invite's secret.
        secret: InviteSecret,
        /// The joining node's signature of `Invite::proof(inviter, node_id, secret)`: it holds
        /// the key of `node_id`.
        proof: Signature,
    },
    /// Reads a declared secondary index: the keys whose current values match `query`, each
    /// with its current versions, in index order. Answered with a stream of `Versions` frames,
    /// then `QueryEnd`; or `Error` with `IndexBuilding` while the index is being built.
    Query {
        /// The index's declared name.
        index: String,
        /// Which entries.
        query: IndexQuery,
        /// At most this many entries.
        limit: u32,
        /// Resume after this cursor: the `resume_after` of a previous page.
        #[serde(with = "serde_bytes")]
        start_after: Option<Vec<u8>>,
        /// Wait until the node has indexed at least this LSN.
        min_lsn: Lsn,
        /// While the index is being built, wait up to this many milliseconds for it instead of
        /// answering `IndexBuilding` at once.
        wait_ms: u64,
    },
    /// Runs one peer session on this stream, for a peer the client relays (over a pipe, ssh,
    /// a serial line) or for export files the client hands in. Answered with `SyncStarted` (or
    /// `Error`); from then on the stream carries [`crate::peer::PeerMessage`] frames both ways,
    /// as a `kappakv-peer/1` connection does, each side starting with its `Hello`.
    Sync {
        /// The node sends the entries the other side lacks.
        send: bool,
        /// The node takes in the entries it is sent (a read-write token only).
        receive: bool,
        /// The session goes on with new entries; otherwise it ends once each side has sent
        /// `Synced` and the node has taken in everything before the other side's.
        live: bool,
    },
    /// Turns this stream into a pipeline: answered with `Ok`, after which the stream carries
    /// many requests at once, each frame `[id, request]` (see
    /// [`crate::frame::encode_tagged_frame`]), each answered by one `[id, response]` frame as
    /// soon as it is done, in any order. Only requests answered with one frame may be
    /// pipelined ([`Request::is_pipelinable`]); at most
    /// [`crate::limits::MAX_PIPELINED_REQUESTS`] are in flight on one pipeline.
    Pipeline,
}

impl crate::frame::MessageKinds for Request {
    const KINDS: &'static [&'static str] = &[
        "Hello",
        "Write",
        "WriteIf",
        "Get",
        "Scan",
        "History",
        "Watch",
        "Status",
        "PeerAdd",
        "PeerRemove",
        "PeerList",
        "PeerInvite",
        "PeerJoin",
        "Join",
        "Query",
        "Sync",
        "Pipeline",
    ];
}

impl Request {
    /// Whether this request changes the node.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Write { .. }
                | Request::WriteIf { .. }
                | Request::PeerAdd { .. }
                | Request::PeerInvite { .. }
                | Request::PeerJoin { .. }
                | Request::PeerRemove { .. }
                | Request::Sync { receive: true, .. }
        )
    }

    /// Whether this request may go on a pipeline: it is answered with exactly one frame and
    /// needs nothing of the stream it came on.
    pub fn is_pipelinable(&self) -> bool {
        matches!(
            self,
            Request::Write { .. }
                | Request::WriteIf { .. }
                | Request::Get { .. }
                | Request::History { .. }
                | Request::Status
                | Request::PeerAdd { .. }
                | Request::PeerRemove { .. }
                | Request::PeerList
                | Request::PeerInvite { .. }
                | Request::PeerJoin { .. }
        )
    }

    /// A short name, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Write { .. } => "write",
            Request::WriteIf { .. } => "write_if",
            Request::Get { .. } => "get",
            Request::Scan { .. } => "scan",
            Request::History { .. } => "history",
            Request::Watch { .. } => "watch",
            Request::Status => "status",
            Request::PeerAdd { .. } => "peer_add",
            Request::PeerRemove { .. } => "peer_remove",
            Request::PeerList => "peer_list",
            Request::PeerInvite { .. } => "peer_invite",
            Request::PeerJoin { .. } => "peer_join",
            Request::Join { .. } => "join",
            Request::Query { .. } => "query",
            Request::Sync { .. } => "sync",
            Request::Pipeline => "pipeline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Decoded, FRAME_HEADER_LEN, MessageKinds, decode_message, encode_frame};

    #[test]
    fn every_kind_is_listed_and_an_unknown_one_is_told_apart() {
        let requests = [
            Request::Hello { token: "t".into() },
            Request::Write {
                ops: vec![],
                request_id: None,
            },
            Request::WriteIf {
                ops: vec![],
                request_id: Some(RequestId([7; 16])),
            },
            Request::Get {
                key: b"k".to_vec(),
                min_lsn: 0,
            },
            Request::Scan {
                range: KeyRange::default(),
                limit: 1,
                min_lsn: 0,
            },
            Request::History {
                key: b"k".to_vec(),
                limit: 1,
                min_lsn: 0,
            },
            Request::Watch {
                prefix: vec![],
                from_lsn: None,
            },
            Request::Status,
            Request::PeerAdd {
                node_id: NodeId([1; 32]),
                addr: "127.0.0.1:7700".into(),
            },
            Request::PeerRemove {
                node_id: NodeId([1; 32]),
            },
            Request::PeerList,
            Request::PeerInvite { expires_secs: 60 },
            Request::PeerJoin {
                invite: String::new(),
            },
            Request::Join {
                node_id: NodeId([1; 32]),
                addrs: vec![],
                secret: InviteSecret([2; 32]),
                proof: Signature([3; 64]),
            },
            Request::Query {
                index: "i".into(),
                query: IndexQuery::Exact(vec![]),
                limit: 1,
                start_after: None,
                min_lsn: 0,
                wait_ms: 0,
            },
            Request::Sync {
                send: true,
                receive: true,
                live: false,
            },
            Request::Pipeline,
        ];
        for r in &requests {
            // Adding a kind fails to compile here until it is listed.
            match r {
                Request::Hello { .. }
                | Request::Write { .. }
                | Request::WriteIf { .. }
                | Request::Get { .. }
                | Request::Scan { .. }
                | Request::History { .. }
                | Request::Watch { .. }
                | Request::Status
                | Request::PeerAdd { .. }
                | Request::PeerRemove { .. }
                | Request::PeerList
                | Request::PeerInvite { .. }
                | Request::PeerJoin { .. }
                | Request::Join { .. }
                | Request::Query { .. }
                | Request::Sync { .. }
                | Request::Pipeline => {}
            }
            let frame = encode_frame(r);
            let body = &frame[FRAME_HEADER_LEN..];
            let kind = crate::frame::message_kind(body).expect("a tagged message");
            assert!(Request::KINDS.contains(&kind), "{kind} is not listed");
            assert!(matches!(decode_message::<Request>(body), Ok(Decoded::Message(d)) if d == *r));
        }
        assert_eq!(requests.len(), Request::KINDS.len());

        #[derive(serde::Serialize)]
        enum Newer {
            Compact { below: u64 },
        }
        let frame = encode_frame(&Newer::Compact { below: 3 });
        assert!(matches!(
            decode_message::<Request>(&frame[FRAME_HEADER_LEN..]),
            Ok(Decoded::UnknownKind(k)) if k == "Compact"
        ));
        // A known kind with the wrong fields is malformed, not unknown.
        #[derive(serde::Serialize)]
        enum Wrong {
            Get { key: bool },
        }
        let frame = encode_frame(&Wrong::Get { key: true });
        assert!(decode_message::<Request>(&frame[FRAME_HEADER_LEN..]).is_err());
    }

    #[test]
    fn a_write_from_a_client_without_request_ids_still_decodes() {
        #[derive(serde::Serialize)]
        enum Older {
            Write { ops: Vec<WriteOp> },
        }
        let op = WriteOp {
            key: b"k".to_vec(),
            value: Some(b"v".to_vec()),
            supersedes: None,
        };
        let frame = encode_frame(&Older::Write {
            ops: vec![op.clone()],
        });
        assert!(matches!(
            decode_message::<Request>(&frame[FRAME_HEADER_LEN..]),
            Ok(Decoded::Message(Request::Write { ops, request_id: None })) if ops == [op]
        ));
    }
}
