//! [`KeepAlive`]: heartbeats for one group-messaging identity, from a task the guard owns.

use tokio::task::JoinHandle;
use tonic::Code;

use crate::{Client, Identity};

/// Heartbeats per interval the server asks for. Its failure timeout is two intervals, and on
/// a loaded machine a beat can be slow or lost: four leave room for several.
const BEATS_PER_INTERVAL: u32 = 4;

/// Keeps an identity alive while it exists: dropping it stops the heartbeats.
#[must_use = "dropping a KeepAlive stops its heartbeats at once"]
pub struct KeepAlive {
    task: JoinHandle<()>,
}

impl Client {
    /// Heartbeats for `me` from now on, at the interval the servers ask for, until the guard is
    /// dropped or a server answers that it does not know `me` (removed or unregistered).
    /// Failed heartbeats are logged and the beats go on. Must be called within a Tokio runtime.
    ///
    /// The heartbeats share this client's connections. HTTP/2 flow control is per connection,
    /// so a client whose subscription may go unread should keep alive on a client of its own.
    pub fn keep_alive(&self, me: &Identity) -> KeepAlive {
        let client = self.share();
        let me = me.clone();
        let task = tokio::spawn(async move {
            // Only the first failure of a run is a warning: a cluster that is down would
            // otherwise fill the log four times an interval per identity.
            let mut failing = false;
            loop {
                match client.heartbeat(&me).await {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!(client_id = me.client_id, "heartbeats answered again");
                    }
                    Ok(_) => {}
                    Err(e) if e.code() == Code::Unauthenticated => {
                        tracing::warn!(client_id = me.client_id, "heartbeats stop: {e}");
                        return;
                    }
                    Err(e) if failing => {
                        tracing::debug!(client_id = me.client_id, "heartbeat failed: {e}")
                    }
                    Err(e) => {
                        failing = true;
                        tracing::warn!(client_id = me.client_id, "heartbeat failed: {e}");
                    }
                }
                tokio::time::sleep(client.heartbeat_interval() / BEATS_PER_INTERVAL).await;
            }
        });
        KeepAlive { task }
    }
}

impl KeepAlive {
    /// Whether it still heartbeats.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops the heartbeats and waits until the task is gone.
    pub async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
