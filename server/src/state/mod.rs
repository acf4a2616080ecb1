//! The replicated state machine: what every node applies, in log order.
//!
//! It is plain data and pure functions, so it knows nothing of Raft, gRPC or disks. Every id
//! comes from the counters here, updated only by applying a committed command.

mod sequences;

use serde::{Deserialize, Serialize};

pub use sequences::{valid_sequence_name, AllocRequest, Sequences, DEFAULT_SEQUENCE};

/// A command in the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Hands each request `count` consecutive ids of its sequence, in order. One entry carries a
    /// whole batch. `max_sequences` travels with the command so that every node decides the
    /// same, whatever its own config says.
    Allocate {
        requests: Vec<AllocRequest>,
        max_sequences: u32,
    },
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Reply {
    /// Entries that carry no command (Raft's own blank and membership entries).
    #[default]
    None,
    /// The first id of each request of an `Allocate`, in request order.
    Allocated(Vec<Result<u64, Rejected>>),
}

/// Why the state machine refused one request. Deterministic: every node refuses alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejected {
    #[error("invalid sequence name `{0}`: must match [A-Za-z0-9._-]{{1,64}}")]
    InvalidName(String),
    #[error("count must be at least 1")]
    ZeroCount,
    #[error("too many sequences: the cluster keeps at most {max} (max_sequences)")]
    TooManySequences { max: u32 },
    #[error("sequence `{sequence}` is exhausted: no ids left below 2^64")]
    Exhausted { sequence: String },
}

/// The whole replicated state. Snapshots serialize exactly this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub sequences: Sequences,
}

impl State {
    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> Reply {
        match command {
            Command::Allocate {
                requests,
                max_sequences,
            } => Reply::Allocated(
                requests
                    .iter()
                    .map(|r| self.sequences.allocate(r, *max_sequences))
                    .collect(),
            ),
        }
    }
}
