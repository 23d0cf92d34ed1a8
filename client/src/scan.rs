//! Scans: a stream of keys that follows the node's pages transparently.

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use futures_util::Stream;
use futures_util::stream::BoxStream;
use kappakv_protocol::limits::MAX_SCAN_LIMIT;
use kappakv_protocol::{KeyRange, KeyVersions, Lsn, Request, Response};
use quinn::RecvStream;

use crate::client::Client;
use crate::connection::{read_frame, response_kind};
use crate::error::{ProtocolError, RequestError, Result};

/// Which keys a scan covers, and how many at most. Bounds combine: a key must match all that
/// are given.
///
/// ```
/// use kappakv_client::ScanOptions;
///
/// let everything = ScanOptions::all();
/// let users = ScanOptions::prefix("user/").limit(50);
/// let window = ScanOptions::all().start("a").end("m");
/// # let _ = (everything, users, window);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanOptions {
    range: KeyRange,
    limit: Option<u64>,
    page_size: Option<u32>,
}

impl ScanOptions {
    /// Every key.
    pub fn all() -> Self {
        Self::default()
    }

    /// Keys starting with `prefix`.
    pub fn prefix(prefix: impl AsRef<[u8]>) -> Self {
        let mut options = Self::default();
        options.range.prefix = Some(prefix.as_ref().to_vec());
        options
    }

    /// Only keys at or after `key`.
    pub fn start(mut self, key: impl AsRef<[u8]>) -> Self {
        self.range.start = Some(key.as_ref().to_vec());
        self
    }

    /// Only keys before `key`.
    pub fn end(mut self, key: impl AsRef<[u8]>) -> Self {
        self.range.end = Some(key.as_ref().to_vec());
        self
    }

    /// Only keys strictly after `key`, e.g. the last key of an earlier, interrupted scan.
    pub fn start_after(mut self, key: impl AsRef<[u8]>) -> Self {
        self.range.start_after = Some(key.as_ref().to_vec());
        self
    }

    /// At most `keys` keys in all (the default is no limit).
    pub fn limit(mut self, keys: u64) -> Self {
        self.limit = Some(keys);
        self
    }

    /// Keys per request to the node, clamped to `1..=MAX_SCAN_LIMIT`.
    pub fn page_size(mut self, keys: u32) -> Self {
        self.page_size = Some(keys.clamp(1, MAX_SCAN_LIMIT));
        self
    }

    /// The key range.
    pub fn range(&self) -> &KeyRange {
        &self.range
    }
}

/// The stream [`Client::scan`] returns: keys with their current versions, in key order.
///
/// Pages are requested as the stream is polled. If the connection is lost mid-scan, the scan
/// dials again once and resumes after the last key it delivered. After an error the stream ends.
pub struct Scan {
    inner: BoxStream<'static, Result<KeyVersions>>,
}

impl fmt::Debug for Scan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scan").finish_non_exhaustive()
    }
}

impl Stream for Scan {
    type Item = Result<KeyVersions>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct State {
    client: Client,
    range: KeyRange,
    remaining: Option<u64>,
    page: u32,
    min_lsn: Lsn,
    /// The open page: its stream and the connection generation it runs on.
    open: Option<(RecvStream, u64)>,
    /// Keys received on the open page.
    page_keys: u64,
    /// Whether a lost connection was already retried since the last key.
    retried: bool,
    done: bool,
}

impl Scan {
    pub(crate) fn new(client: Client, options: ScanOptions, default_page: u32) -> Scan {
        let state = State {
            min_lsn: client.written_lsn(),
            client,
            range: options.range,
            remaining: options.limit,
            page: options.page_size.unwrap_or(default_page),
            open: None,
            page_keys: 0,
            retried: false,
            done: false,
        };
        let inner = futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            if item.is_err() {
                state.done = true;
            }
            Some((item, state))
        });
        Scan {
            inner: Box::pin(inner),
        }
    }
}

impl State {
    async fn next(&mut self) -> Option<Result<KeyVersions>> {
        let after = self.client.request_timeout();
        loop {
            if self.done || self.remaining == Some(0) {
                return None;
            }
            if self.open.is_none() {
                let limit = self
                    .remaining
                    .map_or(self.page, |r| r.min(u64::from(self.page)) as u32);
                let request = Request::Scan {
                    range: self.range.clone(),
                    limit,
                    min_lsn: self.min_lsn,
                };
                let opened =
                    tokio::time::timeout(after, self.client.open_stream(&request, true)).await;
                match opened {
                    Ok(Ok((_send, recv, generation))) => {
                        self.open = Some((recv, generation));
                        self.page_keys = 0;
                    }
                    Ok(Err(e)) => return Some(Err(e)),
                    Err(_) => return Some(Err(RequestError::Timeout { after })),
                }
            }
            let (recv, generation) = self.open.as_mut().expect("a page is open");
            let generation = *generation;
            let Ok(frame) = tokio::time::timeout(after, read_frame(recv, "scan")).await else {
                return Some(Err(RequestError::Timeout { after }));
            };
            match frame {
                Ok(Some(Response::Versions(kv))) => {
                    self.retried = false;
                    self.page_keys += 1;
                    self.range.start_after = Some(kv.key.clone());
                    if let Some(r) = &mut self.remaining {
                        *r -= 1;
                    }
                    return Some(Ok(kv));
                }
                Ok(Some(Response::ScanEnd { resume_after })) => {
                    self.open = None;
                    let Some(resume) = resume_after else {
                        self.done = true;
                        return None;
                    };
                    // A resume key must move the scan forward, or it would never end.
                    let resume = resume.into_vec();
                    if self.page_keys == 0
                        && self
                            .range
                            .start_after
                            .as_deref()
                            .is_some_and(|prev| resume.as_slice() <= prev)
                    {
                        return Some(Err(ProtocolError::Unexpected {
                            request: "scan",
                            got: "stalled resume key",
                        }
                        .into()));
                    }
                    self.range.start_after = Some(resume);
                }
                Ok(Some(Response::Error { code, message })) => {
                    return Some(Err(RequestError::Server { code, message }));
                }
                Ok(Some(other)) => {
                    return Some(Err(ProtocolError::Unexpected {
                        request: "scan",
                        got: response_kind(&other),
                    }
                    .into()));
                }
                Ok(None) => return Some(Err(ProtocolError::Truncated { request: "scan" }.into())),
                Err(e) if e.is_connection_lost() && !self.retried => {
                    tracing::debug!(error = %e, "scan lost its connection, resuming");
                    self.retried = true;
                    self.open = None;
                    if let Err(e) = self.client.redial(generation).await {
                        return Some(Err(e.into()));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
