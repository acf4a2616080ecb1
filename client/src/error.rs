//! The one error type of the client library, and the gRPC code names it prints.

use tonic::{Code, Status};

/// What the client library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no server address given")]
    NoServers,
    #[error("invalid server address `{0}`: {1}")]
    BadAddress(String, String),
    /// A config.json that does not say where the servers are.
    #[error("config: {0}")]
    Config(String),
    /// An admin token that an HTTP header cannot carry. The message does not show it.
    #[error("the admin token has characters a header cannot carry (visible ASCII only)")]
    BadAdminToken,
    /// A server answered with an error that retrying elsewhere would not fix.
    #[error("{}: {}", code_name(.status.code()), .status.message())]
    Rejected { server: String, status: Status },
    /// Every server was tried until the deadline.
    #[error("no server could serve the call; last error from {server}: {}: {}", code_name(.status.code()), .status.message())]
    Unavailable { server: String, status: Status },
}

impl ClientError {
    /// The gRPC status behind the error, if a server sent one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::Rejected { status, .. } | ClientError::Unavailable { status, .. } => {
                Some(status)
            }
            _ => None,
        }
    }

    /// The gRPC code behind the error; INVALID_ARGUMENT for a client built without servers,
    /// with a bad address or admin token, or from a bad config.
    pub fn code(&self) -> Code {
        self.status()
            .map(|s| s.code())
            .unwrap_or(Code::InvalidArgument)
    }
}

pub use sequencer_proto::code_name;
