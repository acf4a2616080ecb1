//! The cluster's membership after bootstrap. `config.json` names the nodes of the first start;
//! from then on the Raft membership is the truth: who votes, who is a learner, and where each
//! is reached. Here:
//!
//! - [`book`]: the membership as this node has applied it, and the peer clients kept in step
//!   with it;
//! - [`change`]: what an operator asks for (list, add, promote, remove), carried out on the
//!   primary with openraft's `add_learner` and `change_membership` (joint consensus), one
//!   change at a time;
//! - [`transfer`]: handing the primary to another voter without an election timeout;
//! - [`join`]: a node with an empty data dir entering a cluster that already exists.

pub mod book;
pub mod change;
pub mod join;
pub mod transfer;

pub use book::{Book, View};
pub use change::{Call, ChangeError, Done, Listing, Membership};
