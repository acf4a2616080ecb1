//! Named id sequences: each starts at 1 and never skips a number.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Rejected;

/// The sequence an empty name means.
pub const DEFAULT_SEQUENCE: &str = "default";

/// One request for `count` consecutive ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocRequest {
    pub sequence: String,
    pub count: u64,
}

impl AllocRequest {
    pub fn new(sequence: impl Into<String>, count: u64) -> Self {
        let sequence = sequence.into();
        Self { sequence, count }
    }
}

/// Names of sequences, groups and clients: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A sequence raised by a skip-ahead: its name, last id before, last id after.
pub type Floor = (String, u64, u64);

/// The last id handed out per sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequences {
    last: BTreeMap<String, u64>,
    /// The last id of every sequence not listed: raised by each restore's skip-ahead, since a
    /// sequence first used after the backup was taken may have handed out that many already.
    #[serde(default, skip_serializing_if = "is_zero")]
    floor: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Sequences {
    /// Hands out `count` ids and returns the first. Changes nothing when it refuses.
    pub fn allocate(&mut self, req: &AllocRequest, max_sequences: u32) -> Result<u64, Rejected> {
        if !valid_name(&req.sequence) {
            return Err(Rejected::InvalidName(req.sequence.clone()));
        }
        if req.count == 0 {
            return Err(Rejected::ZeroCount);
        }
        let last = match self.last.get(&req.sequence) {
            Some(last) => *last,
            None if self.last.len() >= max_sequences as usize => {
                return Err(Rejected::TooManySequences { max: max_sequences })
            }
            None => self.floor,
        };
        let new_last = last
            .checked_add(req.count)
            .ok_or_else(|| Rejected::Exhausted {
                sequence: req.sequence.clone(),
            })?;
        self.last.insert(req.sequence.clone(), new_last);
        Ok(last + 1)
    }

    /// The last id handed out (or skipped), 0 if none.
    pub fn current(&self, sequence: &str) -> u64 {
        self.last.get(sequence).copied().unwrap_or(self.floor)
    }

    /// The last id a sequence not yet used counts as handed out.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Raises every sequence by `n` (a restore's skip-ahead): returns each one's name, last
    /// id before and after, or the first one that would pass the largest id.
    pub fn skip_ahead(&mut self, n: u64) -> Result<Vec<Floor>, (String, u64)> {
        let mut floors = Vec::with_capacity(self.last.len());
        for (name, last) in &self.last {
            let raised = last.checked_add(n).ok_or_else(|| (name.clone(), *last))?;
            floors.push((name.clone(), *last, raised));
        }
        let floor = self
            .floor
            .checked_add(n)
            .ok_or_else(|| ("(sequences not used yet)".to_string(), self.floor))?;
        for (name, _, raised) in &floors {
            self.last.insert(name.clone(), *raised);
        }
        self.floor = floor;
        Ok(floors)
    }

    /// Ids handed out across every sequence.
    pub fn issued_total(&self) -> u64 {
        self.last.values().fold(0, |a, b| a.saturating_add(*b))
    }

    /// How many sequences exist.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// Whether no sequence exists yet.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_ahead_raises_sequences_used_and_not_yet_used() {
        let mut s = Sequences::default();
        s.allocate(&req("a", 5), 10).unwrap();
        let floors = s.skip_ahead(100).unwrap();
        assert_eq!(floors, vec![("a".to_string(), 5, 105)]);
        assert_eq!(s.allocate(&req("a", 1), 10).unwrap(), 106);
        // A sequence the backup never saw may have been used since: it starts above 100 too.
        assert_eq!(s.current("b"), 100);
        assert_eq!(s.allocate(&req("b", 1), 10).unwrap(), 101);
        // A state without a floor reads and writes as before.
        let plain = serde_json::to_string(&Sequences::default()).unwrap();
        assert_eq!(plain, r#"{"last":{}}"#);
    }

    fn req(sequence: &str, count: u64) -> AllocRequest {
        AllocRequest::new(sequence, count)
    }

    #[test]
    fn ids_are_dense_and_per_sequence() {
        let mut s = Sequences::default();
        assert_eq!(s.allocate(&req("a", 1), 10), Ok(1));
        assert_eq!(s.allocate(&req("a", 5), 10), Ok(2));
        assert_eq!(s.allocate(&req("a", 1), 10), Ok(7));
        assert_eq!(s.allocate(&req("b", 1), 10), Ok(1));
        assert_eq!(s.current("a"), 7);
        assert_eq!(s.current("zzz"), 0);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut s = Sequences::default();
        s.allocate(&req("a", 1), 1).unwrap();
        let before = s.clone();
        assert_eq!(
            s.allocate(&req("b", 1), 1),
            Err(Rejected::TooManySequences { max: 1 })
        );
        assert_eq!(s.allocate(&req("a", 0), 1), Err(Rejected::ZeroCount));
        assert!(matches!(
            s.allocate(&req("bad name", 1), 1),
            Err(Rejected::InvalidName(_))
        ));
        assert!(matches!(
            s.allocate(&req("a", u64::MAX), 1),
            Err(Rejected::Exhausted { .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn names() {
        assert!(valid_name("orders.v2_x-1"));
        assert!(valid_name(&"a".repeat(64)));
        assert!(!valid_name(&"a".repeat(65)));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name("é"));
    }
}
