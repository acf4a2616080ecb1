//! `server`: with `--node K`, runs node K of the config; with no `--node`, starts every node of
//! the config as a child process and supervises them.

mod launcher;

// glibc's malloc and free took about 8 % of a node's CPU; with mimalloc a log entry costs
// about a fifth less CPU (BENCHMARKS.md, "What was tried").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::fmt::Display;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sequencer_server::config::{Config, ConfigError, Entry, LogFormat, Overrides};
use sequencer_server::{run, Listeners};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A distributed id sequencer: unique, strictly increasing, never reissued.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (default: ./config.json, or built-in defaults if it does not exist).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Run only this node (for one node per host). Without it, every node starts here.
    #[arg(long)]
    node: Option<u64>,
    /// Overrides `data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Overrides `worker_threads`: threads of this node's async runtime.
    #[arg(long)]
    worker_threads: Option<u32>,
    /// With an empty data dir: ask the cluster at this client address (any member's) to add
    /// this node, which catches up as a learner and then votes. Never bootstraps.
    #[arg(
        long,
        value_name = "HOST:PORT",
        requires = "node",
        conflicts_with = "rejoin"
    )]
    join: Option<String>,
    /// With an empty data dir, for a member whose disk was lost: remove its old self from the
    /// cluster at this address, then join again.
    #[arg(long, value_name = "HOST:PORT", requires = "node")]
    rejoin: Option<String>,
    /// With --node K: make a one-node cluster of K from its data, when the rest of the
    /// cluster is lost for good; refused while a quorum of the old members answers.
    #[arg(
        long,
        requires_all = ["node", "skip_ahead"],
        conflicts_with_all = ["join", "rejoin"]
    )]
    force_new_cluster: bool,
    /// With --force-new-cluster: raise every sequence by N, at least the ids the lost nodes
    /// may have acknowledged that this one never received.
    #[arg(long, value_name = "N", requires = "force_new_cluster")]
    skip_ahead: Option<u64>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Build fresh data dirs for every node of the config from a backup (`client backup`),
    /// then start the cluster as usual. Refuses if any of those data dirs exists.
    Restore {
        /// The backup file.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Raise every sequence by N: at least the ids that may have been handed out since the
        /// backup was taken, which no copy holds (0 only if none can have been).
        #[arg(long, value_name = "N")]
        skip_ahead: u64,
    },
}

/// The exit code of a bad config: the launcher does not restart a node that exits with it.
pub(crate) const CONFIG_ERROR: i32 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    // Before anything opens a file; children inherit the raised limit.
    let open_files = raise_open_files_limit();
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.json"), false),
    };
    let mut overrides = Overrides {
        data_dir: args.data_dir.clone(),
        worker_threads: args.worker_threads,
        servers: None,
    };
    let mut config = match load_config(args.node.is_none(), &path, required, &overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let joining = args.join.is_some() || args.rejoin.is_some();
    if let Some(id) = args.node.filter(|id| joining && config.node(*id).is_none()) {
        // A node added to a shorthand config: its addresses follow the shorthand's rule.
        overrides.servers = u32::try_from(id).ok();
        config = match load_config(false, &path, required, &overrides) {
            Ok(c) => c,
            Err(code) => return code,
        };
    }
    // After the config, which says the format; nothing logs before it (errors go to stderr).
    init_tracing(config.log_format);
    if let Some(Command::Restore { from, skip_ahead }) = &args.command {
        return restore(&config, from, *skip_ahead);
    }
    if let (true, Some(id), Some(skip)) = (args.force_new_cluster, args.node, args.skip_ahead) {
        if let Err(code) = force_new_cluster(&config, id, skip) {
            return code;
        }
    }
    config.entry = match (&args.join, &args.rejoin) {
        (Some(via), _) => Entry::Join(via.clone()),
        (None, Some(via)) => Entry::Rejoin(via.clone()),
        (None, None) => Entry::Bootstrap,
    };
    let mut builder = match args.node {
        Some(_) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = config.worker_threads {
                b.worker_threads(n);
            }
            b
        }
        // The launcher only starts and watches its children, all on this one thread: a
        // child's parent-death signal follows the thread that forked it (launcher.rs).
        None => tokio::runtime::Builder::new_current_thread(),
    };
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            say(format_args!("starting the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.node {
            Some(id) => run_node(config, id, open_files).await,
            None => {
                log_open_files(&open_files);
                launcher::run(&path, path.exists(), &config, &args.data_dir).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format_args!("{e:#}"));
            // A node refused its start (an empty data dir the cluster counts on): restarting
            // it would be refused again, so the launcher must not.
            match e.downcast_ref::<sequencer_server::Error>() {
                Some(sequencer_server::Error::Refused(_)) => ExitCode::from(CONFIG_ERROR as u8),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// `--force-new-cluster`: prints each sequence's new floor, then the node starts as usual.
fn force_new_cluster(config: &Config, id: u64, skip: u64) -> Result<(), ExitCode> {
    use sequencer_server::backup::recover;
    let forced = offline(recover::force_new_cluster(config, id, skip))?;
    let mut out = std::io::stdout().lock();
    print_floors(&mut out, &forced.floors, forced.floor, "this node");
    let _ = writeln!(
        out,
        "node {id} is now a one-node cluster at log index {} (the old data is kept in {}); \
         add members back with `client member add`, and start this node without \
         --force-new-cluster from now on",
        forced.index,
        forced.kept.display()
    );
    Ok(())
}

/// `server restore`: prints each sequence's new floor, or one line saying why not.
fn restore(config: &Config, from: &std::path::Path, skip_ahead: u64) -> ExitCode {
    use sequencer_server::backup::restore;
    let done = match offline(restore::restore(config, from, skip_ahead)) {
        Ok(done) => done,
        Err(code) => return code,
    };
    let mut out = std::io::stdout().lock();
    print_floors(&mut out, &done.floors, done.floor, "the backup");
    let dirs: Vec<String> = done.dirs.iter().map(|d| d.display().to_string()).collect();
    let _ = writeln!(
        out,
        "restored log index {} with --skip-ahead {skip_ahead} into {} data dirs: {}; start \
         the cluster with `server`",
        done.index,
        dirs.len(),
        dirs.join(", ")
    );
    ExitCode::SUCCESS
}

/// Runs a step on stopped data to its end on a runtime of its own; a failure is said in one
/// line and exits as a bad config does (the launcher does not retry it).
fn offline<T, E: Display>(
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            say(format_args!("starting the runtime: {e}"));
            ExitCode::FAILURE
        })?;
    runtime.block_on(step).map_err(|e| {
        say(e);
        ExitCode::from(CONFIG_ERROR as u8)
    })
}

/// Each sequence's floor after a skip-ahead, and where sequences `held_by` lacks start.
fn print_floors(out: &mut impl Write, floors: &[(String, u64, u64)], floor: u64, held_by: &str) {
    for (name, last, raised) in floors {
        let _ = writeln!(
            out,
            "sequence {name}: last id {last} in {held_by}; ids continue above {raised}"
        );
    }
    let _ = writeln!(
        out,
        "a sequence {held_by} does not hold starts above {floor}"
    );
}

/// The config, or the exit code after saying why not. Peers must share a secret: with none
/// configured, the launcher makes one up, kept in the data dir for its next start and for
/// `server --node K` (Config::load reads it there), and loads again.
fn load_config(
    launcher: bool,
    path: &std::path::Path,
    required: bool,
    overrides: &Overrides,
) -> Result<Config, ExitCode> {
    let mut made_secret = false;
    let mut made_token = false;
    loop {
        match Config::load(path, required, overrides) {
            Ok(c) if launcher && c.admin_token.is_none() && !made_token => {
                let file = launcher::make_admin_token(&c.data_dir).map_err(|e| {
                    say(format_args!("{e:#}"));
                    ExitCode::FAILURE
                })?;
                say(format_args!(
                    "made up an admin token for membership changes, kept in {} (mode 0600); \
                     `client` reads it there when run beside config.json",
                    file.display()
                ));
                made_token = true;
            }
            Ok(c) => return Ok(c),
            Err(ConfigError::NoSecret { data_dir, .. }) if launcher && !made_secret => {
                let file = launcher::make_secret(&data_dir).map_err(|e| {
                    say(format_args!("{e:#}"));
                    ExitCode::FAILURE
                })?;
                say(format_args!(
                    "made up a cluster secret, kept in {} (mode 0600) for the next start and \
                     for `server --node K` on this data dir",
                    file.display()
                ));
                made_secret = true;
            }
            Err(e) => {
                say(e);
                return Err(ExitCode::from(CONFIG_ERROR as u8));
            }
        }
    }
}

/// One line on stderr, prefixed `server: `. A closed stderr (a launcher or `| tee` that died)
/// is ignored: eprintln! would panic.
pub(crate) fn say(msg: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "server: {msg}");
}

