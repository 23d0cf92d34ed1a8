//! Liveness and readiness, as the admin listener's `/healthz` and `/readyz` report them.
//!
//! A [`Health`] exists before the node does: it is handed to
//! [`Server::start_observed`](crate::Server::start_observed), which reports the start-up
//! catch-up of the views into it and then points it at the running node. So a node that is
//! rebuilding its indexes at start already answers: alive, not ready.
//!
//! **Invariant:** `Health` holds the node only weakly, so it never keeps a node alive past its
//! shutdown (which waits for the last strong reference to go).

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use kappakv_protocol::Lsn;

use crate::node::Node;

const STARTING: u8 = 0;
const CATCHING_UP: u8 = 1;
const SERVING: u8 = 2;
const STOPPING: u8 = 3;

/// The life of a node as the admin listener sees it.
#[derive(Debug, Default)]
pub struct Health {
    phase: AtomicU8,
    /// Start-up catch-up of the views: the LSN it started after, reached, and must reach.
    catch_up_from: AtomicU64,
    catch_up_at: AtomicU64,
    catch_up_upto: AtomicU64,
    node: Mutex<Weak<Node>>,
}

/// What `/healthz` or `/readyz` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// 200 when true, 503 otherwise.
    pub ok: bool,
    /// One line for the response body.
    pub reason: String,
}

impl Verdict {
    fn ok(reason: impl Into<String>) -> Self {
        Self {
            ok: true,
            reason: reason.into(),
        }
    }

    fn not(reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason: reason.into(),
        }
    }
}

/// Progress of the start-up catch-up of the views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUp {
    /// The LSN it started after.
    pub from: Lsn,
    /// The LSN applied so far.
    pub at: Lsn,
    /// The LSN it must reach.
    pub upto: Lsn,
}

impl CatchUp {
    /// Done fraction, 0 to 1.
    pub fn ratio(&self) -> f64 {
        if self.upto <= self.from {
            return 1.0;
        }
        (self.at.saturating_sub(self.from)) as f64 / (self.upto - self.from) as f64
    }
}

impl Health {
    /// A node that has not started yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The views are being caught up with the log, from `from` to `upto`, before serving.
    pub fn catching_up(&self, from: Lsn, upto: Lsn) {
        self.catch_up_from.store(from, Ordering::Relaxed);
        self.catch_up_at.store(from, Ordering::Relaxed);
        self.catch_up_upto.store(upto, Ordering::Relaxed);
        self.phase.store(CATCHING_UP, Ordering::Release);
        crate::telemetry::catch_up(from, from, upto);
    }

    /// The start-up catch-up has applied up to `at`.
    pub fn caught_up_to(&self, at: Lsn) {
        self.catch_up_at.store(at, Ordering::Relaxed);
        crate::telemetry::catch_up(
            self.catch_up_from.load(Ordering::Relaxed),
            at,
            self.catch_up_upto.load(Ordering::Relaxed),
        );
    }

    /// The node serves.
    pub fn serving(&self, node: &Arc<Node>) {
        *self.node.lock().expect("health lock") = Arc::downgrade(node);
        self.phase.store(SERVING, Ordering::Release);
        crate::telemetry::catch_up_done();
    }

    /// The node is shutting down: not ready any more.
    pub fn stopping(&self) {
        self.phase.store(STOPPING, Ordering::Release);
    }

    /// The running node, while it runs.
    pub fn node(&self) -> Option<Arc<Node>> {
        self.node.lock().expect("health lock").upgrade()
    }

    /// The start-up catch-up, while it runs.
    pub fn catch_up(&self) -> Option<CatchUp> {
        (self.phase.load(Ordering::Acquire) == CATCHING_UP).then(|| CatchUp {
            from: self.catch_up_from.load(Ordering::Relaxed),
            at: self.catch_up_at.load(Ordering::Relaxed),
            upto: self.catch_up_upto.load(Ordering::Relaxed),
        })
    }

