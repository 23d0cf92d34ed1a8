//! [`Client`]: the requests, read-your-writes, and transparent reconnects.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kappakv_protocol::limits::{
    MAX_HISTORY_LIMIT, MAX_KEY_BYTES, MAX_OPS_PER_ENTRY, MAX_SUPERSEDES, MAX_VALUE_BYTES,
};
use kappakv_protocol::{
    Context, EntryId, Lsn, NodeId, PeerStatus, Request, RequestId, Response, Status, Ticket,
    Version, WriteOp,
};
use quinn::{RecvStream, SendStream};

use crate::config::{ClientBuilder, ClientOptions};
use crate::connection::{self, SendFailure, response_kind};
use crate::error::{ConnectError, InvalidRequest, ProtocolError, RequestError, Result};
use crate::pipeline::Pipeline;
use crate::scan::{Scan, ScanOptions};
use crate::value::GetResult;
use crate::watch::Watch;

/// A connection to one kappakv node. Cheap to clone: clones share the connection and the
/// read-your-writes LSN.
///
/// Requests run concurrently. Those answered with one frame (writes, gets, history, status,
/// peer changes) share the connection's pipeline: calls made at the same time from any task go
/// out together in shared frames and packets, and each is answered on its own as soon as the
/// node has done it. Scans, queries and watches each get a QUIC stream of their own. When the connection is lost the next
/// request dials again (QUIC handshake and hello); reads whose connection broke under them are
/// retried once on the new connection, writes only when the node certainly never received them.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ticket: Ticket,
    options: ClientOptions,
    endpoint: quinn::Endpoint,
    /// The connection in use. A std mutex: it is held only to clone or swap the handle, never
    /// across an `.await`.
    current: Mutex<Live>,
    /// Serializes re-dialling, so that many requests failing at once dial once. Holds the
    /// generation of the last connection made.
    redial: tokio::sync::Mutex<u64>,
    /// The highest LSN this client has written; sent as `min_lsn` on reads.
    written_lsn: AtomicU64,
    /// Whether the node's last hello said the token is read-only.
    read_only: AtomicBool,
    /// The first half of every request id this client makes, random; the second half counts.
    request_ids: [u8; 8],
    /// Request ids made.
    requests: AtomicU64,
}

#[derive(Clone, Debug)]
pub(crate) struct Live {
    pub(crate) conn: quinn::Connection,
    /// Counts connections made by this client; tells a stale handle from a fresh one.
    pub(crate) generation: u64,
    /// The connection's pipeline, which carries the requests answered with one frame; `None`
    /// when turned off or the node has none.
    pipeline: Option<Arc<Pipeline>>,
}

/// Opens the pipeline of a new connection, unless `options` turn it off. A node that cannot
/// open one (an older node) gets every request on a stream of its own.
async fn open_pipeline(conn: &quinn::Connection, options: &ClientOptions) -> Option<Arc<Pipeline>> {
    if !options.pipeline {
        return None;
    }
    match tokio::time::timeout(options.request_timeout, Pipeline::open(conn)).await {
        Ok(Ok(pipeline)) => pipeline.map(Arc::new),
        Ok(Err(error)) => {
            tracing::debug!(%error, "no pipeline; each request goes on a stream of its own");
            None
        }
        Err(_) => {
            tracing::debug!(
                "no answer to opening a pipeline; each request goes on a stream of its own"
            );
            None
        }
    }
}

/// A write made durable by the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The LSN of the write in the node's log.
    pub lsn: Lsn,
    /// The id of the new entry: the id of the version it wrote for each key.
    pub id: EntryId,
}

impl Written {
    /// A context naming exactly this write, to supersede it with the next one.
    pub fn context(&self) -> Context {
        Context(vec![self.id])
    }
}

