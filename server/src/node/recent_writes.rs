//! Recent writes by request id. A client whose connection broke after it sent a write does not
//! know whether the write happened; it sends the same request, with the same id, again. The
//! node answers a repeat of a write it has made with that write's result instead of writing a
//! second entry (which would make a sibling of the first).
//!
//! Ids are kept in memory, at most [`REMEMBERED_MAX`] of them and for at most
//! [`REMEMBERED_FOR`]: a repeat after that, or after the node restarted, writes again. A
//! write that failed is forgotten at once (nothing was written), so its repeat writes.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kappakv_protocol::RequestId;
use tokio::sync::Notify;

use super::writer::{WriteError, Written};

/// Most request ids remembered: about 100 bytes each.
pub const REMEMBERED_MAX: usize = 262_144;

/// Longest a request id is remembered.
pub const REMEMBERED_FOR: Duration = Duration::from_secs(600);

enum State {
    /// The first request with this id is being written; repeats wait for it.
    Writing(Arc<Notify>),
    /// Written.
    Written(Written),
}

#[derive(Default)]
struct Inner {
    states: HashMap<RequestId, State>,
    /// Ids in the order they were first seen, with when.
    order: VecDeque<(Instant, RequestId)>,
}

impl Inner {
    /// Forgets ids over the age limit, and the oldest while there are too many.
    fn forget_old(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front()
            && (now.duration_since(at) >= REMEMBERED_FOR || self.order.len() >= REMEMBERED_MAX)
        {
            self.order.pop_front();
            self.states.remove(&id);
        }
    }
}

/// Whether a write was made now or found made before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This request made it.
    Made(Written),
    /// An earlier request with the same id made it.
    Repeated(Written),
}

/// A write under way, in its caller's task or (`moved`) in a task of its own. Dropped in the
/// caller's task before the write is done (the caller was cancelled, or another request of
/// its task panicked), it moves the write to a task of its own that finishes and records it:
/// the write may already be in the log. (A spawn for every write would cost a task and a
/// wake-up of another runtime thread per request.)
struct Running<F: Future<Output = Result<Written, WriteError>> + Send + 'static> {
    recent: Arc<RecentWrites>,
    id: RequestId,
    notify: Arc<Notify>,
    write: Option<Pin<Box<F>>>,
    /// Set while the write is polled: a drop then is the write's own panic.
    polling: bool,
    /// Already in a task of its own, which only a runtime shutting down drops early.
    moved: bool,
}

impl<F: Future<Output = Result<Written, WriteError>> + Send + 'static> Running<F> {
    /// Drives the write to its end and records what it became.
    async fn run(mut self) -> Result<Written, WriteError> {
        let result = std::future::poll_fn(|cx| {
            let this = &mut self;
            this.polling = true;
            let poll = this
                .write
                .as_mut()
                .expect("polled until it is done")
                .as_mut()
                .poll(cx);
            this.polling = false;
            poll
        })
        .await;
        self.write = None;
        self.recent.record(self.id, &result, &self.notify);
        result
    }
}

impl<F: Future<Output = Result<Written, WriteError>> + Send + 'static> Drop for Running<F> {
    fn drop(&mut self) {
        let Some(write) = self.write.take() else {
            return;
        };
        if !self.polling
            && !self.moved
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(
                Running {
                    recent: self.recent.clone(),
                    id: self.id,
                    notify: self.notify.clone(),
                    write: Some(write),
                    polling: false,
                    moved: true,
                }
                .run(),
            );
            return;
        }
        // The write panicked (it is not polled again), or the runtime is going away: nothing
        // runs it to its end. The id is forgotten, so that repeats do not wait for it.
        self.recent
            .record(self.id, &Err(WriteError::ShuttingDown), &self.notify);
    }
}

/// The request ids of recent writes and what they became.
#[derive(Default)]
pub struct RecentWrites {
    inner: Mutex<Inner>,
}

impl RecentWrites {
    /// Runs `write` for the request `id`, unless a request with that id was written: then
    /// that write. A repeat that arrives while the first is being written waits for it. The
    /// write runs in the caller's task; if the caller goes away first, it goes on in a task of
    /// its own, so that it is recorded all the same.
    pub async fn once<F>(self: &Arc<Self>, id: RequestId, write: F) -> Result<Outcome, WriteError>
    where
        F: Future<Output = Result<Written, WriteError>> + Send + 'static,
    {
        let notify = loop {
            let waiting = {
                let mut inner = self.inner.lock().expect("recent writes lock");
                let now = Instant::now();
                inner.forget_old(now);
                match inner.states.get(&id) {
                    Some(State::Written(w)) => return Ok(Outcome::Repeated(*w)),
                    // Created under the lock: it sees the first request's wake-up even if that
                    // comes before it is polled.
                    Some(State::Writing(n)) => n.clone().notified_owned(),
                    None => {
                        let notify = Arc::new(Notify::new());
                        inner.states.insert(id, State::Writing(notify.clone()));
                        inner.order.push_back((now, id));
                        break notify;
                    }
                }
            };
            waiting.await;
        };
        Running {
            recent: self.clone(),
            id,
            notify,
            write: Some(Box::pin(write)),
            polling: false,
            moved: false,
        }
        .run()
        .await
        .map(Outcome::Made)
    }

