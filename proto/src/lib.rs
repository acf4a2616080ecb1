//! Generated gRPC code for the sequencer: the public `sequencer.v1` services and the
//! node-to-node `sequencer.peer.v1` service.

/// The public API: Sequencer and Cluster.
pub mod v1 {
    tonic::include_proto!("sequencer.v1");

    /// Encoded file descriptors of the public services, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("sequencer_v1_descriptor");
}

/// Node-to-node traffic. Not for clients.
pub mod peer {
    tonic::include_proto!("sequencer.peer.v1");
}

/// The part of etcd's v3 API that `client bench --system etcd` calls, to compare with etcd.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// `INVALID_ARGUMENT` style names, as grpcurl and the gRPC docs spell them.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