/// A group of ops written atomically, as one entry.
///
/// ```
/// use kappakv_client::Batch;
///
/// let batch = Batch::new().put("a", "1").put("b", "2").delete("c");
/// assert_eq!(batch.len(), 3);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<WriteOp>,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put that supersedes every current version of the key.
    pub fn put(self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        self.op(key, Some(value.as_ref().to_vec()), None)
    }

    /// Adds a put that supersedes exactly `context`.
    pub fn put_with(
        self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        context: &Context,
    ) -> Self {
        self.op(key, Some(value.as_ref().to_vec()), Some(context))
    }

    /// Adds a delete of every current version of the key.
    pub fn delete(self, key: impl AsRef<[u8]>) -> Self {
        self.op(key, None, None)
    }

    /// Adds a delete of exactly `context`.
    pub fn delete_with(self, key: impl AsRef<[u8]>, context: &Context) -> Self {
        self.op(key, None, Some(context))
    }

    /// Adds an op as it goes on the wire.
    pub fn push(mut self, op: WriteOp) -> Self {
        self.ops.push(op);
        self
    }

    /// Ops in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no ops.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    fn op(self, key: impl AsRef<[u8]>, value: Option<Vec<u8>>, context: Option<&Context>) -> Self {
        self.push(write_op(key.as_ref(), value, context))
    }
}

impl From<Batch> for Vec<WriteOp> {
    fn from(batch: Batch) -> Self {
        batch.ops
    }
}

/// Builds a wire op; a context is sorted and deduplicated as `supersedes` must be.
pub(crate) fn write_op(key: &[u8], value: Option<Vec<u8>>, context: Option<&Context>) -> WriteOp {
    WriteOp {
        key: key.to_vec(),
        value,
        supersedes: context.map(|c| c.clone().normalized().0),
    }
}

fn validate(ops: &[WriteOp]) -> Result<(), InvalidRequest> {
    if ops.is_empty() {
        return Err(InvalidRequest::NoOps);
    }
    if ops.len() > MAX_OPS_PER_ENTRY {
        return Err(InvalidRequest::TooManyOps {
            count: ops.len(),
            max: MAX_OPS_PER_ENTRY,
        });
    }
    let mut keys = HashSet::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        validate_key(&op.key)?;
        if let Some(v) = &op.value
            && v.len() > MAX_VALUE_BYTES
        {
            return Err(InvalidRequest::ValueTooLarge {
                len: v.len(),
                max: MAX_VALUE_BYTES,
            });
        }
        if let Some(s) = &op.supersedes
            && s.len() > MAX_SUPERSEDES
        {
            return Err(InvalidRequest::ContextTooLarge {
                len: s.len(),
                max: MAX_SUPERSEDES,
            });
        }
        if !keys.insert(op.key.as_slice()) {
            return Err(InvalidRequest::DuplicateKey { index });
        }
    }
    Ok(())
}