    /// `/healthz`: the process is alive and, once the log is open, it is writable and its
    /// indexer runs; either failure lasts until a restart, which is what a 503 here asks a
    /// supervisor for. A node that is starting (rebuilding its views included) is alive.
    pub fn liveness(&self) -> Verdict {
        match self.phase.load(Ordering::Acquire) {
            STARTING | CATCHING_UP => Verdict::ok("starting"),
            STOPPING => Verdict::ok("stopping"),
            _ => match self.node() {
                Some(node) if node.writer.is_stopped() => Verdict::not(
                    "the log writer stopped after a failed write; restart the node to recover the log",
                ),
                Some(node) => node
                    .indexer_failure()
                    .map_or_else(|| Verdict::ok("ok"), |e| Verdict::not(indexer_failed(e))),
                None => Verdict::ok("ok"),
            },
        }
    }

    /// `/readyz`: the node serves, its log is writable, and every view (those built in the
    /// background included) has applied the log up to at most `lag_max` entries behind the
    /// durable LSN at the moment of asking.
    pub fn readiness(&self, lag_max: u64) -> Verdict {
        match self.phase.load(Ordering::Acquire) {
            STARTING => return Verdict::not("starting: opening the log"),
            CATCHING_UP => {
                let c = self.catch_up().unwrap_or(CatchUp {
                    from: 0,
                    at: 0,
                    upto: 0,
                });
                return Verdict::not(format!(
                    "starting: indexing the log, {} of {} entries ({:.1}%)",
                    c.at.saturating_sub(c.from),
                    c.upto.saturating_sub(c.from),
                    c.ratio() * 100.0
                ));
            }
            STOPPING => return Verdict::not("shutting down"),
            _ => {}
        }
        let Some(node) = self.node() else {
            return Verdict::not("shutting down");
        };
        if node.writer.is_stopped() {
            return Verdict::not("the log writer stopped after a failed write");
        }
        if let Some(e) = node.indexer_failure() {
            return Verdict::not(indexer_failed(e));
        }
        let durable = *node.durable.borrow();
        // Views built in the background count too: a node rebuilding an index is not ready.
        let indexed = node
            .view_lsns()
            .into_iter()
            .map(|(_, lsn)| lsn)
            .chain([*node.indexed.borrow()])
            .min()
            .unwrap_or(0);
        judge_lag(durable, indexed, lag_max)
    }
}

/// The reason given while the indexer is stopped after `error`.
fn indexer_failed(error: &str) -> String {
    format!(
        "the indexer stopped after an error ({error}); if the disk is full, free space in the data dir's file system, then restart the node"
    )
}

/// Ready when the views are at most `lag_max` entries behind the log.
fn judge_lag(durable: Lsn, indexed: Lsn, lag_max: u64) -> Verdict {
    let lag = durable.saturating_sub(indexed);
    if lag > lag_max {
        Verdict::not(format!(
            "indexing: the views are {lag} entries behind the log (ready at {lag_max} or fewer)"
        ))
    } else {
        Verdict::ok(format!("ready: log at {durable}, views at {indexed}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_node_is_alive_but_not_ready() {
        let h = Health::new();
        assert!(h.liveness().ok);
        assert!(!h.readiness(0).ok);
        h.catching_up(0, 100);
        h.caught_up_to(40);
        let v = h.readiness(1000);
        assert!(!v.ok && v.reason.contains("40 of 100"), "{v:?}");
        assert!(h.liveness().ok);
        h.stopping();
        assert!(!h.readiness(1000).ok);
    }

    #[test]
    fn lag_within_the_bound_is_ready() {
        assert!(judge_lag(10, 10, 0).ok);
        assert!(judge_lag(10, 5, 5).ok);
        assert!(!judge_lag(10, 4, 5).ok);
        assert!(judge_lag(3, 7, 0).ok);
    }
}
