//! One data dir, one owner: an advisory lock that names the process holding it, and
//! owner-only permissions (dir 0700, files 0600), since the log holds every token hash.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::StoreError;

/// A node's data dir, locked for as long as this value lives (the kernel drops the lock when
/// the process dies, however it dies).
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl DataDir {
    /// Creates `path` if needed and takes its lock, or says which process holds it.
    pub fn lock(path: &Path) -> Result<DataDir, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io("creating data dir", path, e))?;
        std::fs::set_permissions(path, Permissions::from_mode(0o700))
            .map_err(|e| io("restricting data dir", path, e))?;
        let lock_path = path.join("LOCK");
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io("opening lock file", &lock_path, e))?;
        // Safety: flock on a descriptor we own; it is released when the file is closed.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            let mut holder = String::new();
            let _ = lock.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown" } else { holder };
            return Err(StoreError::Locked {
                dir: path.to_path_buf(),
                holder: holder.to_string(),
            });
        }
        let pid = std::process::id().to_string();
        lock.set_len(0)
            .and_then(|_| lock.seek(SeekFrom::Start(0)))
            .and_then(|_| lock.write_all(pid.as_bytes()))
            .map_err(|e| io("writing lock file", &lock_path, e))?;
        Ok(DataDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Restricts a file of the dir to its owner.
    pub fn protect(&self, name: &str) -> Result<(), StoreError> {
        let file = self.path.join(name);
        std::fs::set_permissions(&file, Permissions::from_mode(0o600))
            .map_err(|e| io("restricting", &file, e))
    }
}

/// Creates (or empties) `path` for writing, readable by this user only.
pub(super) fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Renames the synced file `tmp` to `name` in `dir` and syncs the dir, so the new file is
/// there whole after a crash, or the old one is.
pub(super) fn replace_durably(dir: &Path, tmp: &Path, name: &str) -> std::io::Result<()> {
    std::fs::rename(tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}
