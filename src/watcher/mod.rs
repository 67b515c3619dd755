//! Live reload: watches the config file, the policy directory and the TLS certificate and key
//! files, and hands validated changes on.
//!
//! Owns: noticing edits (notify events, debounced; plus a once-a-second content check so bind
//! mounts, symlink swaps and file systems without inotify are covered too), waiting until an
//! edited file is complete, reading and validating the new config, loading the new policy set,
//! and validating a new certificate set. Only this module imports notify.
//! Must not touch: running state. It sends `Reload`, `PolicyLoaded` or `ReloadFailed` to the
//! controller, which applies or records them, and hands a validated certificate set to
//! [`Tls::apply`] (or its error to [`Tls::reject`]); an invalid edit therefore changes nothing.
//!
//! # Certificates
//!
//! A certificate and its key are two files, replaced one after the other: in between, the key
//! does not match the certificate. Such a mismatch is waited out for two seconds
//! (`certs::MISMATCH_GRACE`) before it is reported (the old pair serves meanwhile); any other
//! problem is reported at once. The certificate side lives in [`certs`].
//!
//! # Half-written files are never applied
//!
//! An edit applies only once it is *settled*: two reads [`SETTLE`] apart agree, and no writer
//! holds one of the files open (inotify reports a write without its close). A slow writer's
//! intermediate states are therefore never applied: not while it pauses with the file open, and
//! not while its content still changes between reads. After [`MAX_SETTLE`] of either, a file
//! whose content holds still is trusted (a writer that keeps a config open that long, or a close
//! event the kernel dropped), and one that keeps changing is reported and retried later.
//! An empty config is an error (see `config::load`), and a policy file that had content and is
//! now empty is taken as cut off and rejected. What no reader can prove is a file cut exactly at
//! a line end while its writer has closed it: `docs/policies.md` ("Editing safely") recommends
//! writing a new file and renaming it over the old one, which this watcher sees as one complete
//! change (it watches directories, so the replaced inode does not matter).
//!
//! # Reads that cannot hang, and failures that are the gateway's own
//!
//! Files are read through `config::source_file`: regular files only, opened without blocking,
//! capped in size, so a FIFO or a device at a watched path is an error shown in `/lb/status`
//! (nothing changes), never a read that waits for a writer. Each source is read on its own
//! thread ([`reader`]) and a check waits at most `reader::READ_TIMEOUT` for it: a file system
//! that stops answering makes that source an error while the others are still watched, and it
//! cannot keep SIGTERM from ending the process.
//! A read that fails because the gateway itself is out of descriptors (EMFILE, ENFILE) says
//! nothing about the file: it is logged once as a warning and retried at the next check, never
//! reported as a rejected edit. A source whose read error was shown and that reads again as
//! before is applied again, which clears the error.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use std::sync::Arc;

use crate::config::source_file::is_local_resource;
use crate::config::{Config, ConfigError};
use crate::control::{Command, ControllerHandle, ReloadKind};
use crate::policy::{read_policy_files, PolicyError, PolicyFiles, PolicyLimits, PolicySet};
use crate::tls::Tls;

mod certs;
mod reader;
use certs::{CertFiles, CertWatch};
use reader::{ReadError, Reader};

/// Quiet time after an event before the first read, so a burst of events is read once.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// Two reads this far apart must agree before an edit applies.
const SETTLE: Duration = Duration::from_millis(200);
/// How long an edit may stay unsettled (changing, or open for writing) before the watcher stops
/// waiting for it: it then trusts content that holds still, or reports one that keeps changing.
const MAX_SETTLE: Duration = Duration::from_secs(10);
/// The safety-net content check.
const POLL: Duration = Duration::from_secs(1);

/// Why a source could not be read (the typed errors underneath are the readers'; a read is kept
/// as text so two reads can be compared and the error sent on as it is shown).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ReadFailure {
    /// The gateway's own shortage (out of descriptors, no thread for the read). It says nothing
    /// about the file: nothing is reported or changed, and the next check reads again.
    Local(String),
    /// The file cannot be read as it stands (missing, unreadable, not a regular file, too large,
    /// a read that does not return): reported as the source's error.
    File(String),
}

