//! The session parameters a client keeps across server connections.
//!
//! Most clients of a pool ask for the same values (same driver, same settings), so a set is
//! shared between them and named by an id: a server connection remembers the id of the set it
//! last matched, and handing it to a client with that set costs one integer comparison instead
//! of comparing every parameter before every transaction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// Ids start at 1: 0 means "matches nothing".
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Sets remembered per pool for sharing; older ones are forgotten (only sharing is lost).
const REMEMBERED: usize = 16;

/// Parameter names and values, in the order they are applied. Never changed once made: a
/// change makes a new set with a new id.
#[derive(Debug)]
pub struct ParamSet {
    id: u64,
    values: Vec<(String, String)>,
}

impl ParamSet {
    pub fn new(values: Vec<(String, String)>) -> ParamSet {
        ParamSet {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            values,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn values(&self) -> &[(String, String)] {
        &self.values
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the set has a value for `name`, in any ASCII case.
    pub fn has(&self, name: &[u8]) -> bool {
        self.values
            .iter()
            .any(|(n, _)| n.as_bytes().eq_ignore_ascii_case(name))
    }

    /// A copy with `name` set to `value` (added when absent).
    pub fn with(&self, name: &str, value: &str) -> ParamSet {
        let mut values = self.values.clone();
        match values
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
        {
            Some(entry) => entry.1 = value.to_string(),
            None => values.push((name.to_string(), value.to_string())),
        }
        ParamSet::new(values)
    }
}

/// Recently made sets of one pool, so that equal sets are one shared `Arc`.
#[derive(Debug, Default)]
pub struct SharedSets {
    recent: Mutex<Vec<Weak<ParamSet>>>,
}

impl SharedSets {
    /// The shared set with exactly these values, made if there is none.
    pub fn share(&self, values: Vec<(String, String)>) -> Arc<ParamSet> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.retain(|w| w.strong_count() > 0);
        if let Some(found) = recent
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| s.values == values)
        {
            return found;
        }
        let set = Arc::new(ParamSet::new(values));
        if recent.len() >= REMEMBERED {
            recent.remove(0);
        }
        recent.push(Arc::downgrade(&set));
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equal_values_share_one_set() {
        let shared = SharedSets::default();
        let a = shared.share(v(&[("TimeZone", "UTC")]));
        let b = shared.share(v(&[("TimeZone", "UTC")]));
        let c = shared.share(v(&[("TimeZone", "Europe/Paris")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.id(), c.id());
    }

    #[test]
    fn a_change_is_a_new_set() {
        let a = ParamSet::new(v(&[("application_name", "x")]));
        let b = a.with("APPLICATION_NAME", "y");
        assert_ne!(a.id(), b.id());
        assert_eq!(b.get("application_name"), Some("y"));
        assert_eq!(a.get("application_name"), Some("x"));
        assert_eq!(b.values().len(), 1);
        assert_eq!(a.with("search_path", "s").values().len(), 2);
    }

    #[test]
    fn forgotten_sets_are_not_kept_alive() {
        let shared = SharedSets::default();
        let a = shared.share(v(&[("a", "1")]));
        let id = a.id();
        drop(a);
        assert_ne!(shared.share(v(&[("a", "1")])).id(), id);
    }
}
