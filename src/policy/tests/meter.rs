//! The meter on its own: ticks against the budget, the deadline at the second late tick,
//! steps of Rust work, and the unlimited mode of trusted code.

use super::*;
use crate::policy::meter::{Meter, Stop};

#[test]
fn budget_is_counted_in_ticks_of_at_most_256_instructions() {
    let m = Meter::new(1000);
    assert_eq!(m.step(), 256);
    m.start(Duration::from_secs(60));
    // ceil(1000 / 256) = 4 ticks are allowed, the fifth stops the call.
    for _ in 0..4 {
        assert_eq!(m.tick(), Ok(()));
    }
    assert_eq!(m.tick(), Err(Stop::Budget));
    assert_eq!(m.stopped(), Some(Stop::Budget));
    // It stays stopped (so a `pcall` loop cannot outlive it) until the next call starts.
    assert_eq!(m.tick(), Err(Stop::Budget));
    m.start(Duration::from_secs(60));
    assert_eq!(m.stopped(), None);
    assert_eq!(m.tick(), Ok(()));
    // A budget below one step is a step of its own size.
    assert_eq!(Meter::new(10).step(), 10);
}

#[test]
fn deadline_stops_at_the_second_late_tick() {
    let m = Meter::new(u32::MAX);
    m.start(Duration::from_millis(1));
    assert_eq!(m.tick(), Ok(()));
    std::thread::sleep(Duration::from_millis(3));
    // The first late tick may be a call the OS descheduled: it goes on...
    assert_eq!(m.tick(), Ok(()));
    assert_eq!(m.stopped(), None);
    // ...the second one stops it, and every later tick fails too.
    assert_eq!(m.tick(), Err(Stop::Deadline));
    assert_eq!(m.tick(), Err(Stop::Deadline));
    assert_eq!(m.allowance(), Duration::from_millis(1));
    m.start(Duration::from_secs(60));
    assert_eq!(m.tick(), Ok(()));
}

#[test]
fn rust_work_spends_ticks_in_steps() {
    let m = Meter::new(1024);
    m.start(Duration::from_secs(60));
    // 4 ticks of 256 steps are allowed: 1000 steps (3 ticks and 232 left over), then 24 more
    // make the 4th tick, then one more tick's worth is one too many.
    assert_eq!(m.spend(1000), Ok(()));
    assert_eq!(m.spend(24), Ok(()));
    assert_eq!(m.spend(255), Ok(()));
    assert_eq!(m.spend(1), Err(Stop::Budget));
    assert_eq!(m.spend(0), Err(Stop::Budget));
}

#[test]
fn unlimited_mode_neither_counts_nor_times_out() {
    let m = Meter::new(256);
    m.start(Duration::from_nanos(1));
    m.unlimited();
    std::thread::sleep(Duration::from_millis(2));
    for _ in 0..1000 {
        assert_eq!(m.tick(), Ok(()));
    }
    assert_eq!(m.spend(1_000_000), Ok(()));
    m.start(Duration::from_secs(60));
    assert_eq!(m.tick(), Ok(()));
    assert_eq!(m.tick(), Err(Stop::Budget));
}

#[test]
fn charged_steps_count_against_the_budget_and_the_deadline_like_ticks() {
    // C work charged by the prelude (`charge`) is `spend`: the four ticks of a 1000-step
    // budget pass, one more tick's worth stops the call.
    let m = Meter::new(1000);
    m.start(Duration::from_secs(60));
    assert_eq!(m.spend(1024), Ok(()));
    assert_eq!(m.spend(256), Err(Stop::Budget));
    // Past the deadline, a charge stops the call at its second late tick, before the C
    // function it pays for runs.
    let m = Meter::new(u32::MAX);
    m.start(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(3));
    assert_eq!(m.spend(512), Err(Stop::Deadline));
}
