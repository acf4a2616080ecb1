//! A full disk: writes are refused before it fills (`disk_reserve_bytes`), and a node whose
//! write hits ENOSPC anyway exits non-zero naming its data dir, instead of staying up as a
//! zombie that status still calls primary. Nothing acknowledged is lost or handed out again.
//!
//! Each test mounts a small tmpfs of its own for the data (root only, as CI runs), and
//! unmounts it however the test ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use testkit::Cluster;
use tokio::time::Instant;

/// A tmpfs of `mib` MiB mounted on a fresh temp dir, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "these tests need to mount a tmpfs (run as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Fills the disk until `leave` bytes are free, in a file of its own.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        while self.free() > leave {
            let n = (self.free() - leave).min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..n.max(1)]).is_err() {
                break;
            }
            f.flush().unwrap();
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn one_node_on(disk: &SmallDisk, reserve: u64) -> Cluster {
    Cluster::builder(env!("CARGO_BIN_EXE_server"))
        .nodes(1)
        .set("data_dir", disk.path().join("data").display().to_string())
        .set("disk_reserve_bytes", reserve)
        // Small snapshots, so a snapshot write is among the writes that can fail.
        .set("snapshot_logs", 50)
        .set("logs_to_keep", 10)
        .start()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused_below_the_reserve_and_taken_again_once_space_is_freed() {
    let disk = SmallDisk::mount(64);
    let mut cluster = one_node_on(&disk, 16 * 1024 * 1024);
    cluster.wait_for_primary().await.unwrap();
    let client = cluster.client();
    assert_eq!(client.get_id("default").await.unwrap().id, 1);

    let filler = disk.fill_leaving(8 * 1024 * 1024);
    // The node reads the free space anew at most every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match client.get_id("default").await {
            Err(e) => break e,
            Ok(_) => assert!(Instant::now() < deadline, "writes never refused"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused.to_string().contains("disk_reserve_bytes"),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains(&disk.path().display().to_string()),
        "{refused}"
    );

    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        if let Ok(r) = client.get_id("default").await {
            break r.id;
        }
        assert!(Instant::now() < deadline, "writes never taken again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(next >= 2, "{next}");
    assert!(
        cluster.running().contains(&1),
        "the node must not have exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_hits_a_full_disk_makes_the_node_exit_naming_its_dir_and_loses_nothing() {
    let disk = SmallDisk::mount(64);
    // No reserve: the disk really fills.
    let mut cluster = one_node_on(&disk, 0);
    cluster.wait_for_primary().await.unwrap();
    let client = cluster.client_for(1).with_deadline(Duration::from_secs(3));
    let mut acknowledged = 0;
    for _ in 0..20 {
        acknowledged = client.get_id("default").await.unwrap().id;
    }
    let filler = disk.fill_leaving(0);

    // Keep writing until the node gives up; each id it acknowledges counts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.running().contains(&1) && Instant::now() < deadline {
        match client.get_ids("default", 1000).await {
            Ok(b) => acknowledged = b.first + 999,
            Err(_) => break,
        }
    }
    let status = cluster.wait_exit(1, Duration::from_secs(30)).await.unwrap();
    assert!(!status.success(), "{status}");
    let log = cluster.log(1);
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.contains("node-1: no space left on device"),
        "the last line must name the cause and the dir: {last}\n{log}"
    );

    // Space freed, the node restarts and goes on above everything it acknowledged.
    std::fs::remove_file(filler).unwrap();
    cluster.start_node(1).unwrap();
    cluster.wait_for_primary().await.unwrap();
    let next = cluster.client().get_id("default").await.unwrap().id;
    assert!(next > acknowledged, "id {next} was acknowledged before");
}
