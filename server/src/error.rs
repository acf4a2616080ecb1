//! The server's one error type, and the one place it becomes a gRPC status, and a status an
//! HTTP status (the JSON API calls the gRPC services, so its errors are theirs).

use tonic::{Code, Status};

use crate::state::Rejected;

/// Everything a request can fail with. Clone, because one failed batch answers many waiters.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; retrying it will not help.
    #[error("{0}")]
    InvalidArgument(String),
    /// A cluster-wide limit is reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The state machine refused the command.
    #[error("{0}")]
    Rejected(#[from] Rejected),
    /// No primary, no quorum, or the primary did not answer in time: try another server.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This node's queue toward the primary is full.
    #[error("overloaded: {queued} requests already queued on this node (queue_capacity)")]
    Overloaded { queued: usize },
    /// The node is stopping.
    #[error("unavailable: node is shutting down")]
    ShuttingDown,
    /// The subscriber asked for deliveries the group no longer retains.
    #[error("{0}")]
    OutOfRange(String),
    /// A subscriber did not keep up with its group.
    #[error("{0}")]
    SlowSubscriber(String),
    /// A peer RPC without the right cluster secret.
    #[error("unauthenticated: {0}")]
    PeerUnauthenticated(String),
    /// The data dir failed its checks at start.
    #[error("data is corrupt: {0}")]
    Corrupt(String),
    /// Raft stopped on a failure (a full disk): the node exits.
    #[error("raft stopped: {0}")]
    RaftStopped(String),
    /// The node may not start as asked (an empty data dir where the cluster counts on its
    /// vote, a join the cluster refused): it exits and is not restarted.
    #[error("{0}")]
    Refused(String),
    /// The admin credential is missing or wrong.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Admin calls are off: no admin credential is configured.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A membership call named something that exists already.
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    /// The call does not fit the cluster's state now (a change in progress, a quorum that
    /// would be lost).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bug or a storage failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        crate::metrics::get().refused(&e);
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::ResourceExhausted(_) | Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::Rejected(r) => match r {
                Rejected::InvalidName(_) | Rejected::ZeroCount => Code::InvalidArgument,
                Rejected::TooManySequences { .. }
                | Rejected::Exhausted { .. }
                | Rejected::TooManyClients { .. }
                | Rejected::TooManyGroups { .. }
                | Rejected::TooManyMembers { .. } => Code::ResourceExhausted,
                Rejected::Unauthenticated => Code::Unauthenticated,
                Rejected::NotMember(_) => Code::PermissionDenied,
                Rejected::UnknownGroup(_) => Code::NotFound,
                Rejected::SenderSeqGap { .. } | Rejected::StaleRetry { .. } => {
                    Code::FailedPrecondition
                }
            },
            Error::Unavailable(_) | Error::ShuttingDown | Error::RaftStopped(_) => {
                Code::Unavailable
            }
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::SlowSubscriber(_) => Code::ResourceExhausted,
            Error::PeerUnauthenticated(_) | Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) | Error::Refused(_) => Code::FailedPrecondition,
            Error::Internal(_) | Error::Corrupt(_) => Code::Internal,
        };
        // Only load and a missing primary pass with time: say when to come back. A limit
        // such as max_sequences does not, so it carries no hint.
        let passes = matches!(
            e,
            Error::Overloaded { .. } | Error::Unavailable(_) | Error::ShuttingDown
        );
        let mut status = Status::new(code, e.to_string());
        if passes {
            status.metadata_mut().insert(
                RETRY_AFTER,
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        status
    }
}

/// Metadata of a status whose cause passes with time: seconds to wait (HTTP's Retry-After).
pub const RETRY_AFTER: &str = "retry-after";

/// The HTTP status for a gRPC code, as gRPC-gateway maps them, but for FAILED_PRECONDITION:
/// 409, like the ABORTED it resembles (the request fits the state later, not as sent).
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => 409,
        Code::ResourceExhausted => 429,
        Code::Cancelled => 499,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

/// The code's name as the gRPC spec writes it (`INVALID_ARGUMENT`), for JSON error bodies.
pub use sequencer_proto::code_name;

impl From<crate::membership::ChangeError> for Error {
    fn from(e: crate::membership::ChangeError) -> Error {
        use crate::membership::ChangeError as C;
        match e {
            C::Invalid(m) => Error::InvalidArgument(m),
            C::AlreadyExists(m) => Error::AlreadyExists(m),
            C::NotFound(m) => Error::NotFound(m),
            C::Precondition(m) => Error::FailedPrecondition(m),
            C::NotPrimary => Error::Unavailable("the primary moved during the call".into()),
            C::Unavailable(m) => Error::Unavailable(m),
        }
    }
}
