//! The write path, in the order a request meets it. Every write (an id, a Send, a
//! registration) is made once, by the primary, in the Raft log:
//!
//! 1. [`batch`]: group commit. One task per kind of request gathers everything that arrives
//!    while the previous entry is in flight into ONE command, within the entry bounds.
//!    [`ids`] (the id plan) and [`sends`] (the Send plan) say how requests become a command
//!    and how the reply splits back.
//! 2. [`proposer`]: gets the command committed, and waits until this node has applied it, so
//!    every reply reflects state this node already holds.
//! 3. [`primary`]: the one route to the primary: act here if this node is primary, forward
//!    otherwise, and retry across elections until the request's deadline.
//!
//! [`liveness`] takes client heartbeats over the same route and runs the primary's failure
//! detector, which writes the removal of silent clients through the proposer.

pub mod batch;
pub mod ids;
pub mod liveness;
pub mod primary;
pub mod proposer;
pub mod sends;
