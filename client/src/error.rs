//! Errors of the client, one enum per operation: [`ConnectError`] for dialling and
//! authenticating, [`RequestError`] for a request, [`ProtocolError`] for bytes that do not make
//! sense, and [`ValueError`] for the typed-value helpers.

use std::net::SocketAddr;
use std::time::Duration;

use kappakv_protocol::{DecodeError, ErrorCode, FramingError, NodeId};

/// Connecting to a node, or re-connecting after a lost connection, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The ticket lists no address.
    #[error("the ticket lists no address to dial")]
    NoAddress,
    /// No local UDP socket could be opened.
    #[error("cannot open a local UDP socket: {source}")]
    Bind {
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS configuration could not be built (a bug, or an unsupported crypto provider).
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    /// The node answered with a certificate for another key: the ticket is stale or the address
    /// now belongs to another node.
    #[error("the node at {addr} is not {expected}{}: get a fresh ticket with `kappakv id`",
        found.map(|f| format!(" (it is {f})")).unwrap_or_default())]
    WrongNode {
        /// The address dialled.
        addr: SocketAddr,
        /// The node id the ticket names.
        expected: NodeId,
        /// The node id the certificate carried, if it was readable.
        found: Option<NodeId>,
    },
    /// A name of the ticket could not be resolved.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// What the resolver said.
        source: std::io::Error,
    },
    /// The address could not be dialled at all.
    #[error("cannot dial {addr}: {source}")]
    Dial {
        /// The address.
        addr: SocketAddr,
        /// What the transport said.
        source: TransportError,
    },
    /// The QUIC handshake, or the connection right after it, failed.
    #[error("cannot connect to {addr}: {source}")]
    Handshake {
        /// The address.
        addr: SocketAddr,
        /// What ended the connection.
        source: TransportError,
    },
    /// No answer within the connect timeout: is the node running and reachable?
    #[error("no answer from {addr} within {}ms: is `kappakv serve` running there?", after.as_millis())]
    Timeout {
        /// The address.
        addr: SocketAddr,
        /// The connect timeout.
        after: Duration,
    },
    /// The node refused the ticket's token.
    #[error("the node refused the token: {message}")]
    Unauthorized {
        /// The node's explanation.
        message: String,
    },
    /// The node answered the hello with another error.
    #[error("the node refused the connection ({code:?}): {message}")]
    Refused {
        /// The wire error code.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The hello exchange broke the protocol.
    #[error("hello with {addr} failed: {source}")]
    Hello {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: Box<RequestError>,
    },
}

impl ConnectError {
    /// Whether trying again later can succeed (the node may come up, the network may heal).
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Dial { .. }
            | ConnectError::Handshake { .. }
            | ConnectError::Resolve { .. }
            | ConnectError::Timeout { .. } => true,
            ConnectError::Refused { code, .. } => code.retryable(),
            ConnectError::Hello { source, .. } => source.is_retryable(),
            ConnectError::NoAddress
            | ConnectError::Bind { .. }
            | ConnectError::Tls(_)
            | ConnectError::WrongNode { .. }
            | ConnectError::Unauthorized { .. } => false,
        }
    }
}

/// A QUIC failure: dialling, or a connection that ended. It describes what QUIC reported; the
/// QUIC library's own error stays inside, so that this crate's API does not change with it.
#[derive(Debug)]
pub struct TransportError(Transport);

#[derive(Debug)]
enum Transport {
    Dial(quinn::ConnectError),
    Connection(quinn::ConnectionError),
}

impl TransportError {
    /// Whether this side closed the connection (the client was closed or dropped).
    pub fn is_locally_closed(&self) -> bool {
        matches!(
            self.0,
            Transport::Connection(quinn::ConnectionError::LocallyClosed)
        )
    }

    /// Whether the connection ended because the node stopped answering (an idle timeout).
    pub fn is_timeout(&self) -> bool {
        matches!(
            self.0,
            Transport::Connection(quinn::ConnectionError::TimedOut)
        )
    }

