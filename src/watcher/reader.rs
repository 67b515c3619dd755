//! Reading a watched source off the runtime, in bounded time.
//!
//! Owns: [`Reader`], one thread per source that does that source's blocking reads, the deadline
//! a check waits for one ([`READ_TIMEOUT`]), and remembering a read that overran it so later
//! checks neither wait for it again nor pile more reads behind it.
//! Must not touch: what is read or what a read means (the parent module and `certs`).
//!
//! Reads never block on a FIFO or a device (`config::source_file`), but a file system can
//! still stop answering (a hung network mount): then that source is reported as stuck while the
//! others go on being watched. The threads are ours rather than `spawn_blocking`'s because a
//! runtime waits for its blocking tasks when it shuts down: a read that never returns would
//! keep SIGTERM from ending the process, while a thread of our own is simply left at exit.

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::sync::lock;

/// How long a check waits for one read of a source before it reports the source as stuck.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a [`Reader`] has no result.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    /// The read has not returned within `timeout` (the same text on every check while it
    /// hangs, so it is reported once).
    #[error(
        "a read of it has not returned within {timeout:?} (a file system that does not \
         answer?); nothing changes, and it is read again once that read returns"
    )]
    Stuck { timeout: Duration },
    /// No thread could be started for the read: the process is short of threads or memory.
    #[error("cannot start a thread to read it: {0}")]
    NoThread(#[source] std::io::Error),
    #[error("the read panicked")]
    Panicked,
}

type Job<T> = Box<dyn FnOnce() -> T + Send>;

struct Inner<T> {
    /// The source's thread, started on the first read (and again if a read panicked it away).
    jobs: Option<std_mpsc::Sender<(Job<T>, oneshot::Sender<T>)>>,
    /// A read that overran [`READ_TIMEOUT`], and since when it runs.
    overdue: Option<(oneshot::Receiver<T>, Instant)>,
}

/// Reads one source on its own thread; cheap to clone (clones share the thread).
pub(super) struct Reader<T> {
    name: &'static str,
    timeout: Duration,
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T> Clone for Reader<T> {
    fn clone(&self) -> Self {
        Reader {
            name: self.name,
            timeout: self.timeout,
            inner: self.inner.clone(),
        }
    }
}

impl<T: Send + 'static> Reader<T> {
    /// A reader for the source `name` (names its thread), waiting [`READ_TIMEOUT`] for a read.
    pub(super) fn new(name: &'static str) -> Reader<T> {
        Reader::with_timeout(name, READ_TIMEOUT)
    }

    pub(super) fn with_timeout(name: &'static str, timeout: Duration) -> Reader<T> {
        Reader {
            name,
            timeout,
            inner: Arc::new(Mutex::new(Inner {
                jobs: None,
                overdue: None,
            })),
        }
    }

    /// Runs `job` on the source's thread and waits for it, at most the reader's timeout. While an
    /// earlier read is still overdue, answers [`ReadError::Stuck`] at once and runs nothing.
    pub(super) async fn read(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ReadError> {
        let mut rx = {
            let mut inner = lock(&self.inner);
            if let Some((rx, since)) = inner.overdue.as_mut() {
                match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {
                        tracing::debug!(source = self.name, waited = ?since.elapsed(), "a read is still overdue");
                        return Err(ReadError::Stuck {
                            timeout: self.timeout,
                        });
                    }
                    // It returned at last (or died): its content is old by now, so read anew.
                    Ok(_) | Err(oneshot::error::TryRecvError::Closed) => inner.overdue = None,
                }
            }
            let (reply, rx) = oneshot::channel();
            inner.submit(self.name, Box::new(job), reply)?;
            rx
        };
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, &mut rx).await {
            Ok(Ok(value)) => Ok(value),
            // The thread went away with the job: only a panic does that. It may not have
            // dropped its end of the job channel yet, so the next read must not hand it a job.
            Ok(Err(_)) => {
                lock(&self.inner).jobs = None;
                Err(ReadError::Panicked)
            }
            Err(_) => {
                lock(&self.inner).overdue = Some((rx, started));
                Err(ReadError::Stuck {
                    timeout: self.timeout,
                })
            }
        }
    }
}