/// The soft limit on open files after raising it to the hard limit, or why it stayed.
type OpenFiles = Result<libc::rlim_t, String>;

/// Every connection is a descriptor, and the usual soft limit (1024) is reached long before
/// the CPU is busy; the hard limit is what the administrator allows.
fn raise_open_files_limit() -> OpenFiles {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // Safety: getrlimit and setrlimit with a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(format!(
                "it stays at {} (hard limit {}): {}",
                limit.rlim_cur,
                limit.rlim_max,
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(limit.rlim_max)
}

fn log_open_files(open_files: &OpenFiles) {
    match open_files {
        Ok(n) => tracing::info!(open_files_limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
}

/// Our story at info. openraft's own lines (vote races, an error per retry to a down peer)
/// are off; a stopped Raft is logged by the node itself. RUST_LOG overrides it.
const DEFAULT_LOG_FILTER: &str = "info,openraft=off";

fn init_tracing(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // On a closed stderr the layer would eprintln! its own write error, and eprintln!
        // panics: inside whichever task logged, Raft's core among them.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object per line, the event's fields at the top level, for log shippers.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

async fn run_node(config: Config, id: u64, open_files: OpenFiles) -> anyhow::Result<()> {
    let Some(node) = config.node(id).cloned() else {
        let ids: Vec<String> = config.nodes.iter().map(|n| n.id.to_string()).collect();
        anyhow::bail!(
            "node {id} is not in the config (its nodes are {})",
            ids.join(", ")
        );
    };
    let client = bind(&node.addr, "addr", id).await?;
    let peer = bind(&node.peer_addr, "peer_addr", id).await?;
    let http = match &node.http_addr {
        Some(addr) => Some(bind(addr, "http_addr", id).await?),
        None => None,
    };
    // `run` polls its shutdown future only once the node has started, so this line follows
    // "node started", and a node that fails at start still says one line only.
    let shutdown = async move {
        let mut signal = std::pin::pin!(shutdown_signal());
        // Listening before the line: a SIGTERM right after it still stops the node gracefully.
        if futures::poll!(signal.as_mut()).is_pending() {
            log_open_files(&open_files);
            signal.await;
        }
    };
    run(config, id, Listeners { client, peer, http }, shutdown)
        .await
        .with_context(|| format!("node {id}"))
}

async fn bind(addr: &str, key: &str, id: u64) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (the {key} of node {id})"))
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
