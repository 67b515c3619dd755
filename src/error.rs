//! Errors as values: the type every body error is boxed as, an error's causes on one line, and
//! the causes that are the gateway's own (out of descriptors, memory or ports).
//!
//! Owns: [`BoxError`], [`error_chain`], [`local_resource_cause`]. A leaf: it imports nothing of
//! the crate, so every module may use it. Must not touch: HTTP (`crate::rescue` maps errors to
//! responses).

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error and its causes on one line ("client error (Connect): tcp connect error: Connection
/// refused"), for logs and failure details.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The local-resource cause in an error's chain, if any: out of file descriptors (EMFILE,
/// ENFILE), memory or buffers (ENOMEM, ENOBUFS), or local ports (EADDRNOTAVAIL). These are the
/// gateway's own limits, never evidence against a replica.
pub fn local_resource_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(code) = io.raw_os_error() {
                if matches!(
                    code,
                    libc::EMFILE
                        | libc::ENFILE
                        | libc::ENOMEM
                        | libc::ENOBUFS
                        | libc::EADDRNOTAVAIL
                ) {
                    return Some(io.to_string());
                }
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_resource_errors_are_found_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect failed")]
        struct Wrapper(#[source] std::io::Error);
        let emfile = Wrapper(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(local_resource_cause(&emfile).is_some_and(|c| c.contains("Too many open files")));
        let refused = Wrapper(std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(local_resource_cause(&refused), None);
    }
}
