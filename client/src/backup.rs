//! `client backup FILE`: the streamed backup written to a temporary file beside FILE, checked
//! against the summary the server sends last (length and SHA-256), made durable, then renamed
//! over FILE. A copy cut short never takes FILE's name.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sequencer_client::{pb, Client};
use serde_json::json;
use sha2::{Digest, Sha256};

pub async fn save(client: &Client, path: &Path, json_out: bool) -> anyhow::Result<()> {
    let tmp = temporary(path)?;
    let result = write(client, path, &tmp).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let summary = result?;
    if json_out {
        println!(
            "{}",
            json!({"file": path.display().to_string(), "index": summary.index,
                   "sequences": summary.sequences, "groups": summary.groups,
                   "bytes": summary.bytes, "sha256": summary.sha256,
                   "served_by": summary.served_by, "taken_at_ms": summary.taken_at_ms})
        );
    } else {
        println!(
            "backup of log index {} ({} sequences, {} groups, {} bytes) from node {} written to {}",
            summary.index,
            summary.sequences,
            summary.groups,
            summary.bytes,
            summary.served_by,
            path.display()
        );
    }
    Ok(())
}

/// `.NAME.tmp` beside `path`, so the rename stays on one file system.
fn temporary(path: &Path) -> anyhow::Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(".tmp");
    Ok(path.with_file_name(tmp))
}

async fn write(client: &Client, path: &Path, tmp: &Path) -> anyhow::Result<pb::BackupSummary> {
    let mut stream = client.backup().await?;
    // It holds every message and the clients' token hashes: the owner's only.
    let mut file = private(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let (mut sum, mut bytes, mut summary) = (Sha256::new(), 0u64, None);
    while let Some(chunk) = stream.message().await.context("receiving the backup")? {
        sum.update(&chunk.data);
        bytes += chunk.data.len() as u64;
        file.write_all(&chunk.data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        if chunk.summary.is_some() {
            summary = chunk.summary;
        }
    }
    let Some(summary) = summary else {
        bail!("the server's stream ended before the backup was whole; nothing was written");
    };
    let hex: String = sum.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if bytes != summary.bytes || hex != summary.sha256 {
        bail!(
            "the backup arrived damaged ({bytes} bytes, sha256 {hex}; the server sent {} \
             bytes, sha256 {}); nothing was written",
            summary.bytes,
            summary.sha256
        );
    }
    file.sync_all()
        .with_context(|| format!("flushing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    // The rename itself is durable only once the directory is.
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing {}", dir.display()))?;
    Ok(summary)
}

/// Creates (or empties) `path`, readable by this user only.
pub fn private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}
