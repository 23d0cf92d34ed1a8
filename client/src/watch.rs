//! Watches: a stream of changes under a prefix that survives one lost connection at a time.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::stream::BoxStream;
use kappakv_protocol::limits::MAX_OPS_PER_ENTRY;
use kappakv_protocol::{Change, Lsn, Request, Response};
use quinn::{RecvStream, SendStream};
use tokio::time::Instant;

use crate::client::Client;
use crate::connection::{read_frame, response_kind};
use crate::error::{ProtocolError, RequestError, Result};

/// A watch resubscribes on its own at most once per this interval, unless changes arrived since
/// the last time: a node that keeps ending the stream gets an error, not a busy loop.
const RESUBSCRIBE_INTERVAL: Duration = Duration::from_secs(10);

/// The stream [`Client::watch`] returns: changes in log order, until dropped.
///
/// Heartbeats are consumed; [`Watch::log_lsn`] tells the last log position the node reported.
/// Dropping the watch closes its stream on the node. If the connection is lost or the node ends
/// the stream (as it does when shutting down), the watch dials again and resubscribes from where
/// it was, without repeating or skipping a change; a failure within 10 s of such a resubscription,
/// with no change delivered in between, ends the watch with that error. A node that ends the watch (for instance
/// with `SlowConsumer` because the reader fell behind) yields that error and the stream ends;
/// start a new watch from the last LSN seen to continue.
pub struct Watch {
    inner: BoxStream<'static, Result<Change>>,
    log_lsn: Arc<AtomicU64>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("log_lsn", &self.log_lsn())
            .finish_non_exhaustive()
    }
}

impl Stream for Watch {
    type Item = Result<Change>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl Watch {
    /// The node's log LSN in the last heartbeat, `0` before the first.
    pub fn log_lsn(&self) -> Lsn {
        self.log_lsn.load(Ordering::Relaxed)
    }

    pub(crate) fn new(client: Client, prefix: Vec<u8>, from_lsn: Option<Lsn>) -> Watch {
        let log_lsn = Arc::new(AtomicU64::new(0));
        let state = State {
            client,
            prefix,
            open: None,
            progress: Progress {
                from_lsn,
                last_lsn: None,
                seen_at_last: Vec::new(),
            },
            heartbeat: log_lsn.clone(),
            resubscribed: None,
            done: false,
        };
        let inner = futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            if item.is_err() {
                state.done = true;
            }
            Some((item, state))
        });
        Watch {
            inner: Box::pin(inner),
            log_lsn,
        }
    }
}

struct State {
    client: Client,
    prefix: Vec<u8>,
    /// The watch stream; the send side stays open for as long as the watch runs, and dropping
    /// it (with the receive side, which stops the node's sending) ends the watch on the node.
    open: Option<(SendStream, RecvStream, u64)>,
    progress: Progress,
    heartbeat: Arc<AtomicU64>,
    /// When the watch last resubscribed on its own, if no change arrived since.
    resubscribed: Option<Instant>,
    done: bool,
}

/// What a watch has delivered, so that a resubscription neither loses nor repeats changes.
#[derive(Debug, Default)]
struct Progress {
    from_lsn: Option<Lsn>,
    /// The LSN of the last change delivered.
    last_lsn: Option<Lsn>,
    /// Keys delivered at `last_lsn`: one entry may change several keys, and a resumed watch
    /// replays that entry whole. Bounded by the ops one entry may hold.
    seen_at_last: Vec<Vec<u8>>,
}

impl Progress {
    /// Where a (re)subscription starts: just before the last change delivered, so that the rest
    /// of its entry is not lost; else where the caller asked; else at the last heartbeat.
    fn resume_from(&self, heartbeat: Lsn) -> Option<Lsn> {
        match self.last_lsn {
            Some(lsn) => Some(lsn.saturating_sub(1)),
            None if self.from_lsn.is_some() => self.from_lsn,
            None if heartbeat > 0 => Some(heartbeat),
            None => None,
        }
    }

    fn already_delivered(&self, change: &Change) -> bool {
        match self.last_lsn {
            Some(last) if change.lsn < last => true,
            Some(last) if change.lsn == last => self.seen_at_last.contains(&change.key),
            _ => false,
        }
    }