pub(crate) fn validate_key(key: &[u8]) -> Result<(), InvalidRequest> {
    if key.len() > MAX_KEY_BYTES {
        return Err(InvalidRequest::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

fn unexpected(request: &'static str, response: &Response) -> RequestError {
    match response {
        Response::Error { code, message } => RequestError::Server {
            code: *code,
            message: message.clone(),
        },
        other => ProtocolError::Unexpected {
            request,
            got: response_kind(other),
        }
        .into(),
    }
}

impl Client {
    /// Connects to the node of `ticket` with default settings and authenticates.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let ticket = "kappakv://…".parse()?;
    /// let client = kappakv_client::Client::connect(&ticket).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(ticket: &Ticket) -> Result<Client, ConnectError> {
        Self::connect_with(ticket.clone(), ClientOptions::default()).await
    }

    /// A builder, for settings other than the defaults.
    pub fn builder(ticket: Ticket) -> ClientBuilder {
        ClientBuilder::new(ticket)
    }

    pub(crate) async fn connect_with(
        ticket: Ticket,
        options: ClientOptions,
    ) -> Result<Client, ConnectError> {
        let endpoint = connection::open_endpoint(&ticket)?;
        let (conn, hello) = connection::dial(&endpoint, &ticket, &options).await?;
        tracing::debug!(node = %hello.node_id.short(), read_only = hello.read_only, "connected");
        let pipeline = open_pipeline(&conn, &options).await;
        Ok(Client {
            inner: Arc::new(Inner {
                ticket,
                options,
                endpoint,
                current: Mutex::new(Live {
                    conn,
                    generation: 1,
                    pipeline,
                }),
                redial: tokio::sync::Mutex::new(1),
                written_lsn: AtomicU64::new(0),
                read_only: AtomicBool::new(hello.read_only),
                request_ids: random_bytes(),
                requests: AtomicU64::new(0),
            }),
        })
    }

    /// The node this client talks to.
    pub fn node_id(&self) -> NodeId {
        self.inner.ticket.node_id
    }

    /// Whether the node said the ticket's token only allows reads.
    pub fn is_read_only(&self) -> bool {
        self.inner.read_only.load(Ordering::Relaxed)
    }

    /// The highest LSN this client has written, `0` if none: reads wait until the node has
    /// indexed it.
    pub fn written_lsn(&self) -> Lsn {
        self.inner.written_lsn.load(Ordering::Relaxed)
    }

    /// Makes later reads wait for `lsn` too, e.g. an LSN written through another client of the
    /// same node.
    pub fn observe_lsn(&self, lsn: Lsn) {
        self.inner.written_lsn.fetch_max(lsn, Ordering::Relaxed);
    }

    /// Closes the connection and waits until the node has been told.
    pub async fn close(&self) {
        let conn = self.live().conn;
        conn.close(0u32.into(), b"bye");
        self.inner.endpoint.wait_idle().await;
    }

    // ---- writes -------------------------------------------------------------------------

    /// Writes `value` under `key`, superseding every version current on the node.
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// let written = client.put("greeting", "hello").await?;
    /// println!("version {} at lsn {}", written.id, written.lsn);
    /// # Ok(()) }
    /// ```
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<Written> {
        self.batch(Batch::new().put(key, value)).await
    }

    /// Writes `value` under `key`, superseding exactly the versions in `context` (from a get).
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// let current = client.get("counter").await?;
    /// // Merge every sibling into one value, superseding all of them.
    /// let merged: u64 = current.values.iter()
    ///     .filter_map(|v| std::str::from_utf8(v.value.as_deref()?).ok()?.parse().ok())
    ///     .max()
    ///     .unwrap_or(0);
    /// client.put_with("counter", (merged + 1).to_string(), &current.context).await?;
    /// # Ok(()) }
    /// ```
    pub async fn put_with(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        context: &Context,
    ) -> Result<Written> {
        self.batch(Batch::new().put_with(key, value, context)).await
    }

    /// Deletes every version of `key` current on the node.
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<Written> {
        self.batch(Batch::new().delete(key)).await
    }

    /// Deletes exactly the versions in `context`; a concurrent put survives.
    pub async fn delete_with(&self, key: impl AsRef<[u8]>, context: &Context) -> Result<Written> {
        self.batch(Batch::new().delete_with(key, context)).await
    }

    /// Puts `value` under `key` only if the key's current versions on this node are exactly
    /// those `context` names (an empty context: only if the key has no value), superseding
    /// them; otherwise nothing is written and the error's code is
    /// [`ErrorCode::Conflict`](crate::ErrorCode::Conflict) ([`RequestError::is_conflict`]).
    ///
    /// The check is made where the node orders the write into its log, so two conditional
    /// writes on one node never both succeed on the same context. It cannot see writes made
    /// on other nodes that have not reached this one: those still become siblings.
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// let got = client.get("counter").await?;
    /// let n: u64 = got.values.first().map_or(0, |v| {
    ///     String::from_utf8_lossy(v.value.as_deref().unwrap_or_default()).parse().unwrap_or(0)
    /// });
    /// match client.put_if("counter", (n + 1).to_string(), &got.context).await {
    ///     Ok(_) => {}
    ///     Err(e) if e.is_conflict() => { /* someone else wrote it: read again */ }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn put_if(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        context: &Context,
    ) -> Result<Written> {
        self.batch_if(Batch::new().put_with(key, value, context))
            .await
    }

    /// Deletes `key` only if its current versions on this node are exactly those `context`
    /// names; see [`Client::put_if`].
    pub async fn delete_if(&self, key: impl AsRef<[u8]>, context: &Context) -> Result<Written> {
        self.batch_if(Batch::new().delete_with(key, context)).await
    }

    /// Writes several ops atomically only if every op's context names exactly its key's
    /// current versions on this node: all of them or none. Every op must carry a context
    /// ([`Batch::put_with`], [`Batch::delete_with`]); see [`Client::put_if`].
    pub async fn batch_if(&self, ops: impl Into<Vec<WriteOp>>) -> Result<Written> {
        let ops = ops.into();
        validate(&ops)?;
        if let Some(index) = ops.iter().position(|op| op.supersedes.is_none()) {
            return Err(InvalidRequest::NoContext { index }.into());
        }
        self.written(Request::WriteIf {
            ops,
            request_id: Some(self.new_request_id()),
        })
        .await
    }

    /// Writes several ops atomically, as one entry (at most one op per key).
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// use kappakv_client::Batch;
    /// client.batch(Batch::new().put("a", "1").put("b", "2").delete("old")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn batch(&self, ops: impl Into<Vec<WriteOp>>) -> Result<Written> {
        let ops = ops.into();
        validate(&ops)?;
        self.written(Request::Write {
            ops,
            request_id: Some(self.new_request_id()),
        })
        .await
    }

    /// A fresh id for a write request, so that sending it again is safe: this client's random
    /// prefix and a count, unique without a system call per write.
    fn new_request_id(&self) -> RequestId {
        let n = self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; RequestId::LEN];
        id[..8].copy_from_slice(&self.inner.request_ids);
        id[8..].copy_from_slice(&n.to_be_bytes());
        RequestId(id)
    }

    /// Sends a write and takes its `Written` answer. The request carries an id, so it is sent
    /// once more on a new connection if the first connection broke after it was sent: a node
    /// that wrote it answers with that write. If that fails too, or no answer comes in time,
    /// the write may or may not have been made: [`RequestError::OutcomeUnknown`].
    async fn written(&self, request: Request) -> Result<Written> {
        match self.unary(&request, true).await {
            Ok(Response::Written { lsn, id }) => {
                self.observe_lsn(lsn);
                Ok(Written { lsn, id })
            }
            Ok(other) => Err(unexpected("write", &other)),
            Err(Unanswered::MaybeSent(error)) => Err(RequestError::OutcomeUnknown {
                source: Box::new(error),
            }),
            Err(Unanswered::Failed(error)) => Err(error),
        }
    }

    // ---- reads --------------------------------------------------------------------------

    /// The current versions of `key`: zero (missing or deleted), one, or several concurrent
    /// siblings, and the context that supersedes them all.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<GetResult> {
        let key = key.as_ref();
        validate_key(key)?;
        let request = Request::Get {
            key: key.to_vec(),
            min_lsn: self.written_lsn(),
        };
        match self
            .unary(&request, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Versions(kv) => Ok(GetResult::from(kv)),
            other => Err(unexpected("get", &other)),
        }
    }

    /// Keys with their current versions, in key order, fetched page by page as the stream is
    /// polled.
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// use futures_util::TryStreamExt;
    /// use kappakv_client::ScanOptions;
    ///
    /// let mut users = client.scan(ScanOptions::prefix("user/").limit(100));
    /// while let Some(kv) = users.try_next().await? {
    ///     println!("{} has {} value(s)", String::from_utf8_lossy(&kv.key), kv.values.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn scan(&self, options: ScanOptions) -> Scan {
        Scan::new(self.clone(), options, self.inner.options.scan_page)
    }

    /// Every version of `key` ever written, newest first, tombstones included (value `None`);
    /// at most `limit` (capped at the protocol's maximum).
    pub async fn history(&self, key: impl AsRef<[u8]>, limit: u32) -> Result<Vec<Version>> {
        let key = key.as_ref();
        validate_key(key)?;
        let request = Request::History {
            key: key.to_vec(),
            limit: limit.min(MAX_HISTORY_LIMIT),
            min_lsn: self.written_lsn(),
        };
        match self
            .unary(&request, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::History { versions } => Ok(versions),
            other => Err(unexpected("history", &other)),
        }
    }

    /// Changes to keys starting with `prefix`: those after `from_lsn` from the log
    /// (`Some(0)` replays everything), then live ones. `None` starts with live changes.
    ///
    /// If the connection is lost the watch dials again and resubscribes from the last change it
    /// delivered, without delivering a change twice (see [`Watch`]).
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// use futures_util::TryStreamExt;
    ///
    /// let mut changes = client.watch("jobs/", None);
    /// while let Some(change) = changes.try_next().await? {
    ///     println!("lsn {}: {} changed", change.lsn, String::from_utf8_lossy(&change.key));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch(&self, prefix: impl AsRef<[u8]>, from_lsn: Option<Lsn>) -> Watch {
        Watch::new(self.clone(), prefix.as_ref().to_vec(), from_lsn)
    }

    /// The node's state: LSNs, version vector, peers.
    pub async fn status(&self) -> Result<Status> {
        match self
            .unary(&Request::Status, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Status(status) => Ok(*status),
            other => Err(unexpected("status", &other)),
        }
    }

    // ---- peers --------------------------------------------------------------------------

    /// Makes an invite: a string that makes the node given it this node's peer, once, within
    /// `expires` (`kappakv serve --join`, or [`Client::peer_join`] on that node).
    pub async fn peer_invite(&self, expires: std::time::Duration) -> Result<String> {
        let request = Request::PeerInvite {
            expires_secs: expires.as_secs().max(1),
        };
        match self
            .unary(&request, false)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Invite { invite } => Ok(invite),
            other => Err(unexpected("peer_invite", &other)),
        }
    }

    /// Joins this node to the node that made `invite`: both add each other as peers.
    pub async fn peer_join(&self, invite: &str) -> Result<()> {
        let request = Request::PeerJoin {
            invite: invite.trim().to_string(),
        };
        match self
            .unary(&request, false)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected("peer_join", &other)),
        }
    }

    /// Adds a peer at run time; `addr` is `HOST:PORT`.
    pub async fn peer_add(&self, node_id: NodeId, addr: impl Into<String>) -> Result<()> {
        let request = Request::PeerAdd {
            node_id,
            addr: addr.into(),
        };
        match self
            .unary(&request, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected("peer_add", &other)),
        }
    }

    /// Removes a peer.
    pub async fn peer_remove(&self, node_id: NodeId) -> Result<()> {
        match self
            .unary(&Request::PeerRemove { node_id }, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected("peer_remove", &other)),
        }
    }

    /// The node's peers and their replication state.
    pub async fn peer_list(&self) -> Result<Vec<PeerStatus>> {
        match self
            .unary(&Request::PeerList, true)
            .await
            .map_err(Unanswered::into_error)?
        {
            Response::Status(status) => Ok(status.peers),
            other => Err(unexpected("peer_list", &other)),
        }
    }

    // ---- plumbing -----------------------------------------------------------------------

    pub(crate) fn request_timeout(&self) -> std::time::Duration {
        self.inner.options.request_timeout
    }

    fn live(&self) -> Live {
        self.inner
            .current
            .lock()
            .expect("no panics while the handle is held")
            .clone()
    }

    /// A usable connection: the current one, or a new one if it is closed.
    async fn connection(&self) -> Result<Live, ConnectError> {
        let live = self.live();
        if live.conn.close_reason().is_none() {
            return Ok(live);
        }
        self.redial(live.generation).await
    }

    /// Replaces the connection of generation `stale`, unless another task already did.
    pub(crate) async fn redial(&self, stale: u64) -> Result<Live, ConnectError> {
        let mut generation = self.inner.redial.lock().await;
        let live = self.live();
        if live.generation != stale && live.conn.close_reason().is_none() {
            return Ok(live);
        }
        live.conn.close(0u32.into(), b"reconnecting");
        let (conn, hello) = connection::dial(
            &self.inner.endpoint,
            &self.inner.ticket,
            &self.inner.options,
        )
        .await?;
        *generation += 1;
        tracing::debug!(generation = *generation, "reconnected");
        let pipeline = open_pipeline(&conn, &self.inner.options).await;
        self.inner
            .read_only
            .store(hello.read_only, Ordering::Relaxed);
        let live = Live {
            conn,
            generation: *generation,
            pipeline,
        };
        *self
            .inner
            .current
            .lock()
            .expect("no panics while the handle is held") = live.clone();
        Ok(live)
    }

    /// Opens a stream carrying `request`, dialling again and retrying once if the connection
    /// turns out to be lost before the request could be sent.
    pub(crate) async fn open_stream(
        &self,
        request: &Request,
        finish: bool,
    ) -> Result<(SendStream, RecvStream, u64)> {
        let mut live = self.connection().await?;
        let mut retried = false;
        loop {
            match connection::open(&live.conn, request, finish).await {
                Ok((send, recv)) => return Ok((send, recv, live.generation)),
                Err(SendFailure {
                    maybe_sent: false,
                    error,
                }) if !retried && error.is_connection_lost() => {
                    tracing::debug!(kind = request.kind(), %error, "connection lost, dialling again");
                    retried = true;
                    live = self.redial(live.generation).await?;
                }
                Err(failure) => return Err(failure.error),
            }
        }
    }

    /// Sends `request` on a stream of its own and reads its one answer. A request whose
    /// connection broke after it was sent is sent once more on a new connection when it is
    /// `repeatable` (a read, or a write with a request id). Errors say whether the request may
    /// have reached the node.
    async fn unary(
        &self,
        request: &Request,
        repeatable: bool,
    ) -> std::result::Result<Response, Unanswered> {
        let after = self.request_timeout();
        let mut retried = false;
        let mut sent = false;
        loop {
            let Ok(result) = tokio::time::timeout(after, self.attempt(request)).await else {
                // The request may be on its way, or done.
                return Err(Unanswered::MaybeSent(RequestError::Timeout { after }));
            };
            match result {
                Ok(Response::Error { code, message }) => {
                    return Err(Unanswered::Failed(RequestError::Server { code, message }));
                }
                Ok(response) => return Ok(response),
                Err(Attempt {
                    error,
                    sent_on: Some(generation),
                }) if repeatable && !retried && error.is_connection_lost() => {
                    tracing::debug!(kind = request.kind(), %error, "connection lost, sending again once");
                    retried = true;
                    sent = true;
                    if let Err(e) = self.redial(generation).await {
                        return Err(Unanswered::MaybeSent(e.into()));
                    }
                }
                Err(Attempt {
                    error,
                    sent_on: Some(_),
                }) => return Err(Unanswered::MaybeSent(error)),
                Err(Attempt { error, .. }) if sent => return Err(Unanswered::MaybeSent(error)),
                Err(Attempt { error, .. }) => return Err(Unanswered::Failed(error)),
            }
        }
    }

    async fn attempt(&self, request: &Request) -> Result<Response, Attempt> {
        if request.is_pipelinable() {
            let live = self.connection().await.map_err(|e| Attempt {
                error: e.into(),
                sent_on: None,
            })?;
            if let Some(pipeline) = &live.pipeline {
                match pipeline.call(request).await {
                    Ok(response) => return Ok(response),
                    Err(failed) if failed.maybe_sent => {
                        return Err(Attempt {
                            error: failed.error,
                            sent_on: Some(live.generation),
                        });
                    }
                    // The pipeline is broken, or broke before the request left: it goes on a
                    // stream of its own, which dials again if the connection is lost.
                    Err(_) => {}
                }
            }
        }
        let (_send, mut recv, generation) =
            self.open_stream(request, true)
                .await
                .map_err(|error| Attempt {
                    error,
                    sent_on: None,
                })?;
        match connection::read_frame(&mut recv, request.kind()).await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(Attempt {
                error: ProtocolError::Truncated {
                    request: request.kind(),
                }
                .into(),
                sent_on: None,
            }),
            Err(error) => Err(Attempt {
                error,
                sent_on: Some(generation),
            }),
        }
    }
}

/// A request that got no answer, and whether it may have reached the node.
enum Unanswered {
    /// It was sent (or may have been) and its answer was lost.
    MaybeSent(RequestError),
    /// It certainly had no effect, or the node answered with an error.
    Failed(RequestError),
}

impl Unanswered {
    fn into_error(self) -> RequestError {
        match self {
            Unanswered::MaybeSent(e) | Unanswered::Failed(e) => e,
        }
    }
}

fn random_bytes() -> [u8; 8] {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the operating system's random numbers");
    bytes
}

/// A failed attempt, and the connection generation it was sent on if the answer was lost.
struct Attempt {
    error: RequestError,
    sent_on: Option<u64>,
}