    /// Records what the write of `id` became, and wakes the repeats that wait for it. Unless
    /// the id was forgotten meanwhile (too many newer ids), and perhaps taken by a newer write:
    /// only the state this write created (`notify` its own) is changed.
    fn record(&self, id: RequestId, result: &Result<Written, WriteError>, notify: &Arc<Notify>) {
        let mut inner = self.inner.lock().expect("recent writes lock");
        if let Some(State::Writing(own)) = inner.states.get(&id)
            && Arc::ptr_eq(own, notify)
        {
            match result {
                Ok(w) => {
                    inner.states.insert(id, State::Written(*w));
                }
                Err(_) => {
                    inner.states.remove(&id);
                }
            }
        }
        notify.notify_waiters();
    }

    /// Request ids remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("recent writes lock").states.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use kappakv_protocol::EntryId;

    use super::*;

    fn written(lsn: u64) -> Written {
        Written {
            lsn,
            id: EntryId([lsn as u8; 32]),
        }
    }

    /// A write that makes `written(lsn)` once its sender is used.
    fn held_write(
        lsn: u64,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        impl Future<Output = Result<Written, WriteError>> + Send + 'static,
    ) {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let write = async move {
            released.await.unwrap();
            Ok(written(lsn))
        };
        (release, write)
    }

    /// Runs `write` for `id` on a task of its own, and waits until it is under way (its id
    /// recorded).
    async fn spawn_once(
        recent: &Arc<RecentWrites>,
        id: RequestId,
        write: impl Future<Output = Result<Written, WriteError>> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<Outcome, WriteError>> {
        let task = tokio::spawn({
            let recent = recent.clone();
            async move { recent.once(id, write).await }
        });
        while recent.is_empty() {
            tokio::task::yield_now().await;
        }
        task
    }

    #[tokio::test]
    async fn a_repeat_gets_the_first_write_and_a_failed_one_is_forgotten() {
        let recent = Arc::new(RecentWrites::default());
        let id = RequestId([1; 16]);
        let first = recent.once(id, async { Ok(written(1)) }).await.unwrap();
        assert_eq!(first, Outcome::Made(written(1)));
        let again = recent.once(id, async { Ok(written(2)) }).await.unwrap();
        assert_eq!(again, Outcome::Repeated(written(1)));

        let other = RequestId([2; 16]);
        let failed = recent
            .once(other, async { Err(WriteError::ShuttingDown) })
            .await;
        assert!(failed.is_err());
        let retried = recent.once(other, async { Ok(written(3)) }).await.unwrap();
        assert_eq!(retried, Outcome::Made(written(3)));
    }

    #[tokio::test]
    async fn a_repeat_during_the_first_write_waits_for_it() {
        let recent = Arc::new(RecentWrites::default());
        let id = RequestId([3; 16]);
        let (release, write) = held_write(7);
        let first = spawn_once(&recent, id, write).await;
        let repeat = tokio::spawn({
            let recent = recent.clone();
            async move { recent.once(id, async { Ok(written(8)) }).await }
        });
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), Outcome::Made(written(7)));
        assert_eq!(
            repeat.await.unwrap().unwrap(),
            Outcome::Repeated(written(7))
        );
    }

    #[tokio::test]
    async fn a_write_whose_caller_went_away_is_recorded_all_the_same() {
        let recent = Arc::new(RecentWrites::default());
        let id = RequestId([4; 16]);
        let (release, write) = held_write(9);
        let caller = spawn_once(&recent, id, write).await;
        caller.abort();
        assert!(caller.await.unwrap_err().is_cancelled());
        release.send(()).unwrap();
        let repeat = recent.once(id, async { Ok(written(10)) }).await.unwrap();
        assert_eq!(repeat, Outcome::Repeated(written(9)));
    }

    #[tokio::test]
    async fn a_write_is_recorded_when_another_request_of_its_task_panics() {
        let recent = Arc::new(RecentWrites::default());
        let id = RequestId([5; 16]);
        let (release, write) = held_write(11);
        let caller = tokio::spawn({
            let recent = recent.clone();
            async move {
                let once = recent.once(id, write);
                let mut once = std::pin::pin!(once);
                std::future::poll_fn(|cx| {
                    assert!(once.as_mut().poll(cx).is_pending());
                    std::task::Poll::Ready(())
                })
                .await;
                panic!("another request of this task panicked");
            }
        });
        assert!(caller.await.unwrap_err().is_panic());
        release.send(()).unwrap();
        let repeat = recent.once(id, async { Ok(written(12)) }).await.unwrap();
        assert_eq!(repeat, Outcome::Repeated(written(11)));
    }

    #[tokio::test]
    async fn a_write_that_panics_is_forgotten() {
        let recent = Arc::new(RecentWrites::default());
        let id = RequestId([6; 16]);
        let caller = tokio::spawn({
            let recent = recent.clone();
            async move {
                recent
                    .once(id, async {
                        let panics = true;
                        assert!(!panics, "the write panicked");
                        Ok(written(13))
                    })
                    .await
            }
        });
        assert!(caller.await.unwrap_err().is_panic());
        let again = recent.once(id, async { Ok(written(14)) }).await.unwrap();
        assert_eq!(again, Outcome::Made(written(14)));
    }
}