    fn record(&mut self, change: &Change) {
        if self.last_lsn != Some(change.lsn) {
            self.last_lsn = Some(change.lsn);
            self.seen_at_last.clear();
        }
        if self.seen_at_last.len() < MAX_OPS_PER_ENTRY {
            self.seen_at_last.push(change.key.clone());
        }
    }
}

impl State {
    /// Whether to resubscribe after a failure, and if so, notes the time.
    fn may_resubscribe(&mut self) -> bool {
        let now = Instant::now();
        if self
            .resubscribed
            .is_some_and(|at| now.duration_since(at) < RESUBSCRIBE_INTERVAL)
        {
            return false;
        }
        self.resubscribed = Some(now);
        true
    }

    async fn next(&mut self) -> Option<Result<Change>> {
        loop {
            if self.done {
                return None;
            }
            if self.open.is_none() {
                let request = Request::Watch {
                    prefix: self.prefix.clone(),
                    from_lsn: self
                        .progress
                        .resume_from(self.heartbeat.load(Ordering::Relaxed)),
                };
                let after = self.client.request_timeout();
                match tokio::time::timeout(after, self.client.open_stream(&request, false)).await {
                    Ok(Ok(open)) => self.open = Some(open),
                    Ok(Err(e)) => return Some(Err(e)),
                    Err(_) => return Some(Err(RequestError::Timeout { after })),
                }
            }
            let (_, recv, generation) = self.open.as_mut().expect("a watch is open");
            let generation = *generation;
            match read_frame(recv, "watch").await {
                Ok(Some(Response::Change(change))) => {
                    self.resubscribed = None;
                    if self.progress.already_delivered(&change) {
                        continue;
                    }
                    self.progress.record(&change);
                    return Some(Ok(change));
                }
                Ok(Some(Response::Heartbeat { log_lsn })) => {
                    self.heartbeat.store(log_lsn, Ordering::Relaxed);
                }
                Ok(Some(Response::Error { code, message })) => {
                    return Some(Err(RequestError::Server { code, message }));
                }
                Ok(Some(other)) => {
                    return Some(Err(ProtocolError::Unexpected {
                        request: "watch",
                        got: response_kind(&other),
                    }
                    .into()));
                }
                // A watch has no end: a node that finishes the stream is going away (it shuts
                // down), so the watch resubscribes once, like after a lost connection.
                Ok(None) if self.may_resubscribe() => {
                    tracing::debug!("the node ended the watch, resubscribing");
                    self.open = None;
                }
                Ok(None) => return Some(Err(ProtocolError::Truncated { request: "watch" }.into())),
                Err(e) if e.is_connection_lost() && self.may_resubscribe() => {
                    tracing::debug!(error = %e, "watch lost its connection, resubscribing");
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

#[cfg(test)]
mod tests {
    use super::*;
    use kappakv_protocol::{EntryId, NodeId, Timestamp, Version};

    fn change(lsn: Lsn, key: &str) -> Change {
        Change {
            lsn,
            key: key.as_bytes().to_vec(),
            version: Version {
                id: EntryId([lsn as u8; 32]),
                author: NodeId([1; 32]),
                timestamp: Timestamp(lsn),
                value: Some(b"v".to_vec()),
            },
            supersedes: vec![],
        }
    }

    #[test]
    fn resume_skips_what_was_delivered() {
        let mut p = Progress {
            from_lsn: None,
            ..Progress::default()
        };
        assert_eq!(p.resume_from(0), None);
        assert_eq!(p.resume_from(42), Some(42));
        p.from_lsn = Some(0);
        assert_eq!(p.resume_from(42), Some(0));
        p.record(&change(5, "a"));
        p.record(&change(7, "a"));
        p.record(&change(7, "b"));
        assert_eq!(p.resume_from(42), Some(6));
        assert!(p.already_delivered(&change(5, "z")));
        assert!(p.already_delivered(&change(7, "b")));
        assert!(!p.already_delivered(&change(7, "c")));
        assert!(!p.already_delivered(&change(8, "a")));
    }
}
