//! The disk reserve: writes are refused while the data dir's file system has less than
//! `disk_reserve_bytes` free, so that the vote, truncate and snapshot writes Raft needs still
//! fit. A write that hits ENOSPC stops Raft, and the node then exits (node.rs).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::Error;

/// How long one reading of the free space is trusted: a statvfs per request would cost a
/// syscall on the hot path, and a write fills at most a few MiB in this time.
const FRESH_FOR: Duration = Duration::from_millis(100);

/// Checks the free space of one data dir. Cheap to clone.
#[derive(Clone)]
pub struct DiskGuard {
    dir: PathBuf,
    reserve: u64,
    last: Arc<Mutex<Option<(Instant, u64)>>>,
}

impl DiskGuard {
    pub fn new(dir: &Path, reserve: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            reserve,
            last: Arc::new(Mutex::new(None)),
        }
    }

    /// `Ok` while the file system keeps at least the reserve free (or its free space cannot
    /// be read: the write itself then tells).
    pub fn check(&self) -> Result<(), Error> {
        if self.reserve == 0 {
            return Ok(());
        }
        let free = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            match *last {
                Some((at, free)) if at.elapsed() < FRESH_FOR => free,
                _ => {
                    let Some(free) = free_bytes(&self.dir) else {
                        return Ok(());
                    };
                    *last = Some((Instant::now(), free));
                    free
                }
            }
        };
        if free < self.reserve {
            return Err(Error::ResourceExhausted(format!(
                "{}: disk nearly full: {free} bytes free, below disk_reserve_bytes ({}); writes \
                 are refused until space is freed",
                self.dir.display(),
                self.reserve
            )));
        }
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // Safety: a valid C string and a buffer of the right type, filled on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // Safety: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // Their width differs between platforms.
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_refuses_and_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(DiskGuard::new(dir.path(), 1).check().is_ok());
        assert!(DiskGuard::new(dir.path(), 0).check().is_ok());
        let e = DiskGuard::new(dir.path(), free.saturating_mul(2).max(1 << 40))
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("disk_reserve_bytes"), "{e}");
        assert!(e.contains(&dir.path().display().to_string()), "{e}");
    }
}
