//! The certificate side of the watcher: which files hold the TLS certificates and keys in use,
//! reading them, and validating a settled change before it is applied ([`Tls::apply`]) or
//! rejected ([`Tls::reject`]).
//!
//! Owns: [`CertFiles`], [`CertWatch`] and `State::check_certs`. Must not touch: the config or
//! the policy (the parent module), or what a certificate set does (the TLS module).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::reader::Reader;
use super::{watch_dir, ControllerHandle, Read, ReadFailure, Settling, Source, State};
use crate::config::CertificatePair;
use crate::tls::certs::{CertError, PairBytes};
use crate::tls::{Tls, TlsError};

/// How long a key that does not match its certificate is taken as a pair half-way through being
/// replaced before it is reported.
const MISMATCH_GRACE: Duration = Duration::from_secs(2);

/// The files of the TLS certificates in use, as they were given and as notify names them.
#[derive(Debug, Default, Clone)]
pub(super) struct CertFiles {
    pub(super) pairs: Vec<CertificatePair>,
    /// Every certificate and key file as `canonical directory/name`.
    pub(super) event_paths: Vec<PathBuf>,
    /// The directories holding them (canonical).
    pub(super) dirs: Vec<PathBuf>,
}

impl CertFiles {
    pub(super) fn new(pairs: Vec<CertificatePair>) -> CertFiles {
        let mut files = CertFiles {
            pairs,
            ..CertFiles::default()
        };
        for pair in &files.pairs {
            for path in [pair.cert.as_path(), pair.key_file()] {
                let dir = watch_dir(path);
                if let Some(name) = path.file_name() {
                    files.event_paths.push(dir.join(name));
                }
                if !files.dirs.contains(&dir) {
                    files.dirs.push(dir);
                }
            }
        }
        files
    }
}

/// The certificate side of the watcher (present while TLS is on).
pub(super) struct CertWatch {
    pub(super) tls: Arc<Tls>,
    pub(super) files: CertFiles,
    /// The last settled read of the files (their content, or why they cannot be read; never a
    /// [`ReadFailure::Local`]).
    pub(super) last: Option<Read<Vec<PairBytes>>>,
    /// Since when the settled files hold a key that does not match its certificate.
    pub(super) mismatch_since: Option<Instant>,
    /// Directories notify watches.
    pub(super) watched: Vec<PathBuf>,
    pub(super) reader: Reader<Result<Vec<PairBytes>, CertError>>,
}

async fn read_certs(
    reader: Reader<Result<Vec<PairBytes>, CertError>>,
    pairs: Vec<CertificatePair>,
) -> Read<Vec<PairBytes>> {
    let read = move || pairs.iter().map(crate::tls::certs::read).collect();
    match reader.read(read).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.is_local_resource() => Err(ReadFailure::Local(e.to_string())),
        Ok(Err(e)) => Err(ReadFailure::File(e.to_string())),
        Err(e) => Err(ReadFailure::unread("the TLS certificate and key files", e)),
    }
}

impl State {
    /// Reads the certificate files; a settled change is validated, then applied or rejected.
    pub(super) async fn check_certs(&mut self, controller: &ControllerHandle) -> bool {
        let Some(certs) = &self.certs else {
            return true;
        };
        let pairs = certs.files.pairs.clone();
        let pending_mismatch = certs.mismatch_since.is_some();
        let reader = certs.reader.clone();
        let first = read_certs(reader.clone(), pairs.clone()).await;
        if self.short_of_resources(Source::Certificates, &first) {
            return true;
        }
        let unchanged = self
            .certs
            .as_ref()
            .is_some_and(|c| c.last.as_ref() == Some(&first));
        if unchanged && !pending_mismatch && !self.writing(Source::Certificates, &first) {
            return true;
        }
        let read = if unchanged {
            first
        } else {
            match self
                .settle(Source::Certificates, first, || {
                    read_certs(reader.clone(), pairs.clone())
                })
                .await
            {
                Settling::Settled(read) => read,
                Settling::KeptChanging => {
                    return self
                        .report_unsettled(Source::Certificates, controller)
                        .await
                }
                Settling::ShortOfResources => return true,
            }
        };
        let Some(certs) = self.certs.as_mut() else {
            return true;
        };
        if certs.last.as_ref() == Some(&read) && !pending_mismatch {
            return true;
        }
        certs.last = Some(read.clone());
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(failure) => {
                certs.mismatch_since = None;
                certs.tls.reject(failure.message());
                return true;
            }
        };
        match certs.tls.validate(&pairs, &bytes) {
            Ok(set) => {
                certs.mismatch_since = None;
                certs.tls.apply(set);
            }
            Err(TlsError::Cert(e))
                if e.is_key_mismatch()
                    && certs
                        .mismatch_since
                        .is_none_or(|t| t.elapsed() < MISMATCH_GRACE) =>
            {
                certs.mismatch_since.get_or_insert_with(Instant::now);
                tracing::debug!(error = %e, "a key does not match its certificate yet; waiting for the other file");
            }
            Err(e) => {
                certs.mismatch_since = None;
                certs.tls.reject(&e.to_string());
            }
        }
        true
    }
}
