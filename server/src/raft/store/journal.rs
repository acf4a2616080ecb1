//! The log's journal: what makes an append durable with one sequential write and one
//! `fdatasync`, where a durable redb commit rewrites several scattered B-tree pages before its
//! sync (157 against 95 µs on this disk, and half again the CPU; BENCHMARKS.md).
//!
//! An append writes its rows here and syncs them, then commits them to redb without syncing,
//! so they are readable at once. Every other write of the log store commits redb durably, which
//! makes all earlier commits durable too, and records in the same transaction that the journal
//! starts a new *generation*: only records of the generation redb names are replayed at start.
//! So the journal never holds more than the appends since the last durable commit.
//!
//! The file has a fixed size (`JOURNAL_BYTES`, zero-filled when it is made), so a sync never
//! has to write the file's metadata. Each record: payload length (u32), CRC-32 (u32) of the
//! length, the generation and the payload, the generation (u64), then the payload padded to 16
//! bytes; the payload is the rows, each an index (u64), a length (u32) and the encoded entry.
//! Little endian throughout.
//!
//! Only the last record can be cut short by a crash, since each append is synced before the
//! next is written: a record that does not read back whole ends the journal if nothing whole
//! of its generation follows it, and is damage if something does. A whole record of a newer
//! generation than redb names is damage too: redb fell back to an older commit.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::datadir::{create_private, replace_durably};
use super::StoreError;

/// The log's journal: appends are durable once written and synced here, before redb holds
/// them durably.
pub(crate) const JOURNAL_FILE: &str = "raft.journal";
/// The journal's size. An append that does not fit in what is left commits redb durably
/// instead, and the journal starts over.
pub(super) const JOURNAL_BYTES: usize = 8 << 20;
const TMP_FILE: &str = "raft.journal.tmp";
const HEADER: usize = 16;
const ALIGN: usize = 16;

/// Log table rows: an index and its encoded entry.
pub(super) type Rows = Vec<(u64, Vec<u8>)>;

/// The open journal of one data dir.
pub(super) struct Journal {
    file: File,
    /// For errors.
    path: PathBuf,
    generation: u64,
    /// Where the next record goes.
    end: usize,
}

impl Journal {
    /// Opens the journal of `dir`, making it when there is none and `must_exist` is false, and
    /// returns the whole records of `generation`, oldest first. Blocks.
    pub(super) fn open(
        dir: &Path,
        generation: u64,
        must_exist: bool,
    ) -> Result<(Self, Vec<Rows>), StoreError> {
        let path = dir.join(JOURNAL_FILE);
        let io = |source| StoreError::Io {
            what: "reading",
            path: path.clone(),
            source,
        };
        let damaged = |why| StoreError::Damaged {
            path: path.clone(),
            why,
        };
        match std::fs::remove_file(dir.join(TMP_FILE)) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound && must_exist => {
                return Err(damaged(
                    "is missing, though raft.redb says appends were journaled there".into(),
                ))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                make(dir).map_err(io)?;
                vec![0; JOURNAL_BYTES]
            }
            Err(e) => return Err(io(e)),
        };
        if bytes.len() != JOURNAL_BYTES {
            return Err(damaged(format!(
                "is {} bytes long, not {JOURNAL_BYTES} (cut short or extended)",
                bytes.len()
            )));
        }
        let (records, end) = live_records(&bytes, generation).map_err(damaged)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let journal = Self {
            file,
            path,
            generation,
            end,
        };
        Ok((journal, records))
    }

    /// The generation records are written in.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Writes one record of `rows` and syncs it; false, writing nothing, if it does not fit in
    /// what is left.
    pub(super) fn append(&mut self, rows: &[(u64, Vec<u8>)]) -> Result<bool, StoreError> {
        self.write(rows).map_err(|source| StoreError::Io {
            what: "writing",
            path: self.path.clone(),
            source,
        })
    }

    fn write(&mut self, rows: &[(u64, Vec<u8>)]) -> std::io::Result<bool> {
        let record = encode_record(self.generation, rows)?;
        if self.end + record.len() > JOURNAL_BYTES {
            return Ok(false);
        }
        self.file.write_all_at(&record, self.end as u64)?;
        let fsync = std::time::Instant::now();
        self.file.sync_data()?;
        crate::metrics::observe(
            &crate::metrics::get().journal_fsync_seconds,
            fsync.elapsed(),
        );
        self.end += record.len();
        Ok(true)
    }

    /// Everything written so far is durable in redb, which now names `generation`: start it
    /// at the front. The records left behind are of an older generation and are never read.
    pub(super) fn restart(&mut self, generation: u64) {
        self.generation = generation;
        self.end = 0;
    }
}