    /// The application close code, when the node closed the connection on purpose (the codes
    /// are listed in the protocol document).
    pub fn close_code(&self) -> Option<u64> {
        match &self.0 {
            Transport::Connection(quinn::ConnectionError::ApplicationClosed(c)) => {
                Some(c.error_code.into_inner())
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Transport::Dial(e) => e.fmt(f),
            Transport::Connection(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TransportError {}

impl TransportError {
    pub(crate) fn dial(e: quinn::ConnectError) -> Self {
        Self(Transport::Dial(e))
    }

    pub(crate) fn connection(e: quinn::ConnectionError) -> Self {
        Self(Transport::Connection(e))
    }
}

/// Bytes from the node that do not make sense for the request sent: a bug or a version mismatch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame's length prefix is over the limit.
    #[error("response frame: {0}")]
    Framing(#[from] FramingError),
    /// A frame body that does not decode as a response.
    #[error("response frame: {0}")]
    Decode(#[from] DecodeError),
    /// A response of the wrong kind.
    #[error("unexpected `{got}` response to a `{request}` request")]
    Unexpected {
        /// The request kind.
        request: &'static str,
        /// The response kind.
        got: &'static str,
    },
    /// The stream ended inside a frame or before the response was complete.
    #[error("the `{request}` response stream ended early")]
    Truncated {
        /// The request kind.
        request: &'static str,
    },
}

/// A request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No connection could be made (or re-made after a lost one).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The node answered with an error.
    #[error("{message} ({code:?})")]
    Server {
        /// The wire error code.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The node's answer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The connection was lost while the request was under way.
    #[error("connection to the node lost: {source}")]
    ConnectionLost {
        /// What ended the connection.
        source: TransportError,
    },
    /// A write was sent, and no answer came: the connection broke again after the write was
    /// sent a second time, or no answer came within the request timeout. It may or may not
    /// have been made. Sending it again without a context can make a second version; read the
    /// key to find out, or write with the context you read before.
    #[error("the write may or may not have been made: {source}")]
    OutcomeUnknown {
        /// Why no answer came.
        source: Box<RequestError>,
    },
    /// The node reset the request's stream.
    #[error("the node reset the `{request}` stream (code {code})")]
    StreamReset {
        /// The request kind.
        request: &'static str,
        /// The application error code of the reset.
        code: u64,
    },
    /// No complete answer within the request timeout.
    #[error("no answer within {}ms", after.as_millis())]
    Timeout {
        /// The request timeout.
        after: Duration,
    },
    /// The request breaks a limit or rule and was not sent.
    #[error("invalid request: {0}")]
    Invalid(#[from] InvalidRequest),
    /// A typed value could not be encoded or decoded.
    #[error(transparent)]
    Value(#[from] ValueError),
}

impl RequestError {
    /// Whether sending the same request again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RequestError::Connect(e) => e.is_retryable(),
            RequestError::Server { code, .. } => code.retryable(),
            RequestError::ConnectionLost { .. }
            | RequestError::StreamReset { .. }
            | RequestError::Timeout { .. } => true,
            RequestError::OutcomeUnknown { .. }
            | RequestError::Protocol(_)
            | RequestError::Invalid(_)
            | RequestError::Value(_) => false,
        }
    }

    /// Whether a write may have been made although it failed: its answer was lost
    /// ([`RequestError::OutcomeUnknown`]). Not retryable: read the key first.
    pub fn is_maybe_committed(&self) -> bool {
        matches!(self, RequestError::OutcomeUnknown { .. })
    }

    /// Whether a conditional write found other current versions than its context named:
    /// nothing was written. Read the key again and decide.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(ErrorCode::Conflict)
    }

    /// The wire error code, when the node answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            RequestError::Server { code, .. }
            | RequestError::Connect(ConnectError::Refused { code, .. }) => Some(*code),
            RequestError::Connect(ConnectError::Unauthorized { .. }) => {
                Some(ErrorCode::Unauthorized)
            }
            _ => None,
        }
    }

    /// Whether the connection broke (as opposed to the node refusing or the bytes being wrong).
    pub(crate) fn is_connection_lost(&self) -> bool {
        matches!(self, RequestError::ConnectionLost { source } if !source.is_locally_closed())
    }
}

/// A request the client refuses to send because the node would refuse it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRequest {
    /// A write without ops.
    #[error("a write needs at least one op")]
    NoOps,
    /// Too many ops in one batch.
    #[error("{count} ops in one batch, the most is {max}")]
    TooManyOps {
        /// Ops given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A key over the limit.
    #[error("key of {len} bytes is over the limit of {max}")]
    KeyTooLarge {
        /// Key length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value over the limit.
    #[error("value of {len} bytes is over the limit of {max}")]
    ValueTooLarge {
        /// Value length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A context with too many ids.
    #[error("context of {len} ids is over the limit of {max}")]
    ContextTooLarge {
        /// Ids given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Two ops on one key in one batch.
    #[error("more than one op on one key in a batch (op {index})")]
    DuplicateKey {
        /// Index of the second op on that key.
        index: usize,
    },
    /// An op of a conditional write without the context it expects.
    #[error("op {index} of a conditional write names no context")]
    NoContext {
        /// Index of the op.
        index: usize,
    },
}

/// A typed value that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// JSON encoding or decoding failed.
    #[error("value is not the JSON expected: {0}")]
    Json(#[from] serde_json::Error),
    /// MessagePack encoding failed.
    #[error("value cannot be encoded as MessagePack: {0}")]
    MsgpackEncode(#[from] rmp_serde::encode::Error),
    /// MessagePack decoding failed.
    #[error("value is not the MessagePack expected: {0}")]
    MsgpackDecode(#[from] rmp_serde::decode::Error),
}

/// The result type of requests.
pub type Result<T, E = RequestError> = std::result::Result<T, E>;
