//! The public gRPC services, one file each, plus health. They validate input, call into the
//! node, and turn [`crate::error::Error`] into a status through its one `From` impl.

pub mod admin;
pub mod cluster;
pub mod health;
pub mod messenger;
pub mod sequencer;
pub mod tracker;

use crate::error::Error;
use crate::state::valid_name;

/// `raw` if it is a valid name, else INVALID_ARGUMENT saying what `what` must look like.
pub(crate) fn checked_name(raw: String, what: &str) -> Result<String, Error> {
    if valid_name(&raw) {
        return Ok(raw);
    }
    // Quote what was sent, escaped and short: the error stays one readable line.
    let mut shown = String::new();
    for c in raw.chars() {
        let escaped: String = c.escape_debug().collect();
        if shown.len() + escaped.len() > 80 {
            shown.push('…');
            break;
        }
        shown.push_str(&escaped);
    }
    Err(Error::InvalidArgument(format!(
        "invalid {what} \"{shown}\": must match [A-Za-z0-9._-]{{1,64}}"
    )))
}

/// Node ids are u64 in Raft and u32 on the wire; config validation keeps them within u32.
pub(crate) fn wire_id(id: u64) -> u32 {
    u32::try_from(id).unwrap_or(u32::MAX)
}
