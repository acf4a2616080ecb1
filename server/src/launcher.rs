//! The one-command cluster: re-executes this binary as `server --node K` for every node of the
//! config, prefixes each child's output with its node id, waits until every node agrees on a
//! primary, prints the node table, restarts a node that exits later, and stops every child on
//! Ctrl-C or SIGTERM. The children die with the launcher, however it dies.

use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use sequencer_proto::v1::admin_client::AdminClient;
use sequencer_proto::v1::cluster_client::ClusterClient;
use sequencer_proto::v1::{AdminListRequest, AdminListResponse, StatusRequest};
use sequencer_server::config::{Config, ADMIN_TOKEN_FILE, SECRET_FILE};
use sequencer_server::tls::{self, TlsMaterial};
use sequencer_server::{pid_lock_holder, take_pid_lock, Lock, LOCK_FILE};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout, Instant};

use crate::say;

/// How long the cluster may take to elect its first primary.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a child may take to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// The wait before the first restart of a node; it doubles with each restart, up to the most.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A node that ran this long before it exited is restarted after FIRST_BACKOFF again.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);
/// Held by the launcher for its life, in `data_dir`, naming its pid.
const LAUNCHER_LOCK: &str = "LAUNCHER.lock";

struct ChildNode {
    id: u64,
    /// `None` while it waits to be restarted.
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    /// The wait before its next restart.
    backoff: Duration,
    restart_at: Option<Instant>,
}

pub async fn run(
    path: &Path,
    file_exists: bool,
    config: &Config,
    data_dir: &Option<PathBuf>,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the server binary")?;
    // A second launcher would find the first one's nodes answering and call them its own.
    let _lock = lock_data_dir(&config.data_dir)?;
    refuse_node_dirs_in_use(config)?;
    // Nodes on one host share its cores rather than each start a thread per core: on 2 cores,
    // three nodes with one thread each answered 10 % more pings than with two (BENCHMARKS.md).
    let threads = config.worker_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / config.nodes.len()).max(1)
    });
    let mut args: Vec<OsString> = Vec::new();
    if file_exists {
        args.extend(["--config".into(), path.into()]);
    }
    if let Some(dir) = data_dir {
        args.extend(["--data-dir".into(), dir.into()]);
    }
    args.extend(["--worker-threads".into(), threads.to_string().into()]);
    let (joins, fresh) = joins_for(config);
    let spawner = Spawner {
        exe,
        args,
        launcher: std::process::id() as libc::pid_t,
        joins,
    };

    let mut output = JoinSet::new();
    let mut children = Vec::new();
    let mut result = Ok(());
    for node in &config.nodes {
        match spawner.spawn(node.id, &mut output) {
            Ok(child) => children.push(ChildNode {
                id: node.id,
                child: Some(child),
                started: Instant::now(),
                restarts: 0,
                backoff: FIRST_BACKOFF,
                restart_at: None,
            }),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        result = supervise(config, &spawner, &fresh, &mut children, &mut output).await;
    }
    stop_all(&mut children).await;
    // The children are gone and their pipes closed: the copiers have the last lines.
    let drained = timeout(Duration::from_secs(2), async {
        while output.join_next().await.is_some() {}
    });
    let _ = drained.await;
    result
}

/// How to start node K again and again with the same arguments and environment.
struct Spawner {
    exe: PathBuf,
    /// Everything after `--node K`.
    args: Vec<OsString>,
    /// Our pid, taken before any fork.
    launcher: libc::pid_t,
    /// Nodes with an empty data dir beside a cluster that exists, and where they join it.
    joins: std::collections::BTreeMap<u64, String>,
}

impl Spawner {
    /// Starts node `id`, with its output copied by tasks in `output`.
    fn spawn(&self, id: u64, output: &mut JoinSet<()>) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--node").arg(id.to_string()).args(&self.args);
        // Harmless on later starts: a node that holds state has nothing to join.
        if let Some(via) = self.joins.get(&id) {
            cmd.arg("--join").arg(via);
        }
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_launcher(&mut cmd, self.launcher)?;
        let mut child = cmd.spawn().with_context(|| format!("starting node {id}"))?;
        if let Some(out) = child.stdout.take() {
            output.spawn(prefix_lines(id, out, false));
        }
        if let Some(err) = child.stderr.take() {
            output.spawn(prefix_lines(id, err, true));
        }
        Ok(child)
    }
}

