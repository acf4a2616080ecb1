//! `sequencer.v1.Sequencer`: GetId, GetIds, CurrentId.

use sequencer_proto::v1::sequencer_server::Sequencer;
use sequencer_proto::v1::{
    CurrentIdRequest, CurrentIdResponse, GetIdRequest, GetIdResponse, GetIdsRequest, GetIdsResponse,
};
use tonic::{Request, Response, Status};

use super::{checked_name, wire_id};
use crate::error::Error;
use crate::raft::state_machine::StateReader;
use crate::raft::NodeId;
use crate::state::{AllocRequest, Rejected, DEFAULT_SEQUENCE};
use crate::write::ids::Allocator;

/// The id service of one node.
pub struct SequencerApi {
    id: NodeId,
    allocator: Allocator,
    reader: StateReader,
    max_batch: u32,
    max_sequences: u32,
}

impl SequencerApi {
    pub fn new(
        id: NodeId,
        allocator: Allocator,
        reader: StateReader,
        max_batch: u32,
        max_sequences: u32,
    ) -> Self {
        Self {
            id,
            allocator,
            reader,
            max_batch,
            max_sequences,
        }
    }

    /// Refuses a new sequence early when this node already holds `max_sequences`, so such
    /// requests never reach the log. The state machine still decides when this node lags.
    fn check_room(&self, sequence: &str) -> Result<(), Error> {
        let full = self.reader.read(|a| {
            let s = &a.state.sequences;
            s.len() >= self.max_sequences as usize && s.current(sequence) == 0
        });
        if full {
            return Err(Rejected::TooManySequences {
                max: self.max_sequences,
            }
            .into());
        }
        Ok(())
    }

    fn count(&self, count: u32) -> Result<u64, Error> {
        if count == 0 || count > self.max_batch {
            return Err(Error::InvalidArgument(format!(
                "count must be between 1 and {} (max_batch), got {count}",
                self.max_batch
            )));
        }
        Ok(u64::from(count))
    }
}

/// The sequence a request names; empty means the default one.
fn sequence_name(raw: String) -> Result<String, Error> {
    if raw.is_empty() {
        return Ok(DEFAULT_SEQUENCE.to_string());
    }
    checked_name(raw, "sequence name")
}

#[tonic::async_trait]
impl Sequencer for SequencerApi {
    async fn get_id(&self, req: Request<GetIdRequest>) -> Result<Response<GetIdResponse>, Status> {
        let sequence = sequence_name(req.into_inner().sequence)?;
        self.check_room(&sequence)?;
        let grant = self
            .allocator
            .submit(AllocRequest { sequence, count: 1 })
            .await?;
        crate::metrics::get().ids_issued.inc();
        Ok(Response::new(GetIdResponse {
            id: grant.first,
            served_by: wire_id(self.id),
            primary: wire_id(grant.primary),
        }))
    }

    async fn get_ids(
        &self,
        req: Request<GetIdsRequest>,
    ) -> Result<Response<GetIdsResponse>, Status> {
        let req = req.into_inner();
        let count = self.count(req.count)?;
        let sequence = sequence_name(req.sequence)?;
        self.check_room(&sequence)?;
        let grant = self
            .allocator
            .submit(AllocRequest { sequence, count })
            .await?;
        crate::metrics::get().ids_issued.inc_by(count);
        Ok(Response::new(GetIdsResponse {
            first: grant.first,
            count: req.count,
            served_by: wire_id(self.id),
            primary: wire_id(grant.primary),
        }))
    }

    async fn current_id(
        &self,
        req: Request<CurrentIdRequest>,
    ) -> Result<Response<CurrentIdResponse>, Status> {
        let sequence = sequence_name(req.into_inner().sequence)?;
        let (id, applied_index) = self.reader.read(|a| {
            (
                a.state.sequences.current(&sequence),
                a.last_applied.map(|l| l.index).unwrap_or(0),
            )
        });
        Ok(Response::new(CurrentIdResponse {
            id,
            served_by: wire_id(self.id),
            applied_index,
        }))
    }
}
