//! The log's newest entries in memory: every entry is read back right after its append, to
//! replicate and to apply, and this spares each read a redb transaction and a decode.

use std::collections::VecDeque;

use openraft::Entry;

use crate::raft::TypeConfig;

/// Most entries, and most encoded bytes, kept in memory after their append.
const RECENT_ENTRIES: usize = 1024;
const RECENT_BYTES: usize = 8 * 1024 * 1024;

/// The newest entries, as last appended with their encoded sizes. Contiguous, and when not
/// empty it ends at the last entry of the log.
#[derive(Default)]
pub(super) struct Recent {
    entries: VecDeque<(Entry<TypeConfig>, usize)>,
    bytes: usize,
}

impl Recent {
    pub(super) fn push(&mut self, entry: Entry<TypeConfig>, size: usize) {
        if let Some((last, _)) = self.entries.back() {
            if last.log_id.index + 1 != entry.log_id.index {
                self.clear();
            }
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_ENTRIES || self.bytes > RECENT_BYTES {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Drops every entry from `index` on.
    pub(super) fn truncate(&mut self, index: u64) {
        while matches!(self.entries.back(), Some((e, _)) if e.log_id.index >= index) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops every entry up to `index`.
    pub(super) fn purge(&mut self, index: u64) {
        while matches!(self.entries.front(), Some((e, _)) if e.log_id.index <= index) {
            self.pop_front();
        }
    }

    /// The entries `first..=last`, if all of them are here.
    pub(super) fn get(&self, first: u64, last: u64) -> Option<Vec<Entry<TypeConfig>>> {
        let (front, _) = self.entries.front()?;
        let (back, _) = self.entries.back()?;
        if first > last || first < front.log_id.index || last > back.log_id.index {
            return None;
        }
        let skip = (first - front.log_id.index) as usize;
        let take = (last - first + 1) as usize;
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}
