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