impl ReadFailure {
    /// `what` could not be read because its [`Reader`] has no result.
    fn unread(what: &str, e: ReadError) -> ReadFailure {
        let text = format!("cannot read {what}: {e}");
        match e {
            ReadError::NoThread(_) => ReadFailure::Local(text),
            ReadError::Stuck { .. } | ReadError::Panicked => ReadFailure::File(text),
        }
    }

    fn message(&self) -> &str {
        match self {
            ReadFailure::Local(m) | ReadFailure::File(m) => m,
        }
    }
}

/// One read of a source: its content, or why there is none.
type Read<T> = Result<T, ReadFailure>;

/// How waiting for an edit to settle ended.
#[derive(Debug)]
enum Settling<T> {
    Settled(T),
    /// Still changing after [`MAX_SETTLE`]: reported, retried on a later check.
    KeptChanging,
    /// A read failed for the gateway's own shortage: nothing is decided, the next check retries.
    ShortOfResources,
}

/// What one more read says about an edit in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Same content as the read before and nobody writing: apply it.
    Settled,
    /// Read again after [`SETTLE`].
    Wait,
    /// Still changing after [`MAX_SETTLE`]: report it and retry on a later check.
    Unsettled,
}

/// Decides an edit in progress from two consecutive reads, whether a writer still holds the file
/// open, and how long the edit has been waited for.
fn verdict<T: PartialEq>(previous: &T, next: &T, writer_open: bool, waited: Duration) -> Verdict {
    let same = previous == next;
    if same && !writer_open {
        Verdict::Settled
    } else if waited < MAX_SETTLE {
        Verdict::Wait
    } else if same {
        // Open for writing all this time but unchanged: a writer that keeps it open, or a close
        // event that was lost. Content that held still for MAX_SETTLE is what the writer meant.
        Verdict::Settled
    } else {
        Verdict::Unsettled
    }
}

/// Files a writer has opened for writing and not closed yet, as inotify reports them: a data
/// change or a creation opens the entry, a close-after-write, a removal or a rename closes it.
#[derive(Debug, Default)]
struct OpenWrites {
    paths: HashSet<PathBuf>,
}

impl OpenWrites {
    fn note(&mut self, event: &Event) {
        match event.kind {
            EventKind::Create(CreateKind::File | CreateKind::Any)
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) => {
                self.paths.extend(event.paths.iter().cloned());
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_)) => {
                for p in &event.paths {
                    self.paths.remove(p);
                }
            }
            _ => {}
        }
    }

    /// Whether any open file matches `which`.
    fn any(&self, which: impl Fn(&Path) -> bool) -> bool {
        self.paths.iter().any(|p| which(p))
    }

    /// Forgets the open files matching `which` (after trusting their settled content).
    fn forget(&mut self, which: impl Fn(&Path) -> bool) {
        self.paths.retain(|p| !which(p));
    }

    fn clear(&mut self) {
        self.paths.clear();
    }
}

/// Events that say something about content. Our own reads (open, close-without-write) are not:
/// without this filter every check would trigger the next.
fn is_relevant(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Any
                | AccessKind::Other
                | AccessKind::Close(AccessMode::Read | AccessMode::Execute | AccessMode::Any)
        )
    )
}

/// A policy file's content that is gone: a file of the last seen set that had content and is now
/// empty (or only whitespace). Such a file is cut off, not finished; deleting it is how its hooks
/// are removed.
fn emptied_policy_file<'a>(last: Option<&PolicyFiles>, now: &'a PolicyFiles) -> Option<&'a str> {
    now.iter()
        .filter(|(_, source)| source.trim().is_empty())
        .find(|(name, _)| {
            last.into_iter()
                .flatten()
                .any(|(n, s)| n == name && !s.trim().is_empty())
        })
        .map(|(name, _)| name.as_str())
}

/// One of the watched sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Config,
    Policy,
    Certificates,
}

