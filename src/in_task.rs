//! Futures that belong to one HTTP/2 connection to a replica, handed over from the requests'
//! tasks and run in the connection's own task instead of tasks of their own.
//!
//! Owns: [`InTask`], the handle a request hands a future over with ([`InTask::spawn`]), and
//! [`Tasks`], the set the connection's task runs them in, each future woken on its own
//! ([`FuturesUnordered`]). What is handed over: a request body still arriving from its client,
//! piped on to the replica. A tokio task costs an aligned allocation (`posix_memalign`, about
//! 1,250 instructions here), moves of the future into and out of its cell and a trip through
//! the scheduler; a future in the set costs two plain allocations. A serving thread's runtime
//! runs one thread, so nothing runs less in parallel.
//! Must not touch: what the futures do, or the connection's own future.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

use crate::sync::lock;

/// A future handed over.
type Spawned = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where futures are handed to one connection: what it is given runs in its [`Tasks`].
#[derive(Clone, Default)]
pub(crate) struct InTask(Arc<Mutex<Handed>>);

#[derive(Default)]
struct Handed {
    futures: Vec<Spawned>,
    /// The connection's task is polling: what is handed over meanwhile is taken before it
    /// rests, without waking it again.
    polling: bool,
    /// The connection's task, to wake when a future is handed over while it rests.
    waker: Option<Waker>,
}

impl InTask {
    /// Runs `future` in the connection's task (woken, if it rests).
    pub(crate) fn spawn(&self, future: impl Future<Output = ()> + Send + 'static) {
        let mut handed = lock(&self.0);
        handed.futures.push(Box::pin(future));
        if !handed.polling {
            if let Some(waker) = &handed.waker {
                waker.wake_by_ref();
            }
        }
    }
}

/// The futures one connection's task runs for it.
#[derive(Default)]
pub(crate) struct Tasks {
    handed: InTask,
    running: FuturesUnordered<Spawned>,
}

impl Tasks {
    /// The handle futures are handed over with.
    pub(crate) fn executor(&self) -> InTask {
        self.handed.clone()
    }

    /// The connection's task began a poll: what is handed over until [`Tasks::run`] is run
    /// there, without a wake.
    pub(crate) fn begin(&self) {
        lock(&self.handed.0).polling = true;
    }

    /// Runs what was handed over until each future waits (or it is the runtime's turn); the
    /// task is woken for the next one handed over. `true` while any is left.
    pub(crate) fn run(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let handed = std::mem::take(&mut lock(&self.handed.0).futures);
            self.running.extend(handed);
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
            // What the futures just polled handed over is run in the same turn.
            let mut handed = lock(&self.handed.0);
            if !handed.futures.is_empty() {
                continue;
            }
            handed.polling = false;
            if !handed
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                handed.waker = Some(cx.waker().clone());
            }
            return !self.running.is_empty();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A connection's future polled with its set, as a connection's task does.
    async fn with_tasks(conn: impl Future<Output = ()>, mut tasks: Tasks) {
        let mut conn = std::pin::pin!(conn);
        std::future::poll_fn(|cx| {
            tasks.begin();
            let polled = conn.as_mut().poll(cx);
            tasks.run(cx);
            polled
        })
        .await
    }

    #[tokio::test]
    async fn handed_futures_run_in_the_connections_task_each_woken_on_its_own() {
        let tasks = Tasks::default();
        let exec = tasks.executor();
        let ran = Arc::new(AtomicUsize::new(0));
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (all_ran, ended) = tokio::sync::mpsc::unbounded_channel::<()>();
        // The "connection" hands over a future that waits for `go`, and one that hands over
        // another in turn; it ends once the three ran.
        let conn = {
            let ran = ran.clone();
            async move {
                let (r, t) = (ran.clone(), all_ran.clone());
                exec.spawn(async move {
                    let _ = wait.await;
                    r.fetch_add(1, Ordering::Relaxed);
                    let _ = t.send(());
                });
                let (inner, r, t) = (exec.clone(), ran.clone(), all_ran.clone());
                exec.spawn(async move {
                    let (r2, t2) = (r.clone(), t.clone());
                    inner.spawn(async move {
                        r2.fetch_add(1, Ordering::Relaxed);
                        let _ = t2.send(());
                    });
                    r.fetch_add(1, Ordering::Relaxed);
                    let _ = t.send(());
                });
                let mut ended = ended;
                for _ in 0..3 {
                    ended.recv().await;
                }
            }
        };
        let driven = tokio::spawn(with_tasks(conn, tasks));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(ran.load(Ordering::Relaxed), 2, "two ran; one waits");
        assert!(!driven.is_finished());
        go.send(()).expect("waiting");
        tokio::time::timeout(Duration::from_secs(5), driven)
            .await
            .expect("the connection ends once all three ran")
            .expect("joined");
        assert_eq!(ran.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_future_handed_over_from_elsewhere_wakes_the_resting_task() {
        let tasks = Tasks::default();
        let exec = tasks.executor();
        let conn = std::future::pending::<()>();
        let driven = tokio::spawn(with_tasks(conn, tasks));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        exec.spawn(async move {
            let _ = tx.send(());
        });
        tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("run within 5 s")
            .expect("sent");
        driven.abort();
    }
}
