//! Reading an operator's file: the config, a policy file, a certificate or a key.
//!
//! Owns: [`read_source_file`], the one way these files are read (a regular file only, opened
//! without blocking, up to a size cap), [`FileReadError`], and [`is_local_resource`], which
//! tells a read that failed for the process's own shortage of descriptors from one that failed
//! for the file. A FIFO, a device or a huge file at a watched path is an error here, never a
//! read that does not return.
//! Must not touch: what a file says (its callers parse it) or when it is read (the watcher).
//! A leaf: it imports nothing of the crate, so the policy and TLS modules can use it without an
//! import running back into the config module.

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why [`read_source_file`] read nothing. The callers' errors name the file.
#[derive(Debug, thiserror::Error)]
pub enum FileReadError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(
        "it is {kind}, not a regular file: only regular files are read (a pipe or a device can \
         block a read forever or never end), so nothing changes until a regular file is there"
    )]
    NotRegular { kind: &'static str },
    #[error(
        "it is larger than {max} bytes, more than such a file can sensibly hold; nothing changes"
    )]
    TooLarge { max: u64 },
}

impl FileReadError {
    /// Whether the read failed for the reading process's own shortage (see
    /// [`is_local_resource`]), which says nothing about the file.
    pub fn is_local_resource(&self) -> bool {
        matches!(self, FileReadError::Io(e) if is_local_resource(e))
    }

    /// The error as an `io::Error`, for error types that carry one: an I/O error as it came (its
    /// OS error code intact), the others wrapped with this error inside.
    pub fn into_io(self) -> std::io::Error {
        match self {
            FileReadError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidInput, other),
        }
    }
}

/// Whether `e` is the process running out of descriptors (EMFILE: its own limit, ENFILE: the
/// system's): the file may be fine, and a later read may succeed.
pub fn is_local_resource(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// What a file is, in words, when it is not a regular file.
fn kind_of(t: std::fs::FileType) -> Option<&'static str> {
    if t.is_file() {
        None
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("not a regular file")
    }
}

/// Reads `path` (symlinks followed) if it is a regular file of at most `max` bytes.
///
/// A FIFO opened for reading blocks until a writer comes, and a read of a device may never end,
/// so the type is checked before the open (opening some devices has effects of its own) and
/// again on the open descriptor (the path may have been replaced in between). The open does not
/// block (`O_NONBLOCK`, which changes nothing for a regular file's reads) and takes no
/// controlling terminal.
pub fn read_source_file(path: &Path, max: u64) -> Result<Vec<u8>, FileReadError> {
    let regular = |meta: std::fs::Metadata| match kind_of(meta.file_type()) {
        Some(kind) => Err(FileReadError::NotRegular { kind }),
        None if meta.len() > max => Err(FileReadError::TooLarge { max }),
        None => Ok(meta.len()),
    };
    regular(std::fs::metadata(path)?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let len = regular(file.metadata()?)?;
    // One byte more than allowed tells a file that grew since the check from one that fits.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(FileReadError::TooLarge { max });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `mkfifo path`: a real named pipe, as an operator's mistake or a race leaves one.
    fn mkfifo(path: &Path) {
        let made = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .map(|s| s.success());
        assert!(matches!(made, Ok(true)), "mkfifo {}", path.display());
    }

    /// Opens a FIFO for writing when dropped, which releases a read blocked on it; without a
    /// reader the open just fails.
    struct Unblock(std::path::PathBuf);

    impl Drop for Unblock {
        fn drop(&mut self) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.0);
        }
    }

    /// `read_source_file` on another thread, failing the test (not hanging it) if it blocks.
    fn read_within(path: &Path, max: u64) -> Result<Vec<u8>, FileReadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(read_source_file(&path, max));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the read returned at once (it must never block)")
    }

    #[test]
    fn only_regular_files_are_read_and_never_block() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("lb.toml");
        mkfifo(&fifo);
        // No writer ever opens it: a blocking open would wait forever (until this guard, should
        // the read ever block, releases it at the end of the test).
        let _unblock = Unblock(fifo.clone());
        let e = read_within(&fifo, 1 << 20).expect_err("a FIFO is refused");
        assert!(
            matches!(e, FileReadError::NotRegular { kind } if kind.contains("FIFO")),
            "{e}"
        );
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(!e.is_local_resource());
        for (path, kind) in [
            (dir.path(), "directory"),
            (Path::new("/dev/null"), "character device"),
        ] {
            let e = read_within(path, 1 << 20).expect_err("not a regular file");
            assert!(
                matches!(e, FileReadError::NotRegular { kind: k } if k.contains(kind)),
                "{}: {e}",
                path.display()
            );
        }
        let file = dir.path().join("ok.toml");
        std::fs::write(&file, "listen = \"0.0.0.0:5000\"\n").expect("write");
        assert_eq!(
            read_within(&file, 1 << 20).expect("a regular file is read"),
            b"listen = \"0.0.0.0:5000\"\n"
        );
        // Symlinks are followed (ConfigMap-style mounts), to whatever they point at.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        assert!(read_within(&link, 1 << 20).is_ok());
        let to_fifo = dir.path().join("to-fifo.toml");
        std::os::unix::fs::symlink(&fifo, &to_fifo).expect("symlink");
        assert!(matches!(
            read_within(&to_fifo, 1 << 20),
            Err(FileReadError::NotRegular { .. })
        ));
        let e = read_within(&dir.path().join("missing"), 1 << 20).expect_err("missing");
        assert!(matches!(&e, FileReadError::Io(io) if io.kind() == std::io::ErrorKind::NotFound));
    }

    #[test]
    fn reads_are_capped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("big");
        std::fs::write(&file, vec![b'#'; 101]).expect("write");
        assert!(matches!(
            read_source_file(&file, 100),
            Err(FileReadError::TooLarge { max: 100 })
        ));
        assert_eq!(
            read_source_file(&file, 101).map(|b| b.len()).ok(),
            Some(101)
        );
    }

    #[test]
    fn running_out_of_descriptors_is_told_apart_from_a_bad_file() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        assert!(is_local_resource(&emfile) && is_local_resource(&enfile));
        for other in [libc::ENOENT, libc::EACCES, libc::EIO] {
            assert!(!is_local_resource(&std::io::Error::from_raw_os_error(
                other
            )));
        }
        assert!(FileReadError::Io(emfile).is_local_resource());
        // Wrapped for an error type that carries an io::Error, the OS code survives.
        let io = FileReadError::Io(enfile).into_io();
        assert!(is_local_resource(&io));
        let io = FileReadError::NotRegular { kind: "a socket" }.into_io();
        assert!(!is_local_resource(&io) && io.to_string().contains("a socket"));
    }
}