struct State {
    /// The config file as the gateway was given it (read through it, named in errors).
    config_path: Option<PathBuf>,
    policy_dir: PathBuf,
    /// The same two in the form notify names them in events (canonical directories).
    config_event_path: Option<PathBuf>,
    policy_event_dir: PathBuf,
    limits: PolicyLimits,
    loaded_limits: PolicyLimits,
    /// The last settled read of the config file (its text, or why it cannot be read; never a
    /// [`ReadFailure::Local`]).
    last_config: Option<Read<String>>,
    last_files: Option<PolicyFiles>,
    /// The last settled read error of the policy directory, so it is reported once.
    last_policy_error: Option<String>,
    generation: u64,
    events: mpsc::UnboundedReceiver<Event>,
    open_writes: OpenWrites,
    /// Sources whose "still changing" was already reported (reported once per episode).
    reported_unsettled: Vec<Source>,
    /// Sources whose reads fail for the gateway's own shortage (warned once per episode).
    short_of_resources: Vec<Source>,
    config_reader: Reader<Result<String, ConfigError>>,
    policy_reader: Reader<Result<PolicyFiles, PolicyError>>,
    certs: Option<CertWatch>,
}

/// Starts watching. `initial_files` are the policy files the gateway started with (so they are
/// not loaded twice); `config_text` the config text it started with.
/// `tls` is the gateway's TLS termination when TLS is on: its certificate files are watched
/// too.
pub fn spawn(
    config_path: Option<PathBuf>,
    config_text: Option<String>,
    config: &Config,
    initial_files: Option<PolicyFiles>,
    controller: ControllerHandle,
    tls: Option<Arc<Tls>>,
) -> tokio::task::JoinHandle<()> {
    let (tx, events) = mpsc::unbounded_channel();
    let state = State {
        config_event_path: config_path.clone(),
        config_path,
        policy_event_dir: config.policy.dir.clone(),
        policy_dir: config.policy.dir.clone(),
        limits: config.policy.limits(),
        loaded_limits: config.policy.limits(),
        last_config: config_text.map(Ok),
        last_files: initial_files,
        last_policy_error: None,
        generation: 1,
        events,
        open_writes: OpenWrites::default(),
        reported_unsettled: Vec::new(),
        short_of_resources: Vec::new(),
        config_reader: Reader::new("config"),
        policy_reader: Reader::new("policy"),
        certs: tls.map(|tls| CertWatch {
            last: Some(Ok(tls.started_with().to_vec())),
            tls,
            files: CertFiles::new(config.tls.certificates.clone()),
            mismatch_since: None,
            watched: Vec::new(),
            reader: Reader::new("certs"),
        }),
    };
    tokio::spawn(run(state, tx, controller))
}

/// The directory to watch for `path`, in the form notify reports event paths in.
fn watch_dir(path: &Path) -> PathBuf {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.canonicalize().unwrap_or_else(|_| dir.to_owned())
}

async fn run(mut state: State, tx: mpsc::UnboundedSender<Event>, controller: ControllerHandle) {
    let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| match res {
        Ok(event) if is_relevant(&event.kind) => {
            let _ = tx.send(event);
        }
        Ok(_) => {}
        // Events were lost (e.g. the inotify queue overflowed): what is open is unknown now.
        Err(_) => {
            let _ = tx.send(Event::new(EventKind::Other));
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "file notifications unavailable; checking for edits every second");
            None
        }
    };
    if let (Some(w), Some(path)) = (watcher.as_mut(), state.config_path.as_ref()) {
        // The directory, not the file: editors that save by writing a new file and renaming it
        // over the old one replace the inode a file watch would be attached to.
        let dir = watch_dir(path);
        if let Err(e) = w.watch(&dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the config directory");
        }
        if let Some(name) = path.file_name() {
            state.config_event_path = Some(dir.join(name));
        }
    }
    let mut watching_policy_dir = false;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let (Some(w), Some(certs)) = (watcher.as_mut(), state.certs.as_mut()) {
            for dir in &certs.files.dirs {
                if !certs.watched.contains(dir) {
                    // Marked as watched even when it fails: the once-a-second check covers it.
                    if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a certificate directory; checking it every second");
                    }
                    certs.watched.push(dir.clone());
                }
            }
        }
        if !watching_policy_dir {
            if let Some(w) = watcher.as_mut() {
                let dir = state.policy_dir.canonicalize().unwrap_or_default();
                if !dir.as_os_str().is_empty() && w.watch(&dir, RecursiveMode::NonRecursive).is_ok()
                {
                    state.policy_event_dir = dir;
                    watching_policy_dir = true;
                }
            }
        }
        tokio::select! {
            ev = state.events.recv() => {
                let Some(ev) = ev else {
                    watcher = None;
                    watching_policy_dir = true;
                    continue;
                };
                state.note(&ev);
                if !state.concerns_a_source(&ev) {
                    // A file beside the watched ones (an access log kept next to the config
                    // writes many times a second): no read, the once-a-second check stays.
                    continue;
                }
                tokio::time::sleep(DEBOUNCE).await;
                state.drain_events();
            }
            _ = poll.tick() => {}
        }
        if !state.check(&controller).await {
            return;
        }
    }
}

