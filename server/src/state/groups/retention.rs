//! Retention across groups: past `retain_total_bytes`, the group retaining the most gives its
//! oldest delivery first. The running figures are derived from the groups, so snapshots do not
//! store them; reading a snapshot rebuilds them.

use std::collections::{BTreeMap, BTreeSet};

use super::{Group, GroupLimits, Groups};

/// Payload bytes retained over all groups, and the groups retaining any, ordered by how much.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Retained {
    total: u64,
    by_size: BTreeSet<(u64, String)>,
}

impl Retained {
    pub(super) fn of(groups: &BTreeMap<String, Group>) -> Self {
        Self {
            total: groups.values().map(|g| g.retained_bytes).sum(),
            by_size: groups
                .iter()
                .filter(|(_, g)| g.retained_bytes > 0)
                .map(|(name, g)| (g.retained_bytes, name.clone()))
                .collect(),
        }
    }

    fn resize(&mut self, group: &str, before: u64, after: u64) {
        if before > 0 {
            self.by_size.remove(&(before, group.to_string()));
        }
        if after > 0 {
            self.by_size.insert((after, group.to_string()));
        }
        self.total = self.total - before + after;
    }
}

impl Groups {
    /// Accounts for `group` retaining `before` bytes until now, then drops the oldest
    /// deliveries of the groups retaining the most until all of them fit
    /// `retain_total_bytes`. Each group keeps at least its newest delivery.
    pub(super) fn retained_changed(&mut self, group: &str, before: u64, limits: &GroupLimits) {
        let after = self.groups.get(group).map_or(before, |g| g.retained_bytes);
        self.retained.resize(group, before, after);
        while self.retained.total > limits.retain_total_bytes {
            let groups = &self.groups;
            let victim = self
                .retained
                .by_size
                .iter()
                .rev()
                .find(|(_, name)| groups.get(name).is_some_and(|g| g.retained.len() > 1))
                .map(|(_, name)| name.clone());
            let Some(victim) = victim else { break };
            let Some(g) = self.groups.get_mut(&victim) else {
                break;
            };
            let before = g.retained_bytes;
            g.drop_oldest();
            let after = g.retained_bytes;
            self.retained.resize(&victim, before, after);
        }
    }

    /// Payload bytes all groups retain together.
    pub fn retained_bytes(&self) -> u64 {
        self.retained.total
    }
}
