//! The backup file. Layout: `SEQBKUP1`, the header's length (u32, little endian), the header
//! (JSON: format version, log index, time, members), the encoded state, and a SHA-256 of
//! everything before it, so a file cut short or damaged anywhere is refused whole.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::raft::codec::{decode, encode};
use crate::state::State;

const MAGIC: &[u8; 8] = b"SEQBKUP1";
const SUM_LEN: usize = 32;
/// The version of the header and state encoding this build writes and reads.
pub const FORMAT: u32 = 1;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The log index the state was applied up to.
    pub index: u64,
    /// Milliseconds since the Unix epoch when it was taken.
    pub taken_at_ms: u64,
    /// The node that took it.
    pub served_by: u64,
    /// The members of the cluster it came from: (id, client address, peer address, voter).
    pub members: Vec<BackupMember>,
    pub sequences: u64,
    pub groups: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMember {
    pub id: u64,
    pub addr: String,
    pub peer_addr: String,
    pub voter: bool,
}

/// A backup read back.
#[derive(Debug)]
pub struct Backup {
    pub header: Header,
    pub state: State,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: cannot read it: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("encoding the backup: {0}")]
    Encode(String),
}

/// The whole file for `header` and `state`.
pub fn encode_file(header: &Header, state: &State) -> Result<Vec<u8>, BackupError> {
    let e = |e: serde_json::Error| BackupError::Encode(e.to_string());
    let head = encode(header).map_err(e)?;
    let body = encode(state).map_err(e)?;
    let len =
        u32::try_from(head.len()).map_err(|_| BackupError::Encode("header too long".into()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + head.len() + body.len() + SUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&body);
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// The backup in `bytes`, read from `path` (named in errors), or what is wrong with it.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Backup, BackupError> {
    let bad = |what: String| BackupError::Invalid {
        path: path.display().to_string(),
        what,
    };
    let head = MAGIC.len() + 4;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(bad("is not a sequencer backup (unknown header)".into()));
    }
    if bytes.len() < head + SUM_LEN {
        return Err(bad(format!("is cut short ({} bytes)", bytes.len())));
    }
    let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err(bad(
            "fails its checksum: damaged, or cut short (a copy still being written?)".into(),
        ));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&body[MAGIC.len()..head]);
    let end = head
        .checked_add(u32::from_le_bytes(len) as usize)
        .filter(|&end| end <= body.len())
        .ok_or_else(|| bad("has a header length beyond its end".into()))?;
    // The version first, so a newer format is named as such rather than as damage.
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let version: Version = decode(&body[head..end])
        .map_err(|e| bad(format!("has a header that does not decode: {e}")))?;
    if version.format != FORMAT {
        return Err(bad(format!(
            "is of backup format {}; this build reads format {FORMAT}",
            version.format
        )));
    }
    let header: Header = decode(&body[head..end])
        .map_err(|e| bad(format!("has a header that does not decode: {e}")))?;
    let state: State =
        decode(&body[end..]).map_err(|e| bad(format!("has a state that does not decode: {e}")))?;
    Ok(Backup { header, state })
}

/// Reads and checks the backup at `path`.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &bytes)
}

/// The SHA-256 of `bytes` in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AllocRequest;

    fn sample() -> (Header, State) {
        let mut state = State::default();
        state
            .sequences
            .allocate(&AllocRequest::new("orders", 41), 10)
            .unwrap();
        let header = Header {
            format: FORMAT,
            index: 7,
            taken_at_ms: 1,
            served_by: 2,
            members: vec![],
            sequences: 1,
            groups: 0,
        };
        (header, state)
    }

    #[test]
    fn a_file_reads_back_as_written() {
        let (header, state) = sample();
        let bytes = encode_file(&header, &state).unwrap();
        let back = parse(Path::new("b"), &bytes).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.state, state);
    }

    #[test]
    fn a_damaged_cut_foreign_or_newer_file_is_refused_naming_why() {
        let (mut header, state) = sample();
        let bytes = encode_file(&header, &state).unwrap();
        let p = Path::new("b.seqbak");
        let why = |bytes: &[u8]| parse(p, bytes).unwrap_err().to_string();
        for i in [0, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            let e = why(&flipped);
            assert!(
                e.contains("checksum") || e.contains("not a sequencer backup"),
                "byte {i}: {e}"
            );
        }
        for cut in [3, 12, bytes.len() - 1] {
            let e = why(&bytes[..cut]);
            assert!(e.starts_with("b.seqbak: "), "{e}");
            assert!(
                e.contains("cut short") || e.contains("checksum") || e.contains("not a"),
                "{e}"
            );
        }
        assert!(why(b"{\"hello\": 1}").contains("not a sequencer backup"));
        header.format = FORMAT + 1;
        let e = why(&encode_file(&header, &state).unwrap());
        assert!(e.contains(&format!("format {}", FORMAT + 1)), "{e}");
    }
}