/// A config grown beside data dirs that exist: the nodes with an empty data dir join the
/// cluster those hold (learner, catch up, voter) instead of waiting for a bootstrap that never
/// comes. When every data dir is empty, the first start bootstraps as usual. (A node whose
/// dir has files but no Raft state, one refused before, is started plainly and refused
/// again, naming --join: a dir with files could as well be a first start cut short, which
/// must bootstrap.)
fn joins_for(config: &Config) -> (std::collections::BTreeMap<u64, String>, Vec<u64>) {
    let holds_files = |id: u64| {
        std::fs::read_dir(config.node_dir(id)).is_ok_and(|mut entries| entries.next().is_some())
    };
    let Some(via) = config.nodes.iter().find(|n| holds_files(n.id)) else {
        return Default::default();
    };
    let fresh: Vec<u64> = config
        .nodes
        .iter()
        .filter(|n| !holds_files(n.id))
        .map(|n| n.id)
        .collect();
    let joins = fresh.iter().map(|id| (*id, via.addr.clone())).collect();
    for id in &fresh {
        say(format_args!(
            "node {id} has an empty data dir beside a cluster that exists: starting it with \
             --join {} (it catches up as a learner, then votes)",
            via.addr
        ));
    }
    (joins, fresh)
}

/// SIGTERM to the child when the launcher dies, even by SIGKILL, so that no node is left
/// holding its ports and data dir; it then stops as on any SIGTERM.
#[cfg(target_os = "linux")]
fn die_with_launcher(cmd: &mut Command, launcher: libc::pid_t) -> anyhow::Result<()> {
    // The signal comes when the thread that forked dies, not the process: every fork happens
    // on the main thread (the launcher's runtime is current-thread, in block_on), which lives
    // as long as the launcher.
    // Safety: gettid has no preconditions.
    let thread = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    if thread != launcher {
        bail!("internal error: a node forked off the main thread would die with its thread");
    }
    // Safety: between fork and exec, only async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher died before prctl: no signal will come, so go now.
            if libc::getppid() != launcher {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_cmd: &mut Command, _launcher: libc::pid_t) -> anyhow::Result<()> {
    Ok(())
}

/// Creates `dir` (0700) if it does not exist.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data dir {}", dir.display()))
}

/// One launcher per data dir: the lock on `data_dir/LAUNCHER.lock`, held while the returned
/// file is open (the kernel drops it when the process dies, however it dies).
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<File> {
    create_private_dir(data_dir)?;
    let path = data_dir.join(LAUNCHER_LOCK);
    match take_pid_lock(data_dir, LAUNCHER_LOCK)
        .with_context(|| format!("locking {}", path.display()))?
    {
        Lock::Taken(file) => Ok(file),
        Lock::HeldBy(pid) => bail!(
            "another launcher (pid {pid}) is running on data dir {}; stop it first",
            data_dir.display()
        ),
    }
}

/// Refuses to start when a node's data dir is locked by another process, such as a
/// `server --node K` started by hand: our node K would only fail next to it.
fn refuse_node_dirs_in_use(config: &Config) -> anyhow::Result<()> {
    for node in &config.nodes {
        let dir = config.node_dir(node.id);
        if let Some(pid) = pid_lock_holder(&dir, LOCK_FILE) {
            bail!(
                "node {}'s data dir {} is in use by pid {pid} (a `server --node {}` started by \
                 hand?); stop it first",
                node.id,
                dir.display(),
                node.id
            );
        }
    }
    Ok(())
}

/// Makes up a cluster secret and keeps it in `data_dir/cluster.secret` (0600), written
/// whole (a temp file, synced, linked into place, the dir synced), unless one is there
/// already (a launcher that started at the same moment). Returns the file.
pub fn make_secret(data_dir: &Path) -> anyhow::Result<PathBuf> {
    make_secret_file(data_dir, SECRET_FILE, "the cluster secret")
}

/// Makes up the admin token in `data_dir/admin.token` (0600), unless one is there, where
/// nodes and the local `client` read it.
pub fn make_admin_token(data_dir: &Path) -> anyhow::Result<PathBuf> {
    make_secret_file(data_dir, ADMIN_TOKEN_FILE, "the admin token")
}

