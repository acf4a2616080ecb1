//! The store's tests: the log store through openraft's traits, crashes (the files as a kill -9
//! leaves them), and the checks at start against lost, damaged and rewritten files.

use std::io::Cursor;

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, SnapshotMeta, StoredMembership};

use super::*;
use crate::error::Error;
use crate::raft::state_machine::StateMachine;
use crate::raft::store::journal::{Journal, JOURNAL_FILE};
use crate::raft::store::open::STORE_MARKER;
use crate::raft::store::snapshot_file::{self, SNAPSHOT_FILE};
use crate::raft::store::{open_store, DataDir};
use crate::state::State;

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// Writes `entries` straight into the log table, as appends would have left them.
async fn put_entries(log: &LogStore, entries: Vec<Entry<TypeConfig>>) {
    let rows: Vec<(u64, Vec<u8>)> = entries
        .iter()
        .map(|e| (e.log_id.index, encode(e).unwrap()))
        .collect();
    log.write(move |txn| {
        let mut t = txn.open_table(LOGS)?;
        for (i, bytes) in &rows {
            t.insert(*i, bytes.as_slice())?;
        }
        Ok(())
    })
    .await
    .unwrap();
}

/// Installs an empty-state snapshot covering the log up to `index`, as the primary would.
async fn install_snapshot_upto(sm: &mut StateMachine, index: u64) {
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(index)),
        last_membership: StoredMembership::default(),
        snapshot_id: format!("s-{index}"),
    };
    let bytes = encode(&State::default()).unwrap();
    sm.install_snapshot(&meta, Box::new(Cursor::new(bytes)))
        .await
        .unwrap();
}

fn indexes(store: &LogStore) -> Vec<u64> {
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(LOGS).unwrap();
    table
        .iter()
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect()
}

/// The store's files as a kill -9 now would leave them, in a dir of their own.
fn crash_copy(dir: &std::path::Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for name in [LOG_FILE, JOURNAL_FILE, STORE_MARKER] {
        std::fs::copy(dir.join(name), copy.path().join(name)).unwrap();
    }
    copy
}

/// The log indexes redb alone holds in `dir`, looked at in a copy: opening a file after a
/// crash repairs it, and the store must see it unrepaired.
fn redb_alone(dir: &std::path::Path) -> Vec<u64> {
    let probe = crash_copy(dir);
    let db = Database::create(probe.path().join(LOG_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(LOGS).unwrap();
    let keys = table
        .iter()
        .unwrap()
        .map(|r| r.unwrap().0.value())
        .collect();
    keys
}

/// Everything a node reads from its store at start, as comparable text.
async fn contents(dir: &std::path::Path) -> Result<String, Error> {
    let data = DataDir::lock(dir)?;
    let (mut log, mut sm) = open_store(&data)?;
    let vote = log
        .read_vote()
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let state = log
        .get_log_state()
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let entries = log
        .try_get_log_entries(..)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?;
    let snapshot = sm
        .get_current_snapshot()
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map(|s| (s.meta, s.snapshot.into_inner()));
    Ok(format!(
        "{}|{}|{}|{}|{}",
        encode(&vote).unwrap_or_default().len(),
        String::from_utf8_lossy(&encode(&vote).unwrap_or_default()),
        String::from_utf8_lossy(
            &encode(&(state.last_purged_log_id, state.last_log_id)).unwrap_or_default()
        ),
        String::from_utf8_lossy(&encode(&entries).unwrap_or_default()),
        String::from_utf8_lossy(&encode(&snapshot).unwrap_or_default()),
    ))
}

#[tokio::test]
async fn a_crash_keeps_the_journaled_appends_and_nothing_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (mut log, _sm) = open_store(&data).unwrap();
    let entry = |term, index| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Blank,
    };
    log.append_durably((1..=5).map(|i| entry(1, i)))
        .await
        .unwrap();
    // A durable commit: the journal starts a new generation, so 3..=5 never come back.
    log.truncate(entry(1, 3).log_id).await.unwrap();
    log.append_durably([entry(2, 3)]).await.unwrap();
    log.append_durably([entry(2, 4)]).await.unwrap();

    // kill -9 now. redb alone rolls back to its last durable commit; the journal has the
    // rest.
    assert_eq!(redb_alone(dir.path()), vec![1, 2]);
    let crashed = crash_copy(dir.path());
    let data = DataDir::lock(crashed.path()).unwrap();
    let (mut log, _sm) = open_store(&data).unwrap();
    let read = log.try_get_log_entries(1..=10).await.unwrap();
    let ids: Vec<LogId> = read.iter().map(|e| e.log_id).collect();
    let expected: Vec<LogId> = [entry(1, 1), entry(1, 2), entry(2, 3), entry(2, 4)]
        .iter()
        .map(|e| e.log_id)
        .collect();
    assert_eq!(ids, expected);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(entry(2, 4).log_id));
}

