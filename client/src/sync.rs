//! Peer sessions through the node: [`Client::sync`] opens a stream on which the node runs one
//! `kappakv-peer/1` session, for a peer the caller relays (over a pipe, ssh, a serial line) or
//! for export files the caller hands in.

use kappakv_protocol::{Request, Response};
use quinn::{RecvStream, SendStream};

use crate::client::Client;
use crate::connection::{read_frame, response_kind};
use crate::error::{ProtocolError, RequestError, Result};

/// What the node does in a session opened with [`Client::sync`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncOptions {
    /// The node sends the entries the other side lacks.
    pub send: bool,
    /// The node takes in the entries it is sent (needs a read-write ticket).
    pub receive: bool,
    /// The session goes on with new entries; otherwise the node ends it once each side has
    /// said it sent everything it had (`Synced`).
    pub live: bool,
}

/// A peer session through the node: `kappakv-peer/1` frames both ways, starting with each
/// side's `Hello`.
#[derive(Debug)]
pub struct SyncStream {
    send: SendStream,
    recv: RecvStream,
}

impl SyncStream {
    /// The two halves: where to write frames for the node, where to read the node's.
    pub fn into_split(
        self,
    ) -> (
        impl tokio::io::AsyncWrite + Unpin + Send + 'static,
        impl tokio::io::AsyncRead + Unpin + Send + 'static,
    ) {
        (self.send, self.recv)
    }
}

impl Client {
    /// Opens a peer session through the node. The node verifies what it receives as it does
    /// from any peer (signatures, chains, equivocations, its `writers` list).
    pub async fn sync(&self, options: SyncOptions) -> Result<SyncStream> {
        let request = Request::Sync {
            send: options.send,
            receive: options.receive,
            live: options.live,
        };
        let (send, mut recv, _) = self.open_stream(&request, false).await?;
        let after = self.request_timeout();
        let first = tokio::time::timeout(after, read_frame(&mut recv, "sync"))
            .await
            .map_err(|_| RequestError::Timeout { after })??;
        match first {
            Some(Response::SyncStarted) => Ok(SyncStream { send, recv }),
            Some(Response::Error { code, message }) => Err(RequestError::Server { code, message }),
            Some(other) => Err(ProtocolError::Unexpected {
                request: "sync",
                got: response_kind(&other),
            }
            .into()),
            None => Err(ProtocolError::Truncated { request: "sync" }.into()),
        }
    }
}
