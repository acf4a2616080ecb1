//! The latest snapshot on disk: one plain file, replaced whole.
//!
//! A save writes a temporary file in 1 MiB steps, each flushed on its own, then renames it over
//! the old one: one large flush would make the log's small fsyncs on the same disk queue
//! behind it. The file ends with a SHA-256 of everything before it, so damage is found when it
//! is read. Layout: `SEQSNAP1`, the metadata's length (u32, little endian), the metadata
//! (JSON), the encoded state, the SHA-256.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openraft::SnapshotMeta;
use redb::{Database, ReadableDatabase, TableDefinition};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::datadir::{create_private, replace_durably};
use super::log_store::LOG_FILE;
use super::StoreError;
use crate::raft::codec::{decode, encode};
use crate::raft::{LogId, Member, NodeId};

/// The latest snapshot, a plain file of its own: in the log's redb file, writing a large
/// snapshot held redb's one writer, and every append waited behind it.
pub(crate) const SNAPSHOT_FILE: &str = "snapshot.bin";
const TMP_FILE: &str = "snapshot.tmp";
const MAGIC: &[u8; 8] = b"SEQSNAP1";
const SUM_LEN: usize = 32;
/// Bytes written between two flushes.
const STEP: usize = 1 << 20;

pub(crate) type Meta = SnapshotMeta<NodeId, Member>;

/// A snapshot as stored: openraft's metadata and our encoded state.
pub(crate) struct StoredSnapshot {
    pub(crate) meta: Meta,
    pub(crate) data: Vec<u8>,
}

/// What the saves so far left on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Saved {
    /// The last log id the stored snapshot covers.
    pub(super) covers: Option<LogId>,
    /// The newest snapshot whose save failed: whoever waits for it to be stored can stop.
    pub(super) failed: Option<LogId>,
}

/// The snapshot file of one data dir. Saves are serialized, and an older snapshot never
/// replaces a newer one.
pub(crate) struct SnapshotFile {
    dir: PathBuf,
    /// Held across a save: a build and an install may finish together.
    saving: Mutex<()>,
    saved: watch::Sender<Saved>,
}

impl SnapshotFile {
    /// Opens the snapshot file of `dir`, if there is one, dropping what a crash left half
    /// written.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Option<StoredSnapshot>), StoreError> {
        match std::fs::remove_file(dir.join(TMP_FILE)) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                return Err(io_err(&dir.join(TMP_FILE), e));
            }
            _ => {}
        }
        let file = Self {
            dir: dir.to_path_buf(),
            saving: Mutex::new(()),
            saved: watch::channel(Saved::default()).0,
        };
        let stored = file.load()?;
        file.saved.send_replace(Saved {
            covers: stored.as_ref().and_then(|s| s.meta.last_log_id),
            failed: None,
        });
        Ok((file, stored))
    }

    /// Follows what is stored, as each save lands or fails.
    pub(super) fn saved(&self) -> watch::Receiver<Saved> {
        self.saved.subscribe()
    }

    /// Reads the stored snapshot. Blocks: call it off the async workers.
    pub(crate) fn load(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let path = self.dir.join(SNAPSHOT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path, e)),
        };
        parse(&bytes)
            .map(Some)
            .map_err(|why| StoreError::Damaged { path, why })
    }

    /// Writes `snapshot` durably, unless the stored one is at least as new; says whether it
    /// wrote. Blocks: call it off the async workers.
    pub(crate) fn save(&self, meta: &Meta, data: &[u8]) -> Result<bool, StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let last = meta.last_log_id;
        let stored = self.saved.borrow().covers;
        if stored.is_some() && stored >= last {
            return Ok(false);
        }
        let res = self.write(meta, data);
        if res.is_ok() {
            crate::metrics::get()
                .snapshot_bytes
                .set(i64::try_from(data.len()).unwrap_or(i64::MAX));
        }
        self.saved.send_modify(|saved| match res {
            Ok(()) => saved.covers = last,
            Err(_) => saved.failed = saved.failed.max(last),
        });
        res.map(|()| true).map_err(|source| StoreError::Io {
            what: "writing",
            path: self.dir.join(SNAPSHOT_FILE),
            source,
        })
    }

    fn write(&self, meta: &Meta, data: &[u8]) -> std::io::Result<()> {
        let meta = encode(meta).map_err(std::io::Error::other)?;
        let meta_len = u32::try_from(meta.len()).map_err(std::io::Error::other)?;
        let mut sum = Sha256::new();
        let tmp = self.dir.join(TMP_FILE);
        let mut file = create_private(&tmp)?;
        let mut write = |part: &[u8]| -> std::io::Result<()> {
            sum.update(part);
            for step in part.chunks(STEP) {
                file.write_all(step)?;
                if step.len() == STEP {
                    file.sync_data()?;
                }
            }
            Ok(())
        };
        write(MAGIC)?;
        write(&meta_len.to_le_bytes())?;
        write(&meta)?;
        write(data)?;
        file.write_all(&sum.finalize())?;
        file.sync_all()?;
        drop(file);
        replace_durably(&self.dir, &tmp, SNAPSHOT_FILE)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    }
}