#[tokio::test]
async fn after_a_flush_redb_alone_holds_every_append() {
    use JOURNAL_FILE;
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (log, _sm) = open_store(&data).unwrap();
    log.append_durably(blanks(1..=3)).await.unwrap();
    log.flush_journal().await.unwrap();
    // As a kill -9 would leave them, and without the journal's help.
    assert_eq!(redb_alone(dir.path()), vec![1, 2, 3]);
    // And the journal has nothing left to replay.
    let generation: u64 = log.read_meta(JOURNAL_GENERATION).unwrap().unwrap();
    let (_, records) = Journal::open(dir.path(), generation, true).unwrap();
    assert!(records.is_empty());
    assert!(dir.path().join(JOURNAL_FILE).exists());
}

#[tokio::test]
async fn an_append_too_big_for_the_journal_commits_redb_durably() {
    use crate::state::{AllocRequest, Command};
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (log, _sm) = open_store(&data).unwrap();
    log.append_durably(blanks(1..=2)).await.unwrap();
    let big = (3..=11).map(|i| Entry::<TypeConfig> {
        log_id: log_id(i),
        payload: EntryPayload::Normal(Command::Allocate {
            requests: vec![AllocRequest {
                sequence: "s".repeat(1 << 20),
                count: 1,
            }],
            max_sequences: 1,
        }),
    });
    log.append_durably(big).await.unwrap();
    log.append_durably(blanks(12..=12)).await.unwrap();
    // Up to the big append, durable in redb; the one after it, in the journal only.
    assert_eq!(redb_alone(dir.path()), (1..=11).collect::<Vec<_>>());
    let crashed = crash_copy(dir.path());
    let data = DataDir::lock(crashed.path()).unwrap();
    let (mut log, _sm) = open_store(&data).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(12)));
}

