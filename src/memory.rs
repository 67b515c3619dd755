//! Giving the heap back after a burst.
//!
//! Owns: the gateway's idle trim. A burst (a thousand concurrent requests, each with its
//! request future, upstream connection and buffers) leaves glibc's malloc holding the memory it
//! freed: the pages stay resident, interleaved with what the open connections still use, and
//! glibc returns only the top of each heap by itself. Every [`PERIOD`] the trimmer looks at how
//! many requests were served and at the resident set; once traffic is quiet and the resident
//! set has grown by [`GROWTH`] since the last trim, it asks the allocator to release every free
//! page (`malloc_trim(0)`), then records what is resident as the new base. The decision is
//! [`should_trim`], a pure function; trimming under load is never worth it (the pages would be
//! faulted back in at once), so a busy gateway is never trimmed.
//! Must not touch: anything but the allocator: it frees nothing the gateway still uses, and it
//! decides nothing about requests or replicas.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// How often the trimmer looks.
pub const PERIOD: Duration = Duration::from_secs(5);
/// At most this many requests in a [`PERIOD`] (20 per second) is quiet.
pub const QUIET_REQUESTS: u64 = 100;
/// The resident set must have grown this much since the last trim before another is tried.
pub const GROWTH: u64 = 2 << 20;

/// Whether to trim now: `served` requests in the last period, `resident` bytes now,
/// `base` bytes resident just after the last trim (or at start).
pub fn should_trim(served: u64, resident: u64, base: u64) -> bool {
    served <= QUIET_REQUESTS && resident >= base.saturating_add(GROWTH)
}

/// The process's resident set in bytes (`VmRSS` of `/proc/self/status`); None where there is no
/// procfs.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Asks the allocator to release every free page to the OS. Does nothing where the allocator is
/// not glibc's.
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes no pointer and has no precondition; glibc takes each arena's
    // lock while it walks it, so it is safe beside allocations on other threads.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the trimmer until the task is dropped.
pub async fn trim_when_quiet(metrics: Arc<Metrics>) {
    let Some(mut base) = resident_bytes() else {
        return tracing::debug!("no /proc/self/status: the idle trim is off");
    };
    let mut served_before = metrics.requests.get();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let served_now = metrics.requests.get();
        let served = served_now.wrapping_sub(served_before);
        served_before = served_now;
        let Some(resident) = resident_bytes() else {
            continue;
        };
        // A trim that released nothing, or connections that closed, set a lower base.
        base = base.min(resident);
        if !should_trim(served, resident, base) {
            continue;
        }
        // malloc_trim walks every arena: on the blocking pool, the runtime's threads go on.
        let _ = tokio::task::spawn_blocking(release_free_pages).await;
        let after = resident_bytes().unwrap_or(resident);
        metrics.memory_trims.fetch_add(1, Ordering::Relaxed);
        metrics
            .memory_trimmed_bytes
            .fetch_add(resident.saturating_sub(after), Ordering::Relaxed);
        tracing::debug!(before = resident, after, "heap trimmed after a burst");
        base = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_only_when_quiet_and_grown() {
        let base = 10 << 20;
        assert!(should_trim(0, base + GROWTH, base));
        assert!(should_trim(QUIET_REQUESTS, base + GROWTH + 1, base));
        // Busy: the pages would be faulted back in at once.
        assert!(!should_trim(QUIET_REQUESTS + 1, base + 10 * GROWTH, base));
        // Quiet but not grown: nothing worth a walk over every arena.
        assert!(!should_trim(0, base + GROWTH - 1, base));
        assert!(!should_trim(0, base / 2, base));
        assert!(should_trim(0, u64::MAX, u64::MAX - GROWTH));
        assert!(!should_trim(0, u64::MAX - 1, u64::MAX));
    }

    #[test]
    fn reads_vm_rss_from_proc_status() {
        let status = "Name:\tringgate\nVmHWM:\t   40000 kB\nVmRSS:\t   37312 kB\nThreads:\t7\n";
        assert_eq!(parse_vm_rss(status), Some(37312 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn releasing_free_pages_keeps_live_memory() {
        let live: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        let freed: Vec<Vec<u8>> = (0..64).map(|_| vec![7u8; 64 << 10]).collect();
        drop(freed);
        release_free_pages();
        for (i, block) in live.iter().enumerate() {
            assert!(block.iter().all(|&b| b == i as u8));
        }
    }
}
