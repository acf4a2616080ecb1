//! A backup taken on a running node: a read barrier through the primary first, so the copy
//! holds every write acknowledged before the call, then this node's applied state, copied
//! under the state's lock (messages are shared, not copied) and encoded off it.

use std::time::{SystemTime, UNIX_EPOCH};

use super::file::{encode_file, BackupMember, Header, FORMAT};
use crate::error::Error;
use crate::raft::state_machine::StateReader;
use crate::raft::NodeId;
use crate::write::proposer::Proposer;

/// A taken backup: its header and the whole file's bytes.
pub struct Taken {
    pub header: Header,
    pub bytes: Vec<u8>,
}

/// Takes a backup on node `id`.
pub async fn take(id: NodeId, proposer: &Proposer, reader: &StateReader) -> Result<Taken, Error> {
    proposer.read_barrier().await?;
    let (state, index, members) = reader.read(|a| {
        let membership = a.membership.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, m)| BackupMember {
                id: *id,
                addr: m.addr.clone(),
                peer_addr: m.peer_addr.clone(),
                voter: voters.contains(id),
            })
            .collect::<Vec<_>>();
        (
            a.state.clone(),
            a.last_applied.map_or(0, |l| l.index),
            members,
        )
    });
    let header = Header {
        format: FORMAT,
        index,
        taken_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        served_by: id,
        members,
        sequences: state.sequences.len() as u64,
        groups: state.groups.counts().1 as u64,
    };
    let head = header.clone();
    let bytes = tokio::task::spawn_blocking(move || encode_file(&head, &state))
        .await
        .map_err(|e| Error::Internal(format!("encoding the backup: {e}")))?
        .map_err(|e| Error::Internal(e.to_string()))?;
    tracing::info!(
        node = id,
        index,
        bytes = bytes.len(),
        sequences = header.sequences,
        groups = header.groups,
        "took a backup"
    );
    Ok(Taken { header, bytes })
}
