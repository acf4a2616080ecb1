//! `server`: with `--node K`, runs node K of the config; with no `--node`, starts every node of
//! the config as a child process and supervises them.

mod launcher;

// glibc's malloc and free took about 8 % of a node's CPU; with mimalloc a log entry costs
// about a fifth less CPU (BENCHMARKS.md, "What was tried").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sequencer_server::config::{Config, Overrides};
use sequencer_server::{run, Listeners};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A distributed id sequencer: unique, strictly increasing, never reissued.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Config file (default: ./config.json, or built-in defaults if it does not exist).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run only this node (for one node per host). Without it, every node starts here.
    #[arg(long)]
    node: Option<u64>,
    /// Overrides `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `worker_threads`: threads of this node's async runtime.
    #[arg(long)]
    worker_threads: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing();
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from("config.json"), false),
    };
    let overrides = Overrides {
        data_dir: args.data_dir.clone(),
        worker_threads: args.worker_threads,
    };
    let config = match Config::load(&path, required, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("server: {e}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    match (args.node, config.worker_threads) {
        (Some(_), Some(n)) => {
            builder.worker_threads(n);
        }
        (Some(_), None) => {}
        // The launcher only starts and watches its children.
        (None, _) => {
            builder.worker_threads(1);
        }
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("server: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.node {
            Some(id) => run_node(config, id).await,
            None => launcher::run(&path, path.exists(), &config, &args.data_dir).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Our story at info. openraft's own lines (vote races, an error per retry to a down peer)
/// are off; a stopped Raft is logged by the node itself. RUST_LOG overrides it.
const DEFAULT_LOG_FILTER: &str = "info,openraft=off";

fn init_tracing() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run_node(config: Config, id: u64) -> anyhow::Result<()> {
    let Some(node) = config.node(id).cloned() else {
        let ids: Vec<String> = config.nodes.iter().map(|n| n.id.to_string()).collect();
        anyhow::bail!(
            "node {id} is not in the config (its nodes are {})",
            ids.join(", ")
        );
    };
    if config.nodes.len() > 1 && config.cluster_secret.is_none() {
        anyhow::bail!(
            "node {id}: a cluster of {} nodes needs `cluster_secret` (in the config or {}) so \
             that peers can prove who they are; `server` without --node makes one up for the \
             nodes it starts",
            config.nodes.len(),
            sequencer_server::config::CLUSTER_SECRET_ENV
        );
    }
    let client = bind(&node.addr, "addr", id).await?;
    let peer = bind(&node.peer_addr, "peer_addr", id).await?;
    run(config, id, Listeners { client, peer }, shutdown_signal())
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