fn make_secret_file(data_dir: &Path, name: &str, what: &str) -> anyhow::Result<PathBuf> {
    let secret = random_secret()?;
    create_private_dir(data_dir)?;
    let path = data_dir.join(name);
    // A name of our own: two launchers starting at once must not write one file.
    let tmp = data_dir.join(format!("{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        // Left by a launcher that died here; create_new then makes it ours, 0600.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(secret.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        // A link, not a rename: a secret already there is never replaced, since nodes may
        // already run with it.
        let linked = std::fs::hard_link(&tmp, &path);
        std::fs::remove_file(&tmp)?;
        match linked {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        File::open(data_dir)?.sync_all()
    };
    write().with_context(|| format!("writing {what} to {}", path.display()))?;
    Ok(path)
}

/// 32 random bytes, hex.
fn random_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

async fn supervise(
    config: &Config,
    spawner: &Spawner,
    joining: &[u64],
    children: &mut [ChildNode],
    output: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    // One listener for both phases, so that no signal falls between them.
    let mut shutdown = std::pin::pin!(crate::shutdown_signal());
    let mut expected: Vec<u64> = children.iter().map(|c| c.id).collect();
    let primary = loop {
        tokio::select! {
            p = wait_for_primary(config, &expected) => break p?,
            (i, status) = next_exit(children) => {
                let id = children[i].id;
                // A node that refuses its start (its data dir lost, not a member) says why
                // in its own line; the others go on.
                if status.code() == Some(crate::CONFIG_ERROR) && expected.len() > 1 {
                    say(format_args!("node {id} refused to start ({status}); not restarting it"));
                    expected.retain(|e| *e != id);
                    continue;
                }
                bail!("node {id} exited ({status}) while the cluster was starting")
            }
            _ = &mut shutdown => return Ok(()),
        }
    };
    let members = joined(config, primary, joining, &expected).await;
    print_table(config, primary, members.as_ref());
    // A node that dies later is started again; the others serve on meanwhile.
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            event = next_event(children) => event,
        };
        match event {
            // A bad config stays bad: starting it again would only fail again.
            Event::Exited(i, status) if status.code() == Some(crate::CONFIG_ERROR) => {
                say(format_args!(
                    "node {} exited with a configuration error ({status}); not restarting it",
                    children[i].id
                ));
                if children
                    .iter()
                    .all(|c| c.child.is_none() && c.restart_at.is_none())
                {
                    bail!("every node has exited");
                }
            }
            Event::Exited(i, status) => {
                schedule_restart(&mut children[i], &format!("exited ({status})"))
            }
            Event::RestartDue(i) => {
                // The copiers of the child that exited have seen their pipes close.
                while output.try_join_next().is_some() {}
                let c = &mut children[i];
                c.restart_at = None;
                match spawner.spawn(c.id, output) {
                    Ok(child) => {
                        c.child = Some(child);
                        c.started = Instant::now();
                    }
                    Err(e) => {
                        // A try that never ran: the backoff grows, not resets.
                        c.started = Instant::now();
                        schedule_restart(c, &format!("did not start ({e:#})"))
                    }
                }
            }
        }
    }
}

/// Says why node `c` is down and when it starts again, and sets that time.
fn schedule_restart(c: &mut ChildNode, why: &str) {
    if c.started.elapsed() >= BACKOFF_RESET_AFTER {
        c.backoff = FIRST_BACKOFF;
    }
    let wait = c.backoff;
    c.backoff = (wait * 2).min(MAX_BACKOFF);
    c.restarts += 1;
    c.restart_at = Some(Instant::now() + wait);
    say(format_args!(
        "node {} {why}; restarting it in {} s (restart {})",
        c.id,
        wait.as_secs(),
        c.restarts
    ));
}

enum Event {
    /// `children[i]` exited.
    Exited(usize, ExitStatus),
    /// `children[i]` is due to start again.
    RestartDue(usize),
}

/// The next exit of a child, before any is waiting to restart.
async fn next_exit(children: &mut [ChildNode]) -> (usize, ExitStatus) {
    loop {
        if let Event::Exited(i, status) = next_event(children).await {
            return (i, status);
        }
    }
}

/// Resolves with the next exit of a running child, or the next restart that is due.
async fn next_event(children: &mut [ChildNode]) -> Event {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            match &mut c.child {
                Some(child) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        c.child = None;
                        return Event::Exited(i, status);
                    }
                }
                None => {
                    if c.restart_at.is_some_and(|at| at <= Instant::now()) {
                        return Event::RestartDue(i);
                    }
                }
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the Cluster.Status of every node in `ids` until all of them name the same primary.
async fn wait_for_primary(config: &Config, ids: &[u64]) -> anyhow::Result<u64> {
    let deadline = Instant::now() + START_DEADLINE;
    // Over TLS when the nodes use it, showing each node's own certificate (this host has
    // every node's files), which also passes `tls_client_auth`. Read once, not every poll.
    let nodes: Vec<_> = config
        .nodes
        .iter()
        .filter(|n| ids.contains(&n.id))
        .collect();
    let tls = nodes
        .iter()
        .map(|n| TlsMaterial::load(config, n.id))
        .collect::<Result<Vec<_>, _>>()
        .context("reading TLS files")?;
    loop {
        let mut seen = Vec::new();
        for (node, tls) in nodes.iter().zip(&tls) {
            seen.push(primary_seen_by(&node.addr, tls.as_ref()).await);
        }
        if let Some(Some(p)) = seen.first() {
            if seen.iter().all(|s| *s == Some(*p)) {
                return Ok(*p);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "no primary agreed by every node within {} s",
                START_DEADLINE.as_secs()
            );
        }
        sleep(Duration::from_millis(100)).await;
    }
}

