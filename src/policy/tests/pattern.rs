//! The matcher's step count: every attempt is counted, the fuel function is asked every
//! chunk, and a refusal stops even an exponential match at once.

use crate::policy::pattern::{find_plain, Matcher, PatternError, Steps};

/// Matches `pattern` against `subject` with `fuel` steps in chunks of 100; the outcome and
/// the steps used.
fn run(
    subject: &[u8],
    pattern: &[u8],
    fuel: u64,
) -> (Result<Option<(usize, usize)>, PatternError>, u64) {
    let mut used = 0u64;
    let mut give = |n: u32| {
        used += u64::from(n);
        used <= fuel
    };
    let mut steps = Steps::new(100, &mut give);
    let found = Matcher::new(subject, pattern, &mut steps).search(0, false);
    let found = found.and_then(|f| steps.flush().map(|()| f));
    (found, used)
}

#[test]
fn backtracking_grows_with_each_optional_item_and_is_stopped() {
    let subject = b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"; // 30 a
    let mut previous = 0;
    for n in [8usize, 10, 12, 14] {
        let pattern = format!("{}{}", "a?".repeat(n), "a".repeat(n));
        let (found, used) = run(&subject[..n], pattern.as_bytes(), u64::MAX);
        assert_eq!(found, Ok(Some((0, n))));
        assert!(used > previous * 3, "{n}: {used} steps after {previous}");
        previous = used;
    }
    // 30 items would take about 2^30 attempts; the fuel stops it after its 10,000 steps.
    let pattern = format!("{}{}", "a?".repeat(30), "a".repeat(30));
    let (found, used) = run(subject, pattern.as_bytes(), 10_000);
    assert_eq!(found, Err(PatternError::Stopped));
    assert!(used <= 10_100, "{used}");
}

#[test]
fn fuel_is_asked_every_chunk_and_leftovers_are_flushed() {
    let (found, used) = run(b"hello world", b"o w", u64::MAX);
    assert_eq!(found, Ok(Some((4, 7))));
    assert!(used > 0 && used < 100, "{used}");
    let (found, used) = run(&[b'x'; 10_000], b"y+", u64::MAX);
    assert_eq!(found, Ok(None));
    assert!(used >= 10_000, "every start position counts: {used}");
}

#[test]
fn plain_search_counts_what_it_reads() {
    let mut used = 0u64;
    let mut give = |n: u32| {
        used += u64::from(n);
        true
    };
    let mut steps = Steps::new(64, &mut give);
    let hay = [b"ab".repeat(50_000), b"abc".to_vec()].concat();
    assert_eq!(find_plain(&hay, b"abc", 0, &mut steps), Ok(Some(100_000)));
    assert_eq!(find_plain(&hay, b"", 5, &mut steps), Ok(Some(5)));
    assert_eq!(find_plain(&hay, b"zz", 0, &mut steps), Ok(None));
    assert_eq!(find_plain(b"ab", b"abc", 0, &mut steps), Ok(None));
    assert_eq!(find_plain(b"ab", b"b", 3, &mut steps), Ok(None));
    steps.flush().expect("fuel");
    assert!(used >= 50_000, "one step per candidate at least: {used}");
}
