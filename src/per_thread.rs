//! Counts that every request adds to, kept per serving thread.
//!
//! Owns: [`PerThread`], one copy of a value per serving thread, each on cache lines of its own,
//! and [`Counter`], a count kept that way. A request adds to its own thread's copy only, so no
//! cache line moves between cores on the request path (two threads adding to one shared atomic
//! pay a transfer of its line on nearly every add); whoever reads (a scrape, the status page,
//! the controller) sums the copies. A serving thread says which copy is its own with
//! [`enter_serving_thread`]; any other thread adds to a shared copy, which is correct, just not
//! free of contention.
//! Must not touch: what is counted, or values that must be exact at every instant across
//! threads (requests in flight and 5xx answers in a row stay single atomics: they decide).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The most copies kept: beyond this, serving threads share copies (still correct).
const MAX_COPIES: usize = 64;

thread_local! {
    /// This thread's copy; `usize::MAX` until a serving thread says which is its own.
    static OWN_COPY: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// How many copies a [`PerThread`] has: one per CPU (the serving threads' default count).
fn copies() -> usize {
    static COPIES: OnceLock<usize> = OnceLock::new();
    *COPIES.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_COPIES)
    })
}

/// Makes copy `n` (modulo the number of copies) this thread's own; serving thread `n` calls it
/// once, before it serves.
pub fn enter_serving_thread(n: usize) {
    OWN_COPY.with(|c| c.set(n % copies()));
}

/// A value aligned to its own cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// One `T` per serving thread.
#[derive(Debug)]
pub struct PerThread<T> {
    copies: Box<[Padded<T>]>,
}

impl<T: Default> Default for PerThread<T> {
    fn default() -> Self {
        PerThread {
            copies: (0..copies()).map(|_| Padded::default()).collect(),
        }
    }
}

impl<T> PerThread<T> {
    /// This thread's copy (a thread that is no serving thread shares the last one).
    #[inline]
    pub fn local(&self) -> &T {
        let own = OWN_COPY.with(Cell::get);
        let at = own.min(self.copies.len() - 1);
        &self.copies[at].0
    }

    /// Every copy, to be summed.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.copies.iter().map(|c| &c.0)
    }
}

/// The element-wise sum of arrays of counts, one array a thread (what a reader of a
/// `PerThread<[AtomicU64; N]>`, or of an array inside each copy, wants).
pub fn sum_each<'a, const N: usize>(copies: impl Iterator<Item = &'a [AtomicU64; N]>) -> [u64; N] {
    let mut sums = [0u64; N];
    for copy in copies {
        for (sum, c) in sums.iter_mut().zip(copy) {
            *sum = sum.wrapping_add(c.load(Ordering::Relaxed));
        }
    }
    sums
}

/// A count that serving threads add to on every request and that is read rarely.
#[derive(Debug, Default)]
pub struct Counter(PerThread<AtomicU64>);

impl Counter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.local().fetch_add(n, Ordering::Relaxed);
    }

    /// The count: the sum of every thread's copy.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_the_sum_of_every_threads_adds() {
        let counter = Counter::default();
        std::thread::scope(|s| {
            for n in 0..4 {
                let counter = &counter;
                s.spawn(move || {
                    enter_serving_thread(n);
                    for _ in 0..1000 {
                        counter.add(1);
                    }
                });
            }
        });
        counter.add(5); // from a thread that is no serving thread
        assert_eq!(counter.get(), 4005);
    }

    #[test]
    fn serving_threads_add_to_their_own_copies() {
        let values: PerThread<AtomicU64> = PerThread::default();
        std::thread::scope(|s| {
            for n in 0..copies() {
                let values = &values;
                s.spawn(move || {
                    enter_serving_thread(n);
                    values.local().fetch_add(n as u64 + 1, Ordering::Relaxed);
                });
            }
        });
        let seen: Vec<u64> = values.iter().map(|v| v.load(Ordering::Relaxed)).collect();
        let expected: Vec<u64> = (1..=copies() as u64).collect();
        assert_eq!(seen, expected, "each serving thread has a copy of its own");
    }

    #[test]
    fn copies_sit_on_cache_lines_of_their_own() {
        let values: PerThread<AtomicU64> = PerThread::default();
        let addrs: Vec<usize> = values.iter().map(|v| v as *const _ as usize).collect();
        for pair in addrs.windows(2) {
            assert!(pair[1] - pair[0] >= 128, "copies {pair:?} share a line");
        }
    }
}
