//! Per-object operation locks: one operation at a time per volume (or volume name); a second
//! one gets ABORTED, which tells the CO to retry later, as the CSI spec prescribes.

use qcow2_engine::sync::Recover;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The set of keys with an operation in progress.
#[derive(Debug, Default, Clone)]
pub struct Locks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
#[derive(Debug)]
pub struct Held {
    locks: Locks,
    key: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.locks.held.lock().recover().remove(&self.key);
    }
}

impl Locks {
    /// Takes `key`, or ABORTED if an operation holds it.
    pub fn try_lock(&self, key: impl Into<String>) -> Result<Held> {
        let key = key.into();
        let mut held = self.held.lock().recover();
        if !held.insert(key.clone()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is in progress; retry"
            )));
        }
        Ok(Held {
            locks: self.clone(),
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_key_aborts_a_second_operation_until_released() {
        let locks = Locks::default();
        let a = locks.try_lock("vol-1").unwrap();
        assert!(matches!(locks.try_lock("vol-1"), Err(Error::Aborted(_))));
        let _b = locks.try_lock("vol-2").unwrap();
        drop(a);
        locks.try_lock("vol-1").unwrap();
    }
}
