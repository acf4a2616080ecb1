//! Runs openraft's own storage test suite against our redb-backed log store and state
//! machine, so a change to either that breaks openraft's storage contract fails here first.

use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;
use tempfile::TempDir;

use super::log_store::LogStore;
use super::{open_store, DataDir};
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeId, TypeConfig};

/// Builds a fresh store in its own temp dir for each suite case; the dir is the guard. The
/// suite purges logs with no snapshot stored, so the purge guard is off (it has its own test).
struct RedbStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for RedbStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().expect("creating temp dir");
        let data = DataDir::lock(dir.path()).expect("locking data dir");
        let (log, sm) = open_store(&data).expect("opening redb store");
        Ok((dir, log.without_purge_guard(), sm))
    }
}

// A plain #[test]: the suite starts a fresh tokio runtime per case and would panic inside one.
#[test]
fn redb_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(RedbStoreBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