/// Whether `p` is the config file (for [`Source::Config`]), a policy file (`*.lua` directly in
/// the policy directory, not hidden) for [`Source::Policy`], or one of `certs` for
/// [`Source::Certificates`].
fn is_source_file(
    config_path: Option<&Path>,
    policy_dir: &Path,
    certs: &[PathBuf],
    source: Source,
    p: &Path,
) -> bool {
    match source {
        Source::Config => config_path == Some(p),
        Source::Certificates => certs.iter().any(|c| c == p),
        Source::Policy => {
            p.parent() == Some(policy_dir)
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".lua") && !n.starts_with('.'))
        }
    }
}

/// Whether an event can be about a watched source: one of its paths is a watched file (the
/// config, a certificate or key), is the policy directory or in it, or is a name beginning with
/// `..` in the directory of a watched file (a symlink swap, as Kubernetes does it, names
/// `..data`, not the file); or it names no path (the kernel dropped events: anything may have
/// changed).
fn concerns_a_source(files: &[&Path], policy_dir: &Path, paths: &[PathBuf]) -> bool {
    if paths.is_empty() {
        return true;
    }
    paths.iter().any(|p| {
        let swap = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."));
        files.contains(&p.as_path())
            || p == policy_dir
            || p.parent() == Some(policy_dir)
            || (swap && files.iter().any(|f| f.parent() == p.parent()))
    })
}

async fn read_config(reader: Reader<Result<String, ConfigError>>, path: PathBuf) -> Read<String> {
    let what = path.display().to_string();
    match reader.read(move || Config::read_text(&path)).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) if e.is_local_resource() => Err(ReadFailure::Local(e.to_string())),
        Ok(Err(e)) => Err(ReadFailure::File(e.to_string())),
        Err(e) => Err(ReadFailure::unread(&what, e)),
    }
}

/// A policy directory or file that could not be read for the process's shortage of descriptors.
fn policy_read_is_local(e: &PolicyError) -> bool {
    match e {
        PolicyError::ReadDir { source, .. } | PolicyError::ReadFile { source, .. } => {
            is_local_resource(source)
        }
        _ => false,
    }
}

async fn read_policies(
    reader: Reader<Result<PolicyFiles, PolicyError>>,
    dir: PathBuf,
) -> Read<PolicyFiles> {
    let what = format!("the policy files in {}", dir.display());
    match reader.read(move || read_policy_files(&dir)).await {
        Ok(Ok(files)) => Ok(files),
        Ok(Err(e)) if policy_read_is_local(&e) => Err(ReadFailure::Local(e.to_string())),
        Ok(Err(e)) => Err(ReadFailure::File(e.to_string())),
        Err(e) => Err(ReadFailure::unread(&what, e)),
    }
}

impl State {
    fn note(&mut self, event: &Event) {
        if event.kind == EventKind::Other && event.paths.is_empty() {
            self.open_writes.clear();
            return;
        }
        self.open_writes.note(event);
        // Only the watched files matter (a log kept open beside the config does not).
        let (config, dir) = (&self.config_event_path, &self.policy_event_dir);
        let certs = self
            .certs
            .as_ref()
            .map_or(&[][..], |c| c.files.event_paths.as_slice());
        self.open_writes.forget(|p| {
            [Source::Config, Source::Policy, Source::Certificates]
                .into_iter()
                .all(|s| !is_source_file(config.as_deref(), dir, certs, s, p))
        });
    }

