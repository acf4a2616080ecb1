//! One data dir, one owner: an advisory lock that names the process holding it, and
//! owner-only permissions (dir 0700, files 0600), since the log holds every token hash.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The lock file of a node's data dir.
pub const LOCK_FILE: &str = "LOCK";

/// The outcome of [`take_pid_lock`].
pub enum Lock {
    /// Ours while this file is open (the kernel drops the lock when the process dies,
    /// however it dies); it names our pid.
    Taken(File),
    /// Another process holds it: the pid its file names.
    HeldBy(String),
}

/// Takes the advisory lock `dir/name` (created 0600 if missing) without waiting, and writes
/// our pid into it for whoever finds it held.
pub fn take_pid_lock(dir: &Path, name: &str) -> std::io::Result<Lock> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(name))?;
    if !try_flock(&file)? {
        return Ok(Lock::HeldBy(holder(&file)));
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(std::process::id().to_string().as_bytes())?;
    Ok(Lock::Taken(file))
}

/// The pid of the process that holds `dir/name` now, if one does; takes the lock for a
/// moment only, and creates nothing.
pub fn pid_lock_holder(dir: &Path, name: &str) -> Option<String> {
    let file = File::open(dir.join(name)).ok()?;
    match try_flock(&file) {
        Ok(false) => Some(holder(&file)),
        _ => None,
    }
}

/// `flock` without waiting: `Ok(false)` if another process holds it.
fn try_flock(file: &File) -> std::io::Result<bool> {
    // Safety: flock on a descriptor we own; closing it releases the lock.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The pid a lock file names, as its holder wrote it.
fn holder(mut file: &File) -> String {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    match text.trim() {
        "" => "unknown".into(),
        pid => pid.into(),
    }
}

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
        let lock_path = path.join(LOCK_FILE);
        let lock = match take_pid_lock(path, LOCK_FILE).map_err(|e| io("locking", &lock_path, e))? {
            Lock::Taken(file) => file,
            Lock::HeldBy(holder) => {
                return Err(StoreError::Locked {
                    dir: path.to_path_buf(),
                    holder,
                })
            }
        };
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
pub(crate) fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Renames the synced file `tmp` to `name` in `dir` and syncs the dir, so the new file is
/// there whole after a crash, or the old one is.
pub(crate) fn replace_durably(dir: &Path, tmp: &Path, name: &str) -> std::io::Result<()> {
    std::fs::rename(tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}