#[test]
fn journaled_rows_must_continue_the_log() {
    let rows = |indexes: &[u64]| {
        indexes
            .iter()
            .map(|&i| (i, format!("entry {i}").into_bytes()))
            .collect::<Vec<_>>()
    };
    // redb holds entries 1..=5 as the journal wrote them, and 6 otherwise.
    let stored = |index: u64| {
        Ok(match index {
            1..=5 => Some(format!("entry {index}").into_bytes()),
            6 => Some(b"another entry 6".to_vec()),
            _ => None,
        })
    };
    assert!(check_follows(&rows(&[2, 3]), Some(1), None, stored).is_ok());
    assert!(check_follows(&rows(&[1]), None, None, stored).is_ok());
    assert!(check_follows(&rows(&[7, 8]), Some(6), Some(6), stored).is_ok());
    // A clean close made the journaled tail durable in redb too.
    assert!(check_follows(&rows(&[4, 5, 6]), Some(5), None, stored).is_ok());
    for (rows, last, purged, why) in [
        (rows(&[3]), Some(1), None, "does not continue the log"),
        (rows(&[2, 4]), Some(1), None, "does not continue the log"),
        (rows(&[2]), None, None, "does not continue the log"),
        (rows(&[6]), Some(6), Some(6), "does not continue the log"),
        (rows(&[6, 7]), Some(6), None, "with other contents"),
    ] {
        let err = check_follows(&rows, last, purged, stored).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}

#[tokio::test]
async fn a_log_rewritten_under_the_journal_is_refused() {
    use LOG_FILE;
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (log, _sm) = open_store(&data).unwrap();
    log.append_durably(blanks(1..=3)).await.unwrap();
    let crashed = crash_copy(dir.path());
    // An earlier version, which knows no journal, ran after the crash and took other
    // entries 1..=3 from a new primary.
    {
        let db = redb::Database::create(crashed.path().join(LOG_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(LOGS).unwrap();
            for i in 1..=3u64 {
                let entry = Entry::<TypeConfig> {
                    log_id: LogId::new(CommittedLeaderId::new(9, 2), i),
                    payload: EntryPayload::Blank,
                };
                table.insert(i, encode(&entry).unwrap().as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    match contents(crashed.path()).await {
        Err(Error::Corrupt(msg)) => {
            assert!(
                msg.contains("raft.journal") && msg.contains("other contents"),
                "{msg}"
            )
        }
        other => panic!("opened: {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_lost_journal_is_refused_and_stays_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let data = DataDir::lock(dir.path()).unwrap();
        let (log, _sm) = open_store(&data).unwrap();
        log.append_durably(blanks(1..=3)).await.unwrap();
    }
    std::fs::remove_file(dir.path().join(JOURNAL_FILE)).unwrap();
    for attempt in ["first", "second"] {
        match contents(dir.path()).await {
            Err(Error::Corrupt(msg)) => {
                assert!(msg.contains("raft.journal"), "{attempt}: {msg}")
            }
            other => panic!("{attempt} start after the loss: {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn reads_give_the_entries_last_written_whether_from_memory_or_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (mut log, mut sm) = open_store(&data).unwrap();
    let entry = |term, index| Entry::<TypeConfig> {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Blank,
    };
    let read = |log: &mut LogStore, range: std::ops::RangeInclusive<u64>| {
        let mut log = log.clone();
        async move {
            let entries = log.try_get_log_entries(range).await.unwrap();
            entries.iter().map(|e| e.log_id).collect::<Vec<_>>()
        }
    };
    let ids = |term, range: std::ops::RangeInclusive<u64>| {
        range
            .map(|i| LogId::new(CommittedLeaderId::new(term, 1), i))
            .collect::<Vec<_>>()
    };

    log.append_durably((1..=5).map(|i| entry(1, i)))
        .await
        .unwrap();
    assert_eq!(read(&mut log, 1..=5).await, ids(1, 1..=5));
    assert_eq!(read(&mut log, 3..=4).await, ids(1, 3..=4));

    // A follower's conflicting tail goes, from memory too.
    log.truncate(entry(1, 4).log_id).await.unwrap();
    assert_eq!(read(&mut log, 1..=5).await, ids(1, 1..=3));
    log.append_durably((4..=6).map(|i| entry(2, i)))
        .await
        .unwrap();
    let mut expected = ids(1, 1..=3);
    expected.extend(ids(2, 4..=6));
    assert_eq!(read(&mut log, 1..=6).await, expected);
    assert_eq!(read(&mut log, 4..=6).await, ids(2, 4..=6));

    // Purged entries are gone, from memory too.
    install_snapshot_upto(&mut sm, 2).await;
    log.purge(entry(1, 2).log_id).await.unwrap();
    assert_eq!(read(&mut log, 1..=6).await, expected[2..].to_vec());
    assert_eq!(read(&mut log, 3..=6).await, expected[2..].to_vec());

    // What was written is what a restart reads.
    drop((log, sm));
    drop(data);
    let data = DataDir::lock(dir.path()).unwrap();
    let (mut log, _sm) = open_store(&data).unwrap();
    assert_eq!(read(&mut log, 3..=6).await, expected[2..].to_vec());
}

#[tokio::test]
async fn a_store_that_went_missing_is_refused_and_stays_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("raft.redb");
    {
        let data = DataDir::lock(dir.path()).unwrap();
        let (log, _sm) = open_store(&data).unwrap();
        log.write(|_| Ok(())).await.unwrap();
    }
    // A data dir from before the marker existed: opened as it is, and marked.
    std::fs::remove_file(dir.path().join(STORE_MARKER)).unwrap();
    let before = contents(dir.path()).await.unwrap();
    assert!(dir.path().join(STORE_MARKER).exists());
    assert_eq!(contents(dir.path()).await.unwrap(), before);

    std::fs::remove_file(&store).unwrap();
    for attempt in ["first", "second"] {
        match contents(dir.path()).await {
            Err(Error::Corrupt(msg)) => {
                assert!(msg.contains("raft.redb"), "{attempt}: {msg}")
            }
            other => panic!("{attempt} start after the loss: {:?}", other.map(|_| ())),
        }
        assert!(!store.exists(), "{attempt}: a new empty store was made");
    }
}

#[tokio::test]
async fn a_flipped_or_truncated_store_is_refused_or_reads_exactly_as_written() {
    use crate::state::{AllocRequest, Command};
    let dir = tempfile::tempdir().unwrap();
    let entries = |range: std::ops::RangeInclusive<u64>| {
        range
            .map(|i| Entry::<TypeConfig> {
                log_id: log_id(i),
                payload: EntryPayload::Normal(Command::Allocate {
                    requests: vec![AllocRequest {
                        sequence: format!("sequence-{}", i % 7),
                        count: i,
                    }],
                    max_sequences: 100,
                }),
            })
            .collect::<Vec<_>>()
    };
    // The journal's last record, which a crash may have cut short: dropped, not refused
    // (the journal's own test covers it).
    let last_record = {
        let data = DataDir::lock(dir.path()).unwrap();
        let (mut log, mut sm) = open_store(&data).unwrap();
        put_entries(&log, entries(1..=400)).await;
        log.save_vote(&Vote::new_committed(7, 2)).await.unwrap();
        install_snapshot_upto(&mut sm, 100).await;
        // Appends since the last durable commit, left in the journal as by a crash.
        for first in (401..=440).step_by(8) {
            log.append_durably(entries(first..=first + 7))
                .await
                .unwrap();
        }
        let before = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        log.append_durably(entries(441..=443)).await.unwrap();
        let after = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        let changed: Vec<usize> = (0..after.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        changed[0]..changed[changed.len() - 1] + 1
    };
    // Read before any open: an open commits the journal to redb and starts it over.
    let files = [LOG_FILE, SNAPSHOT_FILE, JOURNAL_FILE]
        .map(|name| (name, std::fs::read(dir.path().join(name)).unwrap()));
    let copy_of = |damaged: &str, bytes: &[u8]| {
        let copy = tempfile::tempdir().unwrap();
        for (name, file) in &files {
            let bytes = if *name == damaged { bytes } else { file };
            std::fs::write(copy.path().join(name), bytes).unwrap();
        }
        copy
    };
    let original = contents(copy_of("", &[]).path()).await.unwrap();
    assert!(
        original.contains(r#""index":443"#),
        "the journal was not replayed"
    );

    let mut refused = std::collections::HashMap::<&str, usize>::new();
    let mut intact = 0;
    // (file to damage, its damaged bytes, what was done, must it be refused)
    let mut cases: Vec<(&str, Vec<u8>, String, bool)> = Vec::new();
    for (name, file) in &files {
        let flips: Vec<usize> = match *name {
            // redb's pages are 4 KiB.
            LOG_FILE => (0..file.len())
                .step_by(4096)
                .flat_map(|page| [page + 40, page + 2100])
                .collect(),
            // The live records, and what older generations and the zero fill left.
            JOURNAL_FILE => (0..last_record.start)
                .step_by(44)
                .chain((last_record.end..file.len()).step_by(1 << 20))
                .collect(),
            // The snapshot file is a few hundred bytes here.
            _ => (0..file.len()).step_by(16).map(|at| at + 5).collect(),
        };
        for at in flips {
            if at + 4 > file.len() {
                continue;
            }
            let mut bytes = file.clone();
            for b in &mut bytes[at..at + 4] {
                *b ^= 0x5a;
            }
            cases.push((name, bytes, format!("{name}: bytes flipped at {at}"), false));
        }
        let lens = [0, 100, 4096, file.len() / 2, file.len() - 1];
        for len in lens.into_iter().filter(|&len| len < file.len()) {
            cases.push((
                name,
                file[..len].to_vec(),
                format!("{name}: truncated to {len} bytes"),
                true,
            ));
        }
    }
    for (damaged, bytes, what, must_refuse) in cases {
        let copy = copy_of(damaged, &bytes);
        match contents(copy.path()).await {
            Err(Error::Corrupt(msg)) => {
                assert!(msg.contains(damaged), "{what}: unclear message {msg}");
                // redb may have rewritten the file into a consistent older state: the
                // next start must refuse it all the same.
                match contents(copy.path()).await {
                    Err(Error::Corrupt(again)) => {
                        assert!(again.contains("earlier start"), "{what}: {again}")
                    }
                    other => panic!("{what}: refused once, then {:?}", other.map(|_| ())),
                }
                *refused.entry(damaged).or_default() += 1;
            }
            Err(e) => panic!("{what}: failed with something else than Corrupt: {e}"),
            // Free space: nothing that is read changed.
            Ok(read) => {
                assert!(!must_refuse, "{what}: was not refused");
                assert_eq!(read, original, "{what}: read back different contents");
                intact += 1;
            }
        }
    }
    // The sweep must have hit live parts of every file, or it proves nothing.
    for (name, _) in &files {
        let n = refused.get(name).copied().unwrap_or_default();
        assert!(
            n > 10,
            "{name}: only {n} of the flips were noticed ({intact} harmless in all)"
        );
    }
}

fn blanks(indexes: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
    indexes
        .map(|i| Entry::<TypeConfig> {
            log_id: log_id(i),
            payload: EntryPayload::Blank,
        })
        .collect()
}

/// A store with the log purged up to 6 behind a snapshot of 6, entries up to 10.
async fn purged_store(dir: &std::path::Path) {
    let data = DataDir::lock(dir).unwrap();
    let (mut log, mut sm) = open_store(&data).unwrap();
    put_entries(&log, blanks(1..=10)).await;
    install_snapshot_upto(&mut sm, 6).await;
    log.purge(log_id(6)).await.unwrap();
}

#[tokio::test]
async fn a_snapshot_kept_in_the_log_file_moves_to_its_own_file() {
    let dir = tempfile::tempdir().unwrap();
    purged_store(dir.path()).await;
    let expected = contents(dir.path()).await.unwrap();
    // Back to the layout of earlier versions: the snapshot, as JSON, in a table of the
    // log's redb file.
    #[derive(serde::Serialize)]
    struct OldSnapshot<'a> {
        meta: &'a snapshot_file::Meta,
        data: &'a [u8],
    }
    const OLD: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
    let snapshot_file = dir.path().join(SNAPSHOT_FILE);
    let stored = snapshot_file::parse(&std::fs::read(&snapshot_file).unwrap()).unwrap();
    std::fs::remove_file(&snapshot_file).unwrap();
    {
        let old = encode(&OldSnapshot {
            meta: &stored.meta,
            data: &stored.data,
        })
        .unwrap();
        let last = encode(&stored.meta.last_log_id).unwrap();
        let db = Database::open(dir.path().join(LOG_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(OLD).unwrap();
            table.insert("current", old.as_slice()).unwrap();
            table.insert("last_log_id", last.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    for start in ["first", "second"] {
        assert_eq!(contents(dir.path()).await.unwrap(), expected, "{start}");
        let db = Database::open(dir.path().join(LOG_FILE)).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(
            matches!(
                txn.open_table(OLD),
                Err(redb::TableError::TableDoesNotExist(_))
            ),
            "{start}: the old copy is still in the log file"
        );
    }
}

#[tokio::test]
async fn a_lost_snapshot_is_refused_once_the_log_was_purged_behind_it() {
    // Not purged: the log still holds everything, and a start replays it.
    let dir = tempfile::tempdir().unwrap();
    {
        let data = DataDir::lock(dir.path()).unwrap();
        let (_log, mut sm) = open_store(&data).unwrap();
        install_snapshot_upto(&mut sm, 6).await;
    }
    std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
    contents(dir.path()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    purged_store(dir.path()).await;
    std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).unwrap();
    match contents(dir.path()).await {
        Err(Error::Corrupt(msg)) => assert!(
            msg.contains(SNAPSHOT_FILE) && msg.contains("index 6"),
            "{msg}"
        ),
        other => panic!("started without the snapshot: {:?}", other.map(|_| ())),
    }
    match contents(dir.path()).await {
        Err(Error::Corrupt(msg)) => assert!(msg.contains("earlier start"), "{msg}"),
        other => panic!("refused once, then {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_purge_waiting_for_a_snapshot_that_failed_to_save_gives_up_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (log, mut sm) = open_store(&data).unwrap();
    put_entries(&log, blanks(1..=10)).await;
    // A save cannot create its temporary file where a directory stands.
    std::fs::create_dir(dir.path().join("snapshot.tmp")).unwrap();
    let snapshot = |index: u64| {
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("s-{index}"),
        };
        (
            meta,
            Box::new(Cursor::new(encode(&State::default()).unwrap())),
        )
    };
    // Well under the 61 s a purge waits for a snapshot that is merely slow.
    let limit = Duration::from_secs(20);

    // The purge waits first, then the install fails.
    let mut purging = log.clone();
    let purge = tokio::spawn(async move { purging.purge(log_id(4)).await });
    let (meta, cursor) = snapshot(4);
    assert!(sm.install_snapshot(&meta, cursor).await.is_err());
    let res = tokio::time::timeout(limit, purge)
        .await
        .expect("the purge kept waiting for a snapshot that failed")
        .unwrap();
    let err = res.expect_err("purged with no snapshot stored").to_string();
    assert!(err.contains("failed to save"), "{err}");

    // The install fails first, then the purge comes.
    let (meta, cursor) = snapshot(6);
    assert!(sm.install_snapshot(&meta, cursor).await.is_err());
    let mut purging = log.clone();
    tokio::time::timeout(limit, purging.purge(log_id(5)))
        .await
        .expect("the purge kept waiting for a snapshot that failed")
        .expect_err("purged with no snapshot stored");
    assert_eq!(indexes(&log), (1..=10).collect::<Vec<_>>());

    // Once a covering snapshot is stored, the purge goes through.
    std::fs::remove_dir(dir.path().join("snapshot.tmp")).unwrap();
    install_snapshot_upto(&mut sm, 7).await;
    let mut purging = log.clone();
    purging.purge(log_id(5)).await.unwrap();
    assert_eq!(indexes(&log), (6..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_log_is_never_purged_past_the_stored_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::lock(dir.path()).unwrap();
    let (log, mut sm) = open_store(&data).unwrap();
    put_entries(&log, blanks(1..=10)).await;

    // As after an install from the primary: the purge is issued before the snapshot is in.
    let mut purging = log.clone();
    let mut purge = tokio::spawn(async move { purging.purge(log_id(6)).await });
    let early = tokio::time::timeout(Duration::from_millis(300), &mut purge).await;
    assert!(early.is_err(), "purged with no snapshot stored");
    assert_eq!(indexes(&log), (1..=10).collect::<Vec<_>>());

    install_snapshot_upto(&mut sm, 6).await;
    tokio::time::timeout(Duration::from_secs(10), purge)
        .await
        .expect("purge still waiting after the snapshot was stored")
        .unwrap()
        .unwrap();
    assert_eq!(indexes(&log), (7..=10).collect::<Vec<_>>());
    let mut reader = log.clone();
    let state = reader.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(6)));
}