/// Data dirs from before the snapshot file kept the snapshot in a table of the log's redb
/// file: moves it into the file, then drops the table. Each step is durable, so a crash in
/// between repeats the move. Says whether there was one to move.
pub(super) fn move_snapshot(log_db: &Database, file: &SnapshotFile) -> Result<bool, StoreError> {
    const OLD: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
    #[derive(Deserialize)]
    struct OldSnapshot {
        meta: Meta,
        data: Vec<u8>,
    }
    let old = {
        let txn = log_db.begin_read()?;
        let table = match txn.open_table(OLD) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        let current = table.get("current")?;
        current.map(|v| v.value().to_vec())
    };
    if let Some(bytes) = &old {
        let old: OldSnapshot = decode(bytes).map_err(StoreError::codec(
            "decoding the snapshot kept in the log's file",
        ))?;
        file.save(&old.meta, &old.data)?;
    }
    let txn = log_db.begin_write()?;
    txn.delete_table(OLD)?;
    txn.commit()?;
    if old.is_some() {
        tracing::info!(
            to = SNAPSHOT_FILE,
            "moved the snapshot out of {LOG_FILE} (a data dir from an earlier version)"
        );
    }
    Ok(old.is_some())
}

/// A whole snapshot from the file's bytes, or what is wrong with them.
pub(crate) fn parse(bytes: &[u8]) -> Result<StoredSnapshot, String> {
    let head = MAGIC.len() + 4;
    if bytes.len() < head + SUM_LEN {
        return Err(format!("is cut short ({} bytes)", bytes.len()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err("is not a snapshot file (unknown header)".into());
    }
    let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err("fails its checksum (damaged or cut short)".into());
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&body[MAGIC.len()..head]);
    let meta_end = head
        .checked_add(u32::from_le_bytes(len) as usize)
        .filter(|&end| end <= body.len())
        .ok_or("has a metadata length beyond its end")?;
    let meta = decode(&body[head..meta_end])
        .map_err(|e| format!("has metadata that does not decode: {e}"))?;
    Ok(StoredSnapshot {
        meta,
        data: body[meta_end..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use openraft::{CommittedLeaderId, StoredMembership};

    use super::*;

    fn meta(index: u64) -> Meta {
        let last = LogId::new(CommittedLeaderId::new(1, 1), index);
        Meta {
            last_log_id: Some(last),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s-{index}"),
        }
    }

    #[test]
    fn a_save_cut_short_by_a_crash_leaves_the_last_whole_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (file, stored) = SnapshotFile::open(dir.path()).unwrap();
        assert!(stored.is_none());
        // Several flush steps, so the write path that flushes as it goes is the one tested.
        let data: Vec<u8> = (0..3 * STEP + 5).map(|i| i as u8).collect();
        assert!(file.save(&meta(7), &data).unwrap());
        assert_eq!(file.saved().borrow().covers, meta(7).last_log_id);
        let path = dir.path().join(SNAPSHOT_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // A crash in the middle of the next save.
        std::fs::write(dir.path().join(TMP_FILE), &data[..STEP]).unwrap();
        drop(file);
        let (file, stored) = SnapshotFile::open(dir.path()).unwrap();
        let stored = stored.expect("the whole snapshot is still there");
        assert_eq!(stored.meta.last_log_id, meta(7).last_log_id);
        assert_eq!(stored.data, data);
        assert!(!dir.path().join(TMP_FILE).exists(), "the half save stayed");
        assert_eq!(file.saved().borrow().covers, meta(7).last_log_id);

        // Older never replaces newer; newer does.
        assert!(!file.save(&meta(6), b"older").unwrap());
        assert!(file.save(&meta(8), b"newer").unwrap());
        let stored = file.load().unwrap().unwrap();
        assert_eq!(
            (stored.meta.last_log_id, stored.data),
            (meta(8).last_log_id, b"newer".to_vec())
        );
    }

    #[test]
    fn a_file_that_is_not_a_whole_snapshot_is_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = SnapshotFile::open(dir.path()).unwrap();
        file.save(&meta(3), b"state").unwrap();
        let bytes = std::fs::read(dir.path().join(SNAPSHOT_FILE)).unwrap();
        assert!(parse(&bytes).is_ok());
        let mut cases = vec![Vec::new(), b"SEQSNAP1".to_vec(), bytes[1..].to_vec()];
        cases.extend((0..bytes.len()).map(|i| {
            let mut b = bytes.clone();
            b[i] ^= 1;
            b
        }));
        cases.extend((0..bytes.len()).map(|len| bytes[..len].to_vec()));
        for case in cases {
            std::fs::write(dir.path().join(SNAPSHOT_FILE), &case).unwrap();
            assert!(
                matches!(file.load(), Err(StoreError::Damaged { .. })),
                "{} bytes read as a snapshot",
                case.len()
            );
        }
    }
}
