//! The public gRPC services, one file each, plus health. They validate input, call into the
//! node, and turn [`crate::error::Error`] into a status through its one `From` impl.

pub mod cluster;
pub mod health;
pub mod sequencer;

/// Node ids are u64 in Raft and u32 on the wire; config validation keeps them within u32.
pub(crate) fn wire_id(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(u32::MAX)
}
