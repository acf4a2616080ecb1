//! The waits on a [`Cluster`]: until its nodes agree on a primary, a value is applied
//! everywhere, a snapshot is on disk. Each polls with a deadline ([`READY_TIMEOUT`]) and fails
//! at once if a node it counts on has exited; none sleeps in the hope that a node is up.

use std::time::Duration;

use anyhow::bail;
use tokio::time::{sleep, Instant};

use crate::cluster::StoredSnapshot;
use crate::{Cluster, READY_TIMEOUT};

impl Cluster {
    /// Waits until every running node names the same running primary; returns its id.
    pub async fn wait_for_primary(&mut self) -> anyhow::Result<u64> {
        let running = self.running();
        self.wait_for_primary_among(&running).await
    }

    /// Waits until the nodes `ids` (running ones) name the same primary among them: for
    /// when another node is cut off or paused and still believes what it believed.
    pub async fn wait_for_primary_among(&mut self, ids: &[u64]) -> anyhow::Result<u64> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Some(p) = self.agreed_primary(ids).await {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no agreed primary among {ids:?} within {:?}\n{}",
                    READY_TIMEOUT,
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until CurrentId of `sequence` is `expected` on every running node.
    pub async fn wait_current_id(&mut self, sequence: &str, expected: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let mut seen = Vec::new();
            for id in self.running() {
                let c = self.client_for(id).with_deadline(Duration::from_secs(1));
                seen.push((id, c.current_id(sequence).await.map(|r| r.id).ok()));
            }
            if seen.iter().all(|(_, v)| *v == Some(expected)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "CurrentId({sequence}) never reached {expected} everywhere: {seen:?}\n{}",
                    self.log_tails()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn agreed_primary(&self, ids: &[u64]) -> Option<u64> {
        let running = self.running();
        let members: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| running.contains(id))
            .collect();
        let mut agreed = None;
        for &id in &members {
            let c = self
                .client_for(id)
                .with_deadline(Duration::from_millis(500));
            let p = u64::from(c.status().await.ok()?.primary);
            if p == 0 || !members.contains(&p) || agreed.is_some_and(|a| a != p) {
                return None;
            }
            agreed = Some(p);
        }
        agreed
    }

    /// Fails if a node we believe is running has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            if let Some(child) = &mut n.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let id = n.id;
                    n.child = None;
                    bail!(
                        "node {id} exited unexpectedly ({status})\n{}",
                        self.log_tails()
                    );
                }
            }
        }
        Ok(())
    }

    /// Waits until node `id` holds a snapshot covering log index `at_least`, and returns it.
    pub async fn wait_snapshot(
        &mut self,
        id: u64,
        at_least: u64,
    ) -> anyhow::Result<StoredSnapshot> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            let snapshot = self.snapshot(id)?;
            match snapshot {
                Some(s) if s.index >= Some(at_least) => return Ok(s),
                _ if Instant::now() >= deadline => bail!(
                    "node {id} holds no snapshot covering index {at_least}: {snapshot:?}\n{}",
                    self.log_tails()
                ),
                _ => sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Waits until node `id`'s log holds `needle`.
    pub async fn wait_log(&self, id: u64, needle: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log(id).contains(needle) {
            if Instant::now() >= deadline {
                bail!("node {id} never logged {needle:?}\n{}", self.log(id));
            }
            sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until every node has announced that it runs as a member: from then on an empty
    /// data dir under its id is a lost disk, which the cluster refuses.
    pub async fn wait_all_started(&self) -> anyhow::Result<()> {
        for id in self.running() {
            self.wait_log(id, "announced this node as a started member")
                .await?;
        }
        Ok(())
    }

    /// Waits for node `id` to refuse its start: it exits with the config-error code (2), and
    /// the one line it says is returned.
    pub async fn wait_refused(&mut self, id: u64) -> anyhow::Result<String> {
        let status = self.wait_exit(id, Duration::from_secs(20)).await?;
        let log = self.log(id);
        if status.code() != Some(2) {
            bail!("node {id} exited with {status}, not 2\n{log}");
        }
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("server:")).collect();
        match lines.as_slice() {
            [line] => Ok(line.to_string()),
            _ => bail!("node {id} did not refuse in one line\n{log}"),
        }
    }
}
