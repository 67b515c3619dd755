//! The access log's writer thread: the only place that touches the log file or stdout.
//!
//! Owns: the open destination, batches in arrival order, reopening on request (SIGHUP, for
//! logrotate) and on a change of `log.access`, and counting what was written, dropped or failed.
//! Must not touch: formatting or the serving threads; it only receives finished batches.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AccessTarget;
use crate::metrics::Metrics;

/// Messages to the writer.
pub(super) enum Msg {
    /// Finished lines for `target`, `records` of them.
    Batch {
        target: AccessTarget,
        bytes: Vec<u8>,
        records: u64,
    },
    /// Close the file; the next batch opens its path again (logrotate moved it away).
    Reopen,
    /// Everything before this is written: stop.
    Close,
}

enum Sink {
    Stdout,
    File(File),
}

impl Sink {
    fn open(target: &AccessTarget) -> std::io::Result<Sink> {
        match target {
            AccessTarget::Stdout => Ok(Sink::Stdout),
            AccessTarget::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Sink::File),
            AccessTarget::Off => Err(std::io::Error::other("the access log is off")),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(f) => f.write_all(bytes),
        }
    }
}

/// Error logs at most this often, so a full disk does not flood the gateway's own log.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) fn run(rx: Receiver<Msg>, metrics: Arc<Metrics>) {
    let mut current: Option<(AccessTarget, Sink)> = None;
    let mut last_error_log: Option<Instant> = None;
    while let Ok(msg) = rx.recv() {
        let (target, bytes, records) = match msg {
            Msg::Batch {
                target,
                bytes,
                records,
            } => (target, bytes, records),
            Msg::Reopen => {
                if current.take().is_some() {
                    tracing::info!("access log closed; reopening with the next line (SIGHUP)");
                }
                continue;
            }
            Msg::Close => break,
        };
        if current.as_ref().is_some_and(|(t, _)| *t != target) {
            current = None;
        }
        let result = match &mut current {
            Some((_, sink)) => sink.write(&bytes),
            None => Sink::open(&target).and_then(|mut sink| {
                let written = sink.write(&bytes);
                current = Some((target.clone(), sink));
                written
            }),
        };
        match result {
            Ok(()) => {
                metrics
                    .access_log_records
                    .fetch_add(records, Ordering::Relaxed);
            }
            Err(e) => {
                metrics
                    .access_log_errors
                    .fetch_add(records, Ordering::Relaxed);
                // Open it again next time: the problem may be gone (disk space, a directory).
                current = None;
                if last_error_log.is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY) {
                    tracing::error!(target = %target, error = %e, records, "cannot write the access log; these lines are lost");
                    last_error_log = Some(Instant::now());
                }
            }
        }
    }
}
