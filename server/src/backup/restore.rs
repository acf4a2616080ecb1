//! A new cluster from a backup: fresh data dirs for every node of a config, each holding the
//! backup's state as its snapshot, with the config's nodes as the membership. Every sequence
//! is raised by `skip_ahead` first: ids handed out after the backup was taken are in no copy,
//! and handing them out again would break "never reissued".

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{CommittedLeaderId, Membership, StoredMembership};

use super::file::{read, BackupError};
use crate::config::Config;
use crate::raft::codec::encode;
use crate::raft::store::{open_store, DataDir};
use crate::raft::{LogId, Member, NodeId};
use crate::state::sequences::Floor;
use crate::state::State;

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// The log index of the backup.
    pub index: u64,
    /// Each sequence: the last id in the backup, and the last id the restored cluster counts
    /// as handed out (its next id is one above).
    /// Where a sequence not in the state starts: above this.
    pub floor: u64,
    pub floors: Vec<Floor>,
    pub dirs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(
        "refusing to restore over data that exists: {0} (a restore builds a new cluster; \
         move these aside or choose another data_dir)"
    )]
    Exists(String),
    #[error(transparent)]
    SkipTooFar(#[from] SkipTooFar),
    #[error("writing {dir}: {why}")]
    Store { dir: String, why: String },
}

/// Builds the data dirs of every node of `config` from the backup at `from`.
pub async fn restore(
    config: &Config,
    from: &Path,
    skip_ahead: u64,
) -> Result<Restored, RestoreError> {
    let backup = read(from)?;
    let dirs: Vec<(NodeId, PathBuf)> = config
        .nodes
        .iter()
        .map(|n| (n.id, config.node_dir(n.id)))
        .collect();
    let taken: Vec<String> = dirs
        .iter()
        .flat_map(|(_, d)| [d.clone(), building(d)])
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    if !taken.is_empty() {
        return Err(RestoreError::Exists(taken.join(", ")));
    }
    let mut state = backup.state;
    let floors = for_new_cluster(&mut state, skip_ahead)?;
    let members: Vec<(NodeId, Member)> = config
        .nodes
        .iter()
        .map(|n| {
            let member = Member {
                addr: n.addr.clone(),
                peer_addr: n.peer_addr.clone(),
            };
            (n.id, member)
        })
        .collect();
    let meta = snapshot_meta(&members, backup.header.index.max(1));
    let data = encode(&state).map_err(|e| RestoreError::Store {
        dir: "the state".into(),
        why: e.to_string(),
    })?;
    // Each dir is built beside its final name and renamed once all are whole, so a restore
    // that fails half way leaves no dir that a node would start from.
    for (id, dir) in &dirs {
        let tmp = building(dir);
        seed(*id, &tmp, &meta, &data)
            .await
            .map_err(|why| RestoreError::Store {
                dir: tmp.display().to_string(),
                why,
            })?;
    }
    for (_, dir) in &dirs {
        std::fs::rename(building(dir), dir).map_err(|e| RestoreError::Store {
            dir: dir.display().to_string(),
            why: e.to_string(),
        })?;
    }
    tracing::info!(
        index = backup.header.index,
        skip_ahead,
        nodes = dirs.len(),
        "restored a backup"
    );
    Ok(Restored {
        index: backup.header.index,
        floor: state.sequences.floor(),
        floors,
        dirs: dirs.into_iter().map(|(_, d)| d).collect(),
    })
}

/// A skip-ahead that would take a sequence past the largest id.
#[derive(Debug, thiserror::Error)]
#[error("--skip-ahead {skip} would take sequence {sequence} (last id {last}) past the largest id")]
pub struct SkipTooFar {
    sequence: String,
    last: u64,
    skip: u64,
}

/// `state` made ready to start a new cluster: every sequence raised by `skip`, and the
/// started set cleared (the new cluster's members announce themselves anew).
pub(super) fn for_new_cluster(state: &mut State, skip: u64) -> Result<Vec<Floor>, SkipTooFar> {
    let floors = state
        .sequences
        .skip_ahead(skip)
        .map_err(|(sequence, last)| SkipTooFar {
            sequence,
            last,
            skip,
        })?;
    state.started.clear();
    // Its nodes refuse the old cluster's, which may come back with their old data.
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        // It must differ from the old cluster's only: the time does.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = nanos.to_le_bytes();
    }
    state.incarnation = Some(id.iter().map(|b| format!("{b:02x}")).collect());
    Ok(floors)
}

/// Where `dir` is built before it takes its name.
pub(super) fn building(dir: &Path) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".restoring");
    PathBuf::from(name)
}

/// The snapshot a new cluster's nodes start from: at `index`, under term 0 (the new cluster's
/// first election is term 1, so its entries follow this one), with `members` as voters.
pub(super) fn snapshot_meta(
    members: &[(NodeId, Member)],
    index: u64,
) -> openraft::SnapshotMeta<NodeId, Member> {
    let first = members.first().map_or(1, |(id, _)| *id);
    let last = LogId::new(CommittedLeaderId::new(0, first), index);
    let voters: BTreeSet<NodeId> = members.iter().map(|(id, _)| *id).collect();
    let nodes: BTreeMap<NodeId, Member> = members.iter().cloned().collect();
    openraft::SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), Membership::new(vec![voters], nodes)),
        snapshot_id: format!("new-cluster-{index}"),
    }
}

/// One node's data dir at `dir`, holding the snapshot and an empty log purged up to it.
pub(super) async fn seed(
    id: NodeId,
    dir: &Path,
    meta: &openraft::SnapshotMeta<NodeId, Member>,
    data: &[u8],
) -> Result<(), String> {
    let data_dir = DataDir::lock(dir).map_err(|e| e.to_string())?;
    let (mut log, mut sm) = open_store(&data_dir).map_err(|e| e.to_string())?;
    sm.set_node_id(id);
    sm.install_snapshot(meta, Box::new(Cursor::new(data.to_vec())))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(last) = meta.last_log_id {
        log.purge(last).await.map_err(|e| e.to_string())?;
    }
    log.flush_journal().await.map_err(|e| e.to_string())?;
    Ok(())
}
