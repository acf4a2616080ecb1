//! The launcher (`server` without `--node`) over a node's life: children that die with it,
//! restarts, its persisted secret, one launcher per data dir; and what a node started by hand
//! needs from main.rs (closed output pipes, the open files limit).
//!
//! Processes are killed only by the pids these tests started, or that a launcher they started
//! started (read from /proc or a node's LOCK file), and all of them when a guard drops.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sequencer_client::Client;
use sequencer_server::config::CLUSTER_SECRET_ENV;
use testkit::{health, ServingStatus};

mod common;
use common::{line_channel, spawn_reading_output};

const SERVER: &str = env!("CARGO_BIN_EXE_server");
/// How long a cluster may take to be ready, or processes to go.
const DEADLINE: Duration = Duration::from_secs(60);

/// A config with `n` nodes on free ports, data under `dir/data`, written to `dir/config.json`.
fn write_config(dir: &Path, n: usize) -> serde_json::Value {
    let config = testkit::nodes_config(dir, n).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    config
}

fn addr(config: &serde_json::Value, id: u64) -> String {
    config["nodes"][id as usize - 1]["addr"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `server` with `args` in `dir`, with no secret from our environment.
fn server(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(SERVER);
    cmd.args(args)
        .current_dir(dir)
        .env_remove(CLUSTER_SECRET_ENV)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// State and parent of a process, from /proc; `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Running: there and not a zombie waiting for a parent that does not reap.
fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

fn signal(pid: u32, sig: i32) {
    // Safety: a pid these tests started, or that their launcher started.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits until `done` or the deadline; false if the deadline came first.
fn wait_until(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid in node `id`'s LOCK file under `data`.
fn lock_pid(data: &Path, id: u64) -> Option<u32> {
    let text = std::fs::read_to_string(data.join(format!("node-{id}")).join("LOCK")).ok()?;
    text.trim().parse().ok()
}

/// A process we started, and the ones it started; every one still running is killed on drop.
struct Guard {
    child: Child,
    /// Pids its children had: they outlive it if it dies without taking them along.
    known: Vec<u32>,
}

impl Guard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The running child of ours that holds node `id`'s LOCK, remembered for cleanup.
    fn node_pid(&mut self, data: &Path, id: u64) -> u32 {
        let pid = lock_pid(data, id).expect("a LOCK file naming a pid");
        assert_eq!(
            proc_stat(pid).map(|(_, ppid)| ppid),
            Some(self.pid()),
            "node {id}'s LOCK names pid {pid}, not a child of launcher {}",
            self.pid()
        );
        self.known.push(pid);
        pid
    }

    /// SIGTERM, and waits for the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "pid {} ignored SIGTERM", self.pid());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut pids = self.known.clone();
        if matches!(self.child.try_wait(), Ok(None)) {
            pids.extend(children_of(self.pid()));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for pid in pids {
            if running(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

/// A launcher running on `dir/config.json`, its output read on threads.
struct Launcher {
    guard: Guard,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every line read so far, both streams.
    seen: Vec<String>,
}

impl Launcher {
    fn start(dir: &Path) -> Launcher {
        let (child, stdout, stderr) =
            spawn_reading_output(&mut server(dir, &["--config", "config.json"]));
        Launcher {
            guard: Guard {
                child,
                known: Vec::new(),
            },
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// A launcher that has said `cluster ready`.
    fn ready(dir: &Path) -> Launcher {
        let mut launcher = Launcher::start(dir);
        launcher.wait_ready();
        launcher
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    fn drain(&mut self) {
        self.seen.extend(self.stderr.try_iter());
        self.seen.extend(self.stdout.try_iter());
    }

    /// Waits for "cluster ready" on stdout.
    fn wait_ready(&mut self) {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self
                .stdout
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    let ready = line.starts_with("cluster ready");
                    self.seen.push(line);
                    if ready {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left > Duration::ZERO => {}
                Err(_) => {
                    self.drain();
                    panic!("the launcher never said `cluster ready`: {:#?}", self.seen);
                }
            }
            self.seen.extend(self.stderr.try_iter());
        }
    }

    /// Waits until a line of either stream contains every one of `parts`; false at the deadline.
    fn wait_line(&mut self, parts: &[&str]) -> bool {
        let found = |seen: &[String]| seen.iter().any(|l| parts.iter().all(|p| l.contains(p)));
        wait_until(DEADLINE, || {
            self.drain();
            found(&self.seen)
        })
    }
}

/// A fresh dir with a 3-node config, and a launcher on it that has said `cluster ready`.
fn three_nodes_ready() -> (tempfile::TempDir, serde_json::Value, Launcher) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 3);
    let launcher = Launcher::ready(dir.path());
    (dir, config, launcher)
}

/// GetId through `addr` only, retried until it works or the deadline passes.
async fn get_id_through(addr: &str) -> u64 {
    let client = Client::new([addr]).unwrap();
    let end = Instant::now() + DEADLINE;
    loop {
        match client.get_id("").await {
            Ok(r) => return r.id,
            Err(e) if Instant::now() >= end => panic!("no GetId through {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_launcher_with_sigkill_stops_every_node_and_frees_their_dirs() {
    let (dir, config, mut first) = three_nodes_ready();
    let data = dir.path().join("data");
    let nodes: Vec<u32> = (1..=3).map(|id| first.guard.node_pid(&data, id)).collect();
    // The table names each node's HTTP address, and each one serves there.
    for (i, node) in config["nodes"].as_array().unwrap().iter().enumerate() {
        let http = node["http_addr"].as_str().unwrap();
        let row = format!("node {}  client ", i + 1);
        assert!(
            first
                .seen
                .iter()
                .any(|l| l.starts_with(&row) && l.contains(&format!("http http://{http}/"))),
            "no table row with {http}: {:#?}",
            first.seen
        );
        assert_eq!(
            testkit::http::get(http, "/healthz").await.unwrap().status,
            200
        );
    }

    signal(first.pid(), libc::SIGKILL);
    let gone = wait_until(DEADLINE, || nodes.iter().all(|&pid| !running(pid)));
    let left: Vec<u32> = nodes.iter().copied().filter(|&p| running(p)).collect();
    assert!(gone, "nodes {left:?} outlived their launcher");

    // Their ports and data dir locks are free: a new launcher starts on the same dir.
    let _second = Launcher::ready(dir.path());
    get_id_through(&addr(&config, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_restarts_a_node_killed_after_start() {
    let (dir, config, mut launcher) = three_nodes_ready();
    let data = dir.path().join("data");
    let old = launcher.guard.node_pid(&data, 2);

    signal(old, libc::SIGKILL);
    let restarted = wait_until(DEADLINE, || {
        lock_pid(&data, 2).is_some_and(|pid| pid != old && running(pid))
    });
    assert!(restarted, "node 2 was not started again");
    let new = launcher.guard.node_pid(&data, 2);
    assert!(
        launcher.wait_line(&["node 2 exited", "restarting it in 1 s (restart 1)"]),
        "no restart line: {:#?}",
        launcher.seen
    );
    get_id_through(&addr(&config, 2)).await;
    assert!(running(new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_does_not_restart_a_node_that_exits_with_a_bad_config() {
    let (dir, _, mut launcher) = three_nodes_ready();
    let data = dir.path().join("data");
    let old = launcher.guard.node_pid(&data, 2);
    // The config turns bad under the running cluster; node 2 then dies.
    std::fs::write(dir.path().join("config.json"), r#"{"servers": "three"}"#).unwrap();
    signal(old, libc::SIGKILL);
    assert!(
        launcher.wait_line(&[
            "node 2 exited with a configuration error",
            "not restarting it"
        ]),
        "{:#?}",
        launcher.seen
    );
    // It was started once more (the kill), found the bad config, and is never started again:
    // twice the next backoff (2 s) passes without another restart.
    let restarts = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.contains("node 2 exited") && l.contains("restarting it in"))
            .count()
    };
    let again = wait_until(Duration::from_secs(4), || {
        launcher.drain();
        restarts(&launcher.seen) > 1
    });
    assert!(!again, "{:#?}", launcher.seen);
    assert_eq!(restarts(&launcher.seen), 1, "{:#?}", launcher.seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_keeps_its_secret_for_its_next_start_and_for_nodes_started_by_hand() {
    let (dir, config, mut launcher) = three_nodes_ready();
    let file = dir.path().join("data").join("cluster.secret");
    let secret = std::fs::read_to_string(&file).expect("the launcher wrote its secret");
    assert_eq!(secret.trim().len(), 64, "{secret:?}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        launcher.wait_line(&[&file.display().to_string()]),
        "the launcher did not say where the secret is: {:#?}",
        launcher.seen
    );
    assert!(launcher.guard.stop().success());

    // The next start uses the same secret, and its cluster serves.
    let mut launcher = Launcher::ready(dir.path());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);
    get_id_through(&addr(&config, 1)).await;
    assert!(launcher.guard.stop().success());

    // Each node by hand, with no secret in its environment or config: they read the file.
    let mut nodes: Vec<Guard> = (1..=3)
        .map(|id| Guard {
            child: server(
                dir.path(),
                &["--config", "config.json", "--node", &id.to_string()],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
            known: Vec::new(),
        })
        .collect();
    for id in 1..=3 {
        get_id_through(&addr(&config, id)).await;
    }
    for node in &mut nodes {
        assert!(node.stop().success());
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);
}

/// Runs a launcher on `dir` that should refuse at once; returns (exit status, every line).
fn refused_launcher(dir: &Path) -> (std::process::ExitStatus, Vec<String>) {
    let mut second = Launcher::start(dir);
    let exited = wait_until(Duration::from_secs(10), || {
        matches!(second.guard.child.try_wait(), Ok(Some(_)))
    });
    second.drain();
    assert!(
        exited,
        "the launcher did not exit at once: {:#?}",
        second.seen
    );
    let status = second.guard.child.wait().unwrap();
    // The rest of its output, up to the end of both pipes.
    let mut lines = second.seen.clone();
    for rx in [&second.stderr, &second.stdout] {
        while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
            lines.push(line);
        }
    }
    (status, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_launcher_on_the_same_data_dir_refuses_at_once_naming_the_first() {
    let (dir, config, first) = three_nodes_ready();

    let (status, lines) = refused_launcher(dir.path());
    assert!(!status.success(), "{lines:#?}");
    let named = format!("launcher (pid {})", first.pid());
    assert!(lines.iter().any(|l| l.contains(&named)), "{lines:#?}");
    assert!(
        !lines.iter().any(|l| l.contains("cluster ready")),
        "{lines:#?}"
    );
    // Started nothing, and the first cluster serves on.
    assert!(
        !lines.iter().any(|l| l.starts_with("node1 | ")),
        "{lines:#?}"
    );
    get_id_through(&addr(&config, 1)).await;
}

#[test]
fn the_launcher_refuses_a_node_dir_held_by_a_node_started_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), 3);
    let data = dir.path().join("data");
    let mut by_hand = Guard {
        child: server(dir.path(), &["--config", "config.json", "--node", "2"])
            .env(CLUSTER_SECRET_ENV, "a-secret-for-node-two-only")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        known: Vec::new(),
    };
    let pid = by_hand.pid();
    assert!(
        wait_until(DEADLINE, || lock_pid(&data, 2) == Some(pid)),
        "node 2 never took its data dir"
    );

    let (status, lines) = refused_launcher(dir.path());
    assert!(!status.success(), "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("node 2") && l.contains(&format!("pid {pid}"))),
        "{lines:#?}"
    );
    // Refused before starting any node of its own.
    assert!(
        !lines.iter().any(|l| l.starts_with("node1 | ")),
        "{lines:#?}"
    );
    assert!(running(pid));
    by_hand.stop();
}

/// Makes reads of a pipe return at once when it is empty.
fn nonblocking(fd: &impl AsRawFd) {
    // Safety: fcntl flags on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Reads whatever `pipe` holds now.
fn drain(pipe: &mut impl Read) {
    let mut buf = [0u8; 64 * 1024];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_output_pipes_close_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 1);
    let addr = addr(&config, 1);
    // Debug: every request logs, openraft's core among the loggers.
    let mut child = server(dir.path(), &["--config", "config.json", "--node", "1"])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut node = Guard {
        child,
        known: Vec::new(),
    };
    nonblocking(&stdout);
    nonblocking(&stderr);
    let end = Instant::now() + DEADLINE;
    loop {
        drain(&mut stdout);
        drain(&mut stderr);
        if health(&addr).await == Some(ServingStatus::Serving) {
            break;
        }
        assert!(Instant::now() < end, "node 1 never became healthy");
        assert!(matches!(node.child.try_wait(), Ok(None)), "node 1 exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whoever read its output is gone: every write to stdout or stderr now fails.
    drop(stdout);
    drop(stderr);

    let client = Client::new([&addr])
        .unwrap()
        .with_deadline(Duration::from_secs(5));
    let mut last = 0;
    for i in 0..20 {
        let id = match client.get_id("").await {
            Ok(r) => r.id,
            Err(e) => panic!("GetId {i} after the pipes closed: {e}"),
        };
        assert!(id > last, "id {id} after {last}");
        last = id;
    }
    assert!(matches!(node.child.try_wait(), Ok(None)), "node 1 exited");
    assert_eq!(health(&addr).await, Some(ServingStatus::Serving));
    node.stop();
}

/// The soft and hard "Max open files" of a running process.
fn open_files_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn a_node_raises_its_open_files_limit_to_the_hard_limit_and_says_so() {
    use std::os::unix::process::CommandExt;

    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), 1);
    let (_, hard) = open_files_limits(std::process::id());
    let soft = 256.min(hard);
    assert!(soft < hard, "the hard limit {hard} leaves nothing to raise");
    let mut cmd = server(dir.path(), &["--config", "config.json", "--node", "1"]);
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    // Safety: only setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = line_channel(child.stderr.take().unwrap());
    let mut node = Guard {
        child,
        known: Vec::new(),
    };
    let field = format!("open_files_limit={hard}");
    let end = Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let Ok(line) = stderr.recv_timeout(left) else {
            panic!("no `{field}` line: {seen:#?}");
        };
        if line.contains(&field) {
            break;
        }
        seen.push(line);
    }
    assert_eq!(open_files_limits(node.pid()), (hard, hard));
    assert!(node.stop().success());
}

/// `nodes` of 5 over the same ports as the first 3 of `config`, and two new ones.
fn grown(dir: &Path, config: &serde_json::Value, n: usize) -> serde_json::Value {
    let mut grown = config.clone();
    let more = testkit::nodes_config(dir, n).unwrap();
    let nodes = grown["nodes"].as_array_mut().unwrap();
    let have = nodes.len();
    for (i, extra) in more["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .skip(have)
    {
        let mut node = extra.clone();
        node["id"] = (i + 1).into();
        nodes.push(node);
    }
    nodes.truncate(n);
    std::fs::write(dir.join("config.json"), grown.to_string()).unwrap();
    grown
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_config_joins_its_new_nodes_and_a_shrunk_one_names_who_stays_a_member() {
    let (dir, config, mut first) = three_nodes_ready();
    let before = get_id_through(&addr(&config, 1)).await;
    first.guard.stop();

    // config.json from 3 to 5: nodes 4 and 5 join the cluster the others hold, and vote.
    let five = grown(dir.path(), &config, 5);
    let mut second = Launcher::ready(dir.path());
    for id in [4, 5] {
        assert!(
            second.wait_line(&[&format!("node {id} has an empty data dir"), "--join"]),
            "{:#?}",
            second.seen
        );
        assert!(
            second.wait_line(&[&format!("node {id}  client"), "voter"]),
            "{:#?}",
            second.seen
        );
    }
    let next = get_id_through(&addr(&five, 5)).await;
    assert!(
        next > before,
        "node 5 handed out {next}, at or below {before}"
    );
    second.guard.stop();

    // Back to 4: node 5 stays a member, and the launcher says how to remove it.
    grown(dir.path(), &config, 4);
    let mut third = Launcher::ready(dir.path());
    assert!(
        third.wait_line(&["node 5", "does not list it", "client member remove 5"]),
        "{:#?}",
        third.seen
    );
    third.guard.stop();
}