impl<T: Send + 'static> Inner<T> {
    /// Hands `job` to the thread, starting it when there is none (or the last one died).
    fn submit(
        &mut self,
        name: &'static str,
        job: Job<T>,
        reply: oneshot::Sender<T>,
    ) -> Result<(), ReadError> {
        let job = match &self.jobs {
            Some(jobs) => match jobs.send((job, reply)) {
                Ok(()) => return Ok(()),
                Err(std_mpsc::SendError(back)) => back,
            },
            None => (job, reply),
        };
        let (tx, rx) = std_mpsc::channel::<(Job<T>, oneshot::Sender<T>)>();
        std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || {
                // Ends when the watcher (every sender) is gone.
                while let Ok((job, reply)) = rx.recv() {
                    let _ = reply.send(job());
                }
            })
            .map_err(ReadError::NoThread)?;
        // Cannot fail: the thread holds the receiver until every sender is gone.
        let _ = tx.send(job);
        self.jobs = Some(tx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SHORT: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn a_read_returns_its_value() {
        let reader = Reader::with_timeout("test", SHORT);
        assert_eq!(reader.read(|| 7).await.ok(), Some(7));
        assert_eq!(reader.clone().read(|| 8).await.ok(), Some(8));
    }

    /// Opens a FIFO for writing when dropped, which releases a read blocked on it (also when the
    /// test fails before it does so itself); without a reader the open just fails.
    struct Unblock(std::path::PathBuf);

    impl Drop for Unblock {
        fn drop(&mut self) {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }

    /// A read that really blocks: a blocking open of a FIFO no writer has opened yet (what the
    /// watcher did before it opened files without blocking).
    #[tokio::test]
    async fn a_read_that_does_not_return_is_reported_once_and_not_piled_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("lb.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .map(|s| s.success());
        assert!(matches!(made, Ok(true)), "mkfifo");
        let _unblock = Unblock(fifo.clone());
        let reader = Reader::with_timeout("test", SHORT);
        let runs = Arc::new(AtomicUsize::new(0));
        let blocking = {
            let (fifo, runs) = (fifo.clone(), runs.clone());
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
                std::fs::read(&fifo).map_err(|e| e.to_string())
            }
        };
        let started = Instant::now();
        let first = reader.read(blocking.clone()).await;
        assert!(matches!(first, Err(ReadError::Stuck { .. })), "{first:?}");
        assert!(
            started.elapsed() < SHORT * 5,
            "waited {:?}",
            started.elapsed()
        );
        // While it hangs, a check gets its answer at once and starts no second read.
        let again = Instant::now();
        let second = reader.read(blocking.clone()).await;
        assert!(matches!(second, Err(ReadError::Stuck { .. })), "{second:?}");
        assert!(again.elapsed() < SHORT, "waited {:?}", again.elapsed());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // A writer comes and goes: the hung read returns, and the next read is a fresh one.
        std::fs::write(&fifo, "x").expect("write to the FIFO");
        let deadline = Instant::now() + Duration::from_secs(5);
        let third = loop {
            match reader.read(|| Ok(b"fresh".to_vec())).await {
                Err(ReadError::Stuck { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => break other,
            }
        };
        assert_eq!(third.ok(), Some(Ok(b"fresh".to_vec())));
    }

    #[tokio::test]
    async fn a_read_that_panics_is_an_error_and_the_next_read_gets_a_new_thread() {
        let reader = Reader::with_timeout("test", Duration::from_secs(5));
        let panicked = reader.read(|| -> u32 { panic!("a bug in a read") }).await;
        assert!(matches!(panicked, Err(ReadError::Panicked)), "{panicked:?}");
        assert_eq!(reader.read(|| 3).await.ok(), Some(3));
    }
}
