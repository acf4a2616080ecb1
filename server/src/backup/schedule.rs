//! Scheduled backups: every `backup_interval_s`, the primary writes one into `backup_dir`
//! (a node that is not primary writes none) and keeps the newest `backup_keep`. A file takes
//! its name only once it is whole and durable, so a crash mid-write leaves no file that
//! passes as a backup.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::take::take;
use crate::config::BackupSchedule;
use crate::raft::state_machine::StateReader;
use crate::raft::{NodeId, Raft};
use crate::write::proposer::Proposer;

const PREFIX: &str = "backup-";
const SUFFIX: &str = ".seqbak";

/// Runs until `stop`.
pub async fn run(
    id: NodeId,
    raft: Raft,
    proposer: Proposer,
    reader: StateReader,
    schedule: BackupSchedule,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(schedule.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: a node just started takes its first backup one interval on.
    tick.tick().await;
    // What a crash mid-write left never took a backup's name; it goes now.
    sweep(&schedule.dir);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if raft.metrics().borrow().current_leader != Some(id) {
            continue;
        }
        match write_one(id, &proposer, &reader, &schedule).await {
            Ok((path, bytes)) => tracing::info!(
                node = id,
                file = %path.display(),
                bytes,
                "wrote a scheduled backup"
            ),
            Err(e) => tracing::warn!(
                node = id,
                dir = %schedule.dir.display(),
                error = %e,
                "scheduled backup failed"
            ),
        }
    }
}

async fn write_one(
    id: NodeId,
    proposer: &Proposer,
    reader: &StateReader,
    schedule: &BackupSchedule,
) -> Result<(PathBuf, usize), String> {
    let taken = take(id, proposer, reader)
        .await
        .map_err(|e| e.to_string())?;
    let name = format!(
        "{PREFIX}{:020}-{}{SUFFIX}",
        taken.header.index, taken.header.taken_at_ms
    );
    let (dir, keep) = (schedule.dir.clone(), schedule.keep);
    let bytes = taken.bytes;
    let len = bytes.len();
    tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
        let path = write_atomically(&dir, &name, &bytes).map_err(|e| e.to_string())?;
        rotate(&dir, keep).map_err(|e| format!("removing old backups: {e}"))?;
        Ok(path)
    })
    .await
    .map_err(|e| e.to_string())?
    .map(|p| (p, len))
}

/// `bytes` as `dir/name`: a temporary file, fsync, rename, fsync of the dir.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    // It holds every message and the clients' token hashes: the owner's only.
    let mut file = crate::raft::store::datadir::create_private(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    crate::raft::store::datadir::replace_durably(dir, &tmp, name)?;
    Ok(dir.join(name))
}

/// Removes all but the newest `keep` backups of `dir` (names sort by index, then time).
fn rotate(dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    for old in &names[..excess] {
        std::fs::remove_file(dir.join(old))?;
    }
    Ok(())
}

/// Removes temporary files a crash left in `dir`.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