async fn primary_seen_by(addr: &str, tls: Option<&TlsMaterial>) -> Option<u64> {
    let call = async {
        let channel = tls::endpoint(addr, tls).ok()?.connect().await.ok()?;
        let mut client = ClusterClient::new(channel);
        let status = client.status(StatusRequest {}).await.ok()?.into_inner();
        (status.primary != 0).then_some(u64::from(status.primary))
    };
    timeout(Duration::from_secs(1), call).await.ok().flatten()
}

/// The membership once every node in `joining` that still runs is a voter (or the start
/// deadline passed): the table then shows what the join came to.
async fn joined(
    config: &Config,
    primary: u64,
    joining: &[u64],
    running: &[u64],
) -> Option<AdminListResponse> {
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let members = members_seen_by(config, primary).await;
        let voter = |id: &u64| {
            members.as_ref().is_some_and(|m| {
                m.members
                    .iter()
                    .any(|c| u64::from(c.id) == *id && c.role == "voter")
            })
        };
        let waiting = joining
            .iter()
            .filter(|id| running.contains(id))
            .any(|id| !voter(id));
        if !waiting || Instant::now() >= deadline {
            return members;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// The membership as the primary lists it (None if it does not answer).
async fn members_seen_by(config: &Config, primary: u64) -> Option<AdminListResponse> {
    let node = config.node(primary)?;
    let tls = TlsMaterial::load(config, primary).ok()?;
    let call = async {
        let channel = tls::endpoint(&node.addr, tls.as_ref())
            .ok()?
            .connect()
            .await
            .ok()?;
        let list = AdminClient::new(channel)
            .list_members(AdminListRequest {})
            .await
            .ok()?;
        Some(list.into_inner())
    };
    timeout(Duration::from_secs(5), call).await.ok().flatten()
}

fn print_table(config: &Config, primary: u64, members: Option<&AdminListResponse>) {
    // A closed stdout must not stop the launcher (println! would panic).
    let mut out = std::io::stdout().lock();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let role_of = |id: u64| -> &str {
        match members {
            None => "",
            Some(m) => m
                .members
                .iter()
                .find(|c| u64::from(c.id) == id)
                .map_or("not a member", |c| c.role.as_str()),
        }
    };
    for n in &config.nodes {
        let primary = if n.id == primary { "  primary" } else { "" };
        let role = role_of(n.id);
        let role = if role.is_empty() {
            String::new()
        } else {
            format!("  {role}")
        };
        let http = n
            .http_addr
            .as_ref()
            .map(|a| format!("  http {scheme}://{a}/"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "node {}  client {}  peer {}{http}{role}{primary}",
            n.id, n.addr, n.peer_addr
        );
    }
    // Shrinking config.json removes nobody: say who it no longer lists, and how to remove them.
    for m in members.map_or(&[][..], |m| &m.members[..]) {
        if config.node(u64::from(m.id)).is_none() {
            let _ = writeln!(
                out,
                "node {}  client {}  peer {}  {}: config.json does not list it, but it stays a \
                 member; remove it with `client member remove {}`",
                m.id, m.addr, m.peer_addr, m.role, m.id
            );
        }
    }
    let _ = writeln!(
        out,
        "cluster ready: {} nodes, primary is node {primary}; Ctrl-C stops every node",
        config.nodes.len()
    );
}

/// Copies a child's lines to ours, prefixed. Write errors (a closed stdout or stderr) are
/// ignored: the child's pipe must still be drained, or it would block on a full one.
async fn prefix_lines(id: u64, stream: impl AsyncRead + Unpin, stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = if stderr {
            writeln!(std::io::stderr().lock(), "node{id} | {line}")
        } else {
            writeln!(std::io::stdout().lock(), "node{id} | {line}")
        };
    }
}

/// SIGTERM to every running child we started (by pid), then SIGKILL to any still running.
async fn stop_all(children: &mut [ChildNode]) {
    for c in children.iter_mut() {
        let Some(child) = &mut c.child else { continue };
        if let (Ok(None), Some(pid)) = (child.try_wait(), child.id()) {
            // Safety: signalling a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    for c in children.iter_mut() {
        let Some(child) = &mut c.child else { continue };
        if timeout(STOP_DEADLINE, child.wait()).await.is_err() {
            say(format_args!(
                "node {} did not stop in time; killing it",
                c.id
            ));
            let _ = child.kill().await;
        }
    }
}
