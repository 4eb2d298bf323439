//! Locks that survive a panic elsewhere.
//!
//! A `Mutex`, `RwLock` or `Condvar` wait reports poisoning when a thread panicked while
//! holding the lock. Everything this workspace guards is changed by statements that leave it
//! whole (an insert, a counter, a swapped handle), so a panic in one request never leaves the
//! data half-written; refusing the lock forever after would turn that one failed request into
//! a dead export or a dead node. [`Recover::recover`] takes the guard regardless, and is the
//! one place where that decision is written down.

use std::sync::{LockResult, PoisonError};

/// Takes a lock's guard whether or not a panicking holder poisoned it (see the module doc).
pub trait Recover<G> {
    fn recover(self) -> G;
}

impl<G> Recover<G> for LockResult<G> {
    fn recover(self) -> G {
        self.unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_lock_poisoned_by_a_panic_is_still_taken_with_its_data() {
        let m = Arc::new(Mutex::new(41));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g += 1;
            panic!("a holder panics");
        })
        .join();
        assert!(m.lock().is_err(), "poisoned");
        assert_eq!(*m.lock().recover(), 42);
    }
}