/// Makes a zero-filled journal under a temporary name and renames it into place, so a crash
/// never leaves one of the wrong size.
fn make(dir: &Path) -> std::io::Result<()> {
    let tmp = dir.join(TMP_FILE);
    let mut file = create_private(&tmp)?;
    file.write_all(&vec![0; JOURNAL_BYTES])?;
    file.sync_all()?;
    drop(file);
    replace_durably(dir, &tmp, JOURNAL_FILE)
}

fn encode_record(generation: u64, rows: &[(u64, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    let too_big = |_| std::io::Error::other("journal record above 4 GiB");
    let mut record = vec![0; HEADER];
    for (index, bytes) in rows {
        record.extend_from_slice(&index.to_le_bytes());
        record.extend_from_slice(&u32::try_from(bytes.len()).map_err(too_big)?.to_le_bytes());
        record.extend_from_slice(bytes);
    }
    let len = u32::try_from(record.len() - HEADER).map_err(too_big)?;
    record.resize(HEADER + (len as usize).next_multiple_of(ALIGN), 0);
    record[0..4].copy_from_slice(&len.to_le_bytes());
    record[8..16].copy_from_slice(&generation.to_le_bytes());
    let crc = checksum(
        &record[0..4],
        &record[8..16],
        &record[HEADER..HEADER + len as usize],
    );
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(record)
}

fn checksum(len: &[u8], generation: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(len);
    crc.update(generation);
    crc.update(payload);
    crc.finalize()
}

/// The whole record at `at` if `wanted` takes its generation: the generation, the rows, and
/// where the next record starts. The generation is checked first, as a cheap filter.
fn record_at(bytes: &[u8], at: usize, wanted: impl Fn(u64) -> bool) -> Option<(u64, Rows, usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let word = |range: std::ops::Range<usize>| &header[range];
    let generation = u64::from_le_bytes(word(8..16).try_into().ok()?);
    if !wanted(generation) {
        return None;
    }
    let len = u32::from_le_bytes(word(0..4).try_into().ok()?) as usize;
    let start = at + HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    if len == 0
        || checksum(word(0..4), word(8..16), payload)
            != u32::from_le_bytes(word(4..8).try_into().ok()?)
    {
        return None;
    }
    let rows = parse_rows(payload)?;
    Some((generation, rows, start + len.next_multiple_of(ALIGN)))
}

fn parse_rows(mut payload: &[u8]) -> Option<Rows> {
    let mut rows = Vec::new();
    while !payload.is_empty() {
        let index = u64::from_le_bytes(payload.get(0..8)?.try_into().ok()?);
        let len = u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?) as usize;
        let bytes = payload.get(12..12usize.checked_add(len)?)?;
        rows.push((index, bytes.to_vec()));
        payload = &payload[12 + len..];
    }
    Some(rows)
}

/// The whole records of `generation` from the front, and where they end; damage if a whole
/// record of it follows one that is not, or if the journal starts with a newer generation.
fn live_records(bytes: &[u8], generation: u64) -> Result<(Vec<Rows>, usize), String> {
    // Every generation starts at the front, and redb names the newest before any record of it
    // is written. A newer one there means redb lost its newest commits (fell back to an older
    // one after damage), and what was journaled since would be lost without a word.
    if let Some((newer, _, _)) = record_at(bytes, 0, |g| g > generation) {
        return Err(format!(
            "starts with a record of generation {newer}, newer than generation {generation}, \
             which raft.redb names (raft.redb lost its newest commits)"
        ));
    }
    let mut records = Vec::new();
    let mut end = 0;
    while let Some((_, rows, next)) = record_at(bytes, end, |g| g == generation) {
        records.push(rows);
        end = next;
    }
    let later = (end + ALIGN..bytes.len())
        .step_by(ALIGN)
        .find(|&at| record_at(bytes, at, |g| g == generation).is_some());
    if let Some(later) = later {
        return Err(format!(
            "has a damaged record at byte {end} followed by a whole one at byte {later}"
        ));
    }
    Ok((records, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(indexes: std::ops::RangeInclusive<u64>) -> Rows {
        indexes
            .map(|i| {
                (
                    i,
                    format!("entry {i}").repeat(i as usize % 5 + 1).into_bytes(),
                )
            })
            .collect()
    }

    #[test]
    fn records_read_back_as_written_and_only_of_their_generation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, records) = Journal::open(dir.path(), 3, false).unwrap();
        assert!(records.is_empty());
        assert!(journal.append(&rows(1..=3)).unwrap());
        assert!(journal.append(&rows(4..=4)).unwrap());
        assert!(journal.append(&rows(5..=9)).unwrap());
        drop(journal);
        let (mut journal, records) = Journal::open(dir.path(), 3, true).unwrap();
        assert_eq!(records, vec![rows(1..=3), rows(4..=4), rows(5..=9)]);

        // A new generation at the front hides what the old one left behind it.
        journal.restart(4);
        assert!(journal.append(&rows(10..=10)).unwrap());
        drop(journal);
        let (_, records) = Journal::open(dir.path(), 4, true).unwrap();
        assert_eq!(records, vec![rows(10..=10)]);
        let (_, records) = Journal::open(dir.path(), 5, true).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn a_record_cut_short_ends_the_journal_and_damage_before_a_whole_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 1, false).unwrap();
        let written = [rows(1..=2), rows(3..=5), rows(6..=6)];
        let (mut starts, mut padding) = (Vec::new(), Vec::new());
        for r in &written {
            starts.push(journal.end);
            let payload: usize = r.iter().map(|(_, b)| 12 + b.len()).sum();
            assert!(journal.append(r).unwrap());
            padding.push(journal.end - payload.next_multiple_of(ALIGN) + payload..journal.end);
        }
        let end = journal.end;
        drop(journal);
        let path = dir.path().join(JOURNAL_FILE);
        let clean = std::fs::read(&path).unwrap();
        let open = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            Journal::open(dir.path(), 1, true).map(|(_, records)| records)
        };
        for at in 0..end {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            let last = at >= starts[2];
            match open(&bytes) {
                Ok(records) => {
                    // Padding is not covered by the checksum, and is never read.
                    let in_padding = padding.iter().any(|p| p.contains(&at));
                    assert!(last || in_padding, "flip at {at} went unnoticed");
                    let expected = if last && !in_padding {
                        &written[..2]
                    } else {
                        &written[..]
                    };
                    assert_eq!(records, expected, "flip at {at}");
                }
                Err(StoreError::Damaged { why: msg, .. }) => {
                    assert!(!last, "flip at {at} in the last record refused: {msg}");
                    assert!(
                        !padding.iter().any(|p| p.contains(&at)),
                        "padding at {at}: {msg}"
                    );
                    assert!(msg.contains("followed by a whole one"), "{msg}");
                }
                Err(e) => panic!("flip at {at}: {e}"),
            }
        }
        // A crash in the middle of the last write: the record is cut short.
        for cut in [starts[2] + 1, starts[2] + HEADER, padding[2].start - 1] {
            let mut bytes = clean.clone();
            bytes[cut..end].fill(0);
            assert_eq!(open(&bytes).unwrap(), written[..2], "cut at {cut}");
        }
        for len in [0, HEADER, JOURNAL_BYTES - 1, JOURNAL_BYTES + 1] {
            let mut bytes = clean.clone();
            bytes.resize(len, 0);
            assert!(
                matches!(open(&bytes), Err(StoreError::Damaged { why: m, .. }) if m.contains("bytes long")),
                "{len} bytes"
            );
        }
    }

    #[test]
    fn a_journal_newer_than_redb_says_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 5, false).unwrap();
        assert!(journal.append(&rows(1..=2)).unwrap());
        drop(journal);
        // raft.redb fell back to a commit that named an older generation.
        for older in [0, 4] {
            match Journal::open(dir.path(), older, true) {
                Err(StoreError::Damaged { why: m, .. }) => {
                    assert!(m.contains("generation 5"), "{m}")
                }
                other => panic!("generation {older}: {:?}", other.map(|(_, r)| r)),
            }
        }
        // An older generation at the front is what a new one leaves before its first record.
        let (_, records) = Journal::open(dir.path(), 6, true).unwrap();
        assert!(records.is_empty());
    }

    #[test]
    fn a_journal_that_should_be_there_and_is_not_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Journal::open(dir.path(), 2, true),
            Err(StoreError::Damaged { why: m, .. }) if m.contains("missing")
        ));
        assert!(!dir.path().join(JOURNAL_FILE).exists());
        // A crash while it was being made leaves only the temporary file, which goes.
        std::fs::write(dir.path().join(TMP_FILE), b"half").unwrap();
        Journal::open(dir.path(), 0, false).unwrap();
        assert!(!dir.path().join(TMP_FILE).exists());
        let meta = std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(meta.len() as usize, JOURNAL_BYTES);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_record_that_does_not_fit_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), 1, false).unwrap();
        let big = vec![(1, vec![7; JOURNAL_BYTES / 2])];
        assert!(journal.append(&big).unwrap());
        let again = vec![(2, vec![7; JOURNAL_BYTES / 2])];
        assert!(!journal.append(&again).unwrap());
        drop(journal);
        let (mut journal, records) = Journal::open(dir.path(), 1, true).unwrap();
        assert_eq!(records, vec![big]);
        journal.restart(2);
        assert!(journal.append(&again).unwrap());
    }
}
