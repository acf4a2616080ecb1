//! `--force-new-cluster`: a survivor's data turned into a one-node cluster, as etcd does, when
//! a majority of the cluster is lost for good. The survivor's state is its snapshot with every
//! entry of its log applied (committed or not: an allocation it holds but never saw committed
//! only raises a floor); every sequence is raised by `skip_ahead`, since the lost majority may
//! have acknowledged entries the survivor never received. The old dir is kept beside the new.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};

use super::restore::{building, for_new_cluster, seed, snapshot_meta, SkipTooFar};
use crate::config::Config;
use crate::peer::PeerClients;
use crate::raft::codec::encode;
use crate::raft::store::{open_store, DataDir};
use crate::raft::{Member, NodeId};
use crate::tls::TlsMaterial;

/// How long each old member has to answer before it counts as gone.
const PING: Duration = Duration::from_secs(2);

/// What a forced new cluster holds.
#[derive(Debug)]
pub struct Forced {
    pub index: u64,
    /// Where a sequence not in the state starts: above this.
    pub floor: u64,
    pub floors: Vec<crate::state::sequences::Floor>,
    /// Where the old data now is.
    pub kept: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ForceError {
    #[error(
        "refusing --force-new-cluster: nodes {answered:?} of the membership {voters:?} answer, \
         so with this node they could still form a quorum; start this node as usual instead"
    )]
    QuorumAlive {
        answered: Vec<NodeId>,
        voters: Vec<NodeId>,
    },
    #[error("node {0}: its data dir holds no Raft state to force a new cluster from")]
    Empty(NodeId),
    #[error(transparent)]
    SkipTooFar(#[from] SkipTooFar),
    #[error("{0}")]
    Store(String),
}

fn store<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ForceError + '_ {
    move |e| ForceError::Store(format!("{what}: {e}"))
}

/// Turns node `id`'s data into a one-node cluster of itself.
pub async fn force_new_cluster(
    config: &Config,
    id: NodeId,
    skip_ahead: u64,
) -> Result<Forced, ForceError> {
    let dir = config.node_dir(id);
    let (mut state, index, voters, addresses) = {
        let data = DataDir::lock(&dir).map_err(store("opening the data dir"))?;
        let (mut log, mut sm) = open_store(&data).map_err(store("opening the store"))?;
        let last = log
            .get_log_state()
            .await
            .map_err(store("reading the log"))?
            .last_log_id;
        let (applied, _) = sm
            .applied_state()
            .await
            .map_err(store("reading the state"))?;
        let from = applied.map_or(0, |l| l.index + 1);
        if let Some(last) = last.filter(|l| l.index >= from) {
            let entries = log
                .try_get_log_entries(from..=last.index)
                .await
                .map_err(store("reading the log"))?;
            sm.apply(entries).await.map_err(store("applying the log"))?;
        }
        sm.reader().read(|a| {
            let m = a.membership.membership();
            let voters: BTreeSet<NodeId> = m.voter_ids().collect();
            let addresses: Vec<(NodeId, Member)> =
                m.nodes().map(|(id, m)| (*id, m.clone())).collect();
            let index = a.last_applied.map(|l| l.index);
            (a.state.clone(), index, voters, addresses)
        })
    };
    let index = index.ok_or(ForceError::Empty(id))?;
    refuse_if_alive(config, id, &voters, &addresses).await?;

    let floors = for_new_cluster(&mut state, skip_ahead)?;
    let me = config
        .node(id)
        .map(|n| Member {
            addr: n.addr.clone(),
            peer_addr: n.peer_addr.clone(),
        })
        .ok_or_else(|| ForceError::Store(format!("node {id} is not in the config")))?;
    let meta = snapshot_meta(&[(id, me)], index.max(1));
    let data = encode(&state).map_err(store("encoding the state"))?;
    let fresh = building(&dir);
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).map_err(store("clearing a half-built dir"))?;
    }
    seed(id, &fresh, &meta, &data)
        .await
        .map_err(|e| ForceError::Store(format!("writing {}: {e}", fresh.display())))?;
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut kept = dir.as_os_str().to_owned();
    kept.push(format!(".before-force-{secs}"));
    let kept = PathBuf::from(kept);
    std::fs::rename(&dir, &kept).map_err(store("moving the old data aside"))?;
    std::fs::rename(&fresh, &dir).map_err(store("putting the new data in place"))?;
    tracing::info!(
        node = id,
        index,
        skip_ahead,
        kept = %kept.display(),
        "forced a new one-node cluster from this node's data"
    );
    Ok(Forced {
        index,
        floor: state.sequences.floor(),
        floors,
        kept,
    })
}

/// Refuses when the other old voters that answer, with this node, make a quorum.
async fn refuse_if_alive(
    config: &Config,
    id: NodeId,
    voters: &BTreeSet<NodeId>,
    addresses: &[(NodeId, Member)],
) -> Result<(), ForceError> {
    let tls = TlsMaterial::load(config, id).map_err(store("TLS"))?;
    let peers = PeerClients::new(config, id, tls.as_ref()).map_err(store("peers"))?;
    for (other, m) in addresses {
        if *other != id && !m.peer_addr.is_empty() && peers.get(*other).is_none() {
            let _ = peers.add(*other, &m.peer_addr);
        }
    }
    let pings = voters.iter().filter(|v| **v != id).map(|v| {
        let peers = &peers;
        async move {
            match peers.get(*v) {
                Some(p) => p.ping(PING).await.ok().map(|_| *v),
                None => None,
            }
        }
    });
    let answered: Vec<NodeId> = futures::future::join_all(pings)
        .await
        .into_iter()
        .flatten()
        .collect();
    let with_me = answered.len() + usize::from(voters.contains(&id));
    if !answered.is_empty() && with_me > voters.len() / 2 {
        return Err(ForceError::QuorumAlive {
            answered,
            voters: voters.iter().copied().collect(),
        });
    }
    Ok(())
}
