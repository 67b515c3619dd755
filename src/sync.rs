//! Locking plain data.
//!
//! Owns: [`lock`], the one way this crate takes a `std::sync::Mutex`. The mutexes here guard
//! plain data touched briefly (never across an await, never on the request path's hot loop), so
//! a poisoned lock, left by a panic elsewhere, still holds usable data and is taken anyway.
//! Must not touch: anything else.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_hands_out_its_data() {
        let m = std::sync::Arc::new(Mutex::new(5));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _guard = lock(&m2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 5);
    }
}