    fn cert_event_paths(&self) -> &[PathBuf] {
        self.certs
            .as_ref()
            .map_or(&[], |c| c.files.event_paths.as_slice())
    }

    fn concerns_a_source(&self, event: &Event) -> bool {
        let files: Vec<&Path> = self
            .config_event_path
            .iter()
            .chain(self.cert_event_paths())
            .map(PathBuf::as_path)
            .collect();
        concerns_a_source(&files, &self.policy_event_dir, &event.paths)
    }

    fn drain_events(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            self.note(&ev);
        }
    }

    fn is_source_file(&self, source: Source, p: &Path) -> bool {
        is_source_file(
            self.config_event_path.as_deref(),
            &self.policy_event_dir,
            self.cert_event_paths(),
            source,
            p,
        )
    }

    fn writer_open(&self, source: Source) -> bool {
        self.open_writes.any(|p| self.is_source_file(source, p))
    }

    /// Whether a writer may still be writing what `read` got. Only content can be half-written:
    /// a path that cannot be read (missing, a FIFO) has nothing to wait out, and creating a
    /// FIFO looks to inotify like a file opened for writing that is never closed.
    fn writing<T>(&self, source: Source, read: &Read<T>) -> bool {
        read.is_ok() && self.writer_open(source)
    }

    /// True when `read` failed for the gateway's own shortage, which is warned about once and
    /// otherwise ignored (the caller retries at the next check, nothing changes); also notes
    /// the end of such an episode.
    fn short_of_resources<T>(&mut self, source: Source, read: &Read<T>) -> bool {
        let short = self.short_of_resources.contains(&source);
        match read {
            Err(ReadFailure::Local(why)) => {
                if !short {
                    tracing::warn!(source = ?source, error = %why, "cannot read a watched file for now: the gateway is short of descriptors; nothing changes, retrying at the next check");
                    self.short_of_resources.push(source);
                }
                true
            }
            _ => {
                if short {
                    tracing::info!(source = ?source, "a watched file can be read again");
                    self.short_of_resources.retain(|s| *s != source);
                }
                false
            }
        }
    }

    /// Reads a source until it settles (see [`verdict`]), starting from `first`.
    async fn settle<T: PartialEq, F: Future<Output = Read<T>>>(
        &mut self,
        source: Source,
        first: Read<T>,
        mut read: impl FnMut() -> F,
    ) -> Settling<Read<T>> {
        let started = Instant::now();
        let mut previous = first;
        loop {
            tokio::time::sleep(SETTLE).await;
            self.drain_events();
            let next = read().await;
            if self.short_of_resources(source, &next) {
                return Settling::ShortOfResources;
            }
            let writer_open = self.writing(source, &next);
            match verdict(&previous, &next, writer_open, started.elapsed()) {
                Verdict::Settled => {
                    if writer_open {
                        tracing::warn!(source = ?source, waited = ?started.elapsed(), "a file stayed open for writing but unchanged; applying its content");
                        let (config, dir) = (&self.config_event_path, &self.policy_event_dir);
                        let certs = self
                            .certs
                            .as_ref()
                            .map_or(&[][..], |c| c.files.event_paths.as_slice());
                        self.open_writes
                            .forget(|p| is_source_file(config.as_deref(), dir, certs, source, p));
                    }
                    self.reported_unsettled.retain(|s| *s != source);
                    return Settling::Settled(next);
                }
                Verdict::Wait => previous = next,
                Verdict::Unsettled => return Settling::KeptChanging,
            }
        }
    }

    /// Reports once that `source` keeps changing. Returns false once the controller is gone.
    async fn report_unsettled(&mut self, source: Source, controller: &ControllerHandle) -> bool {
        if self.reported_unsettled.contains(&source) {
            return true;
        }
        self.reported_unsettled.push(source);
        let what = match source {
            Source::Config => self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            Source::Policy => format!("the policy files in {}", self.policy_dir.display()),
            Source::Certificates => "the TLS certificate and key files".to_owned(),
        };
        let error = format!(
            "{what} kept changing for {MAX_SETTLE:?}: not applied until it holds still for {SETTLE:?} \
             (write the new version to a temporary file and rename it over the old one)"
        );
        let what = match source {
            Source::Config => ReloadKind::Config,
            Source::Policy => ReloadKind::Policy,
            Source::Certificates => {
                if let Some(c) = &self.certs {
                    c.tls.reject(&error);
                }
                return true;
            }
        };
        controller.send(Command::ReloadFailed { what, error }).await
    }

    /// Reads both sources and reports what changed. Returns false once the controller is gone.
    async fn check(&mut self, controller: &ControllerHandle) -> bool {
        self.check_config(controller).await
            && self.check_policy(controller).await
            && self.check_certs(controller).await
    }

    async fn check_config(&mut self, controller: &ControllerHandle) -> bool {
        let Some(path) = self.config_path.clone() else {
            return true;
        };
        let reader = self.config_reader.clone();
        let first = read_config(reader.clone(), path.clone()).await;
        if self.short_of_resources(Source::Config, &first) {
            return true;
        }
        if self.last_config.as_ref() == Some(&first) && !self.writing(Source::Config, &first) {
            return true;
        }
        let read = match self
            .settle(Source::Config, first, || {
                read_config(reader.clone(), path.clone())
            })
            .await
        {
            Settling::Settled(read) => read,
            Settling::KeptChanging => {
                return self.report_unsettled(Source::Config, controller).await
            }
            Settling::ShortOfResources => return true,
        };
        if self.last_config.as_ref() == Some(&read) {
            return true;
        }
        let cmd = match &read {
            Ok(text) => match Config::parse(text, &path) {
                Ok(config) => {
                    self.limits = config.policy.limits();
                    // A new certificate list (TLS stays on; turning it on or off needs a
                    // restart, which the controller reports): read and apply it next.
                    if let Some(certs) = self.certs.as_mut() {
                        if config.tls.enabled && config.tls.certificates != certs.files.pairs {
                            certs.files = CertFiles::new(config.tls.certificates.clone());
                            certs.last = None;
                        }
                    }
                    Command::Reload {
                        config: Box::new(config),
                    }
                }
                Err(e) => Command::ReloadFailed {
                    what: ReloadKind::Config,
                    error: e.to_string(),
                },
            },
            Err(failure) => Command::ReloadFailed {
                what: ReloadKind::Config,
                error: failure.message().to_owned(),
            },
        };
        self.last_config = Some(read);
        controller.send(cmd).await
    }

    async fn check_policy(&mut self, controller: &ControllerHandle) -> bool {
        let dir = self.policy_dir.clone();
        let reader = self.policy_reader.clone();
        let first = read_policies(reader.clone(), dir.clone()).await;
        if self.short_of_resources(Source::Policy, &first) {
            return true;
        }
        // The files as they were are not "unchanged" while a read error is shown for them: the
        // error has to go.
        let unchanged = match &first {
            Ok(files) => {
                self.last_policy_error.is_none() && self.last_files.as_ref() == Some(files)
            }
            Err(e) => self.last_policy_error.as_deref() == Some(e.message()),
        };
        let limits_changed = self.limits != self.loaded_limits;
        if unchanged && !limits_changed && !self.writing(Source::Policy, &first) {
            return true;
        }
        let read = if unchanged {
            first
        } else {
            match self
                .settle(Source::Policy, first, || {
                    read_policies(reader.clone(), dir.clone())
                })
                .await
            {
                Settling::Settled(read) => read,
                Settling::KeptChanging => {
                    return self.report_unsettled(Source::Policy, controller).await
                }
                Settling::ShortOfResources => return true,
            }
        };
        let files = match read {
            Ok(files) => files,
            Err(failure) => {
                let error = failure.message().to_owned();
                if self.last_policy_error.as_ref() == Some(&error) {
                    return true;
                }
                self.last_policy_error = Some(error.clone());
                let cmd = Command::ReloadFailed {
                    what: ReloadKind::Policy,
                    error,
                };
                return controller.send(cmd).await;
            }
        };
        // A read error shown for files that read as before now: they are loaded again (they are
        // what serves), which clears the error, as a config or certificate readable again does.
        let error_shown = self.last_policy_error.take().is_some();
        if self.last_files.as_ref() == Some(&files) && !limits_changed && !error_shown {
            return true;
        }
        if let Some(name) = emptied_policy_file(self.last_files.as_ref(), &files) {
            let error = format!(
                "{name} is empty now: taken as cut off while being written, so the last good policy set stays; \
                 to remove its hooks delete the file, to change them write it whole \
                 (to a temporary file renamed over it)"
            );
            self.last_files = Some(files);
            let cmd = Command::ReloadFailed {
                what: ReloadKind::Policy,
                error,
            };
            return controller.send(cmd).await;
        }
        self.last_files = Some(files.clone());
        self.loaded_limits = self.limits;
        self.generation += 1;
        let (limits, generation) = (self.limits, self.generation);
        let loaded =
            tokio::task::spawn_blocking(move || PolicySet::from_sources(files, limits, generation))
                .await;
        let cmd = match loaded {
            Ok(Ok(set)) => Command::PolicyLoaded {
                policy: Box::new(set),
            },
            Ok(Err(e)) => Command::ReloadFailed {
                what: ReloadKind::Policy,
                error: e.to_string(),
            },
            Err(e) => Command::ReloadFailed {
                what: ReloadKind::Policy,
                error: format!("loading the policy panicked: {e}"),
            },
        };
        controller.send(cmd).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOON: Duration = Duration::from_millis(300);

    #[test]
    fn only_events_about_a_watched_source_start_a_check() {
        let files = [
            Path::new("/etc/rg/lb.toml"),
            Path::new("/etc/rg/gateway.crt"),
        ];
        let policies = Path::new("/etc/rg/policies");
        let about = |p: &str| concerns_a_source(&files, policies, &[PathBuf::from(p)]);
        assert!(about("/etc/rg/lb.toml"));
        assert!(about("/etc/rg/gateway.crt"));
        assert!(about("/etc/rg/policies/hash.lua"));
        assert!(about("/etc/rg/policies"));
        assert!(about("/etc/rg/..data"));
        // An access log beside the config and the certificate, an editor's swap file, a file
        // elsewhere, a swap in a directory without watched files: no check.
        assert!(!about("/etc/rg/access.log"));
        assert!(!about("/etc/rg/.lb.toml.swp"));
        assert!(!about("/var/log/access.log"));
        assert!(!about("/var/log/..data"));
        // Lost events name no path: everything may have changed.
        assert!(concerns_a_source(&files, policies, &[]));
    }

    #[test]
    fn an_edit_applies_only_when_two_reads_agree_and_nobody_writes() {
        assert_eq!(verdict(&"a", &"a", false, SOON), Verdict::Settled);
        assert_eq!(verdict(&"half", &"whole", false, SOON), Verdict::Wait);
        assert_eq!(verdict(&"half", &"half", true, SOON), Verdict::Wait);
    }

    #[test]
    fn waiting_is_bounded() {
        assert_eq!(verdict(&"a", &"a", true, MAX_SETTLE), Verdict::Settled);
        assert_eq!(verdict(&"a", &"b", false, MAX_SETTLE), Verdict::Unsettled);
        assert_eq!(verdict(&"a", &"b", true, MAX_SETTLE), Verdict::Unsettled);
    }

    fn event(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn a_write_is_open_until_its_close_removal_or_rename() {
        let mut open = OpenWrites::default();
        let modify = EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any));
        let is = |p: &'static str| move |q: &Path| q == Path::new(p);
        open.note(&event(modify, &["/c/lb.toml"]));
        assert!(open.any(is("/c/lb.toml")));
        open.note(&event(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/c/lb.toml"],
        ));
        assert!(!open.any(is("/c/lb.toml")));

        open.note(&event(
            EventKind::Create(CreateKind::File),
            &["/c/lb.toml.tmp"],
        ));
        assert!(open.any(is("/c/lb.toml.tmp")));
        open.note(&event(
            EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::Both)),
            &["/c/lb.toml.tmp", "/c/lb.toml"],
        ));
        assert!(!open.any(|_| true), "a rename delivers a complete file");

        open.note(&event(modify, &["/p/a.lua"]));
        open.note(&event(
            EventKind::Remove(notify::event::RemoveKind::File),
            &["/p/a.lua"],
        ));
        assert!(!open.any(|_| true));

        open.note(&event(modify, &["/p/a.lua"]));
        open.forget(is("/p/a.lua"));
        assert!(!open.any(|_| true));
    }

    #[test]
    fn only_the_config_and_loadable_policy_files_are_waited_for() {
        let (config, dir) = (Some(Path::new("/c/lb.toml")), Path::new("/p"));
        let certs = [PathBuf::from("/t/site.pem")];
        let is = |source, p: &str| is_source_file(config, dir, &certs, source, Path::new(p));
        assert!(is(Source::Certificates, "/t/site.pem"));
        assert!(!is(Source::Certificates, "/t/site.pem.tmp"));
        assert!(!is(Source::Config, "/t/site.pem"));
        assert!(is(Source::Config, "/c/lb.toml"));
        assert!(!is(Source::Config, "/c/lb.toml.tmp"));
        assert!(is(Source::Policy, "/p/10-a.lua"));
        for not_loaded in [
            "/p/.10-a.lua.swp",
            "/p/.10-a.lua",
            "/p/10-a.lua.new",
            "/p/x/a.lua",
        ] {
            assert!(!is(Source::Policy, not_loaded), "{not_loaded}");
        }
    }

    #[test]
    fn our_own_reads_are_not_events() {
        assert!(!is_relevant(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_relevant(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_relevant(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_relevant(&EventKind::Remove(
            notify::event::RemoveKind::Any
        )));
    }

    #[test]
    fn running_out_of_descriptors_is_the_gateways_problem_not_the_files() {
        let io = |code| std::io::Error::from_raw_os_error(code);
        let dir = || PathBuf::from("/p");
        for code in [libc::EMFILE, libc::ENFILE] {
            assert!(policy_read_is_local(&PolicyError::ReadDir {
                dir: dir(),
                source: io(code)
            }));
            assert!(policy_read_is_local(&PolicyError::ReadFile {
                path: dir().join("a.lua"),
                source: io(code)
            }));
        }
        assert!(!policy_read_is_local(&PolicyError::ReadFile {
            path: dir().join("a.lua"),
            source: io(libc::EACCES)
        }));
        assert!(!policy_read_is_local(&PolicyError::NotText {
            file: "a.lua".into()
        }));
        let no_thread = ReadError::NoThread(io(libc::EAGAIN));
        assert!(matches!(
            ReadFailure::unread("lb.toml", no_thread),
            ReadFailure::Local(_)
        ));
        let stuck = ReadFailure::unread(
            "lb.toml",
            ReadError::Stuck {
                timeout: reader::READ_TIMEOUT,
            },
        );
        assert!(matches!(&stuck, ReadFailure::File(m) if m.starts_with("cannot read lb.toml: ")));
    }

    #[test]
    fn a_policy_file_that_lost_its_content_is_cut_off() {
        let files = |v: &[(&str, &str)]| -> PolicyFiles {
            v.iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect()
        };
        let before = files(&[("10-a.lua", "function request_hash(i, s) return 0 end")]);
        assert_eq!(
            emptied_policy_file(Some(&before), &files(&[("10-a.lua", "  \n")])),
            Some("10-a.lua")
        );
        // A new empty file (touched, about to be written) defines nothing and harms nothing.
        assert_eq!(
            emptied_policy_file(
                Some(&before),
                &files(&[("10-a.lua", "x = 1"), ("20-b.lua", "")])
            ),
            None
        );
        // One that was empty before stays acceptable.
        let empty = files(&[("10-a.lua", "")]);
        assert_eq!(emptied_policy_file(Some(&empty), &empty), None);
        assert_eq!(emptied_policy_file(None, &empty), None);
    }
}
