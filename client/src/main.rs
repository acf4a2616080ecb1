//! `client`: the command line over the client library.

// As in the server: the load generator shares the cores with the nodes it measures.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod backup;
mod bench;
mod certs;
mod groups;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sequencer_client::{addrs_from_config, node_hosts_from_config, pb, Client, Tls};
use serde_json::json;

/// Talks to a sequencer cluster: any server will do, and down servers are skipped.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// A server's client address (repeatable). Default: every node in the config, in order.
    #[arg(long = "server", global = true)]
    servers: Vec<String>,
    /// Config file to read server addresses from.
    #[arg(long, global = true, default_value = "config.json")]
    config: PathBuf,
    /// Print JSON, one object per line, for scripts.
    #[arg(long, global = true)]
    json: bool,
    /// Talk TLS to the servers, trusting the public web roots unless --ca is given.
    #[arg(long, global = true)]
    tls: bool,
    /// The CA that signed the servers' certificates (PEM); implies --tls.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM), for servers with `tls_client_auth`; needs --key.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The admin token for `member` and `transfer-primary`; without it, $SEQUENCER_ADMIN_TOKEN,
    /// then the file admin.token in the data_dir of --config.
    ///
    /// First found wins: this flag, the environment variable SEQUENCER_ADMIN_TOKEN, then the
    /// file admin.token in the data_dir of the --config file (data_dir defaults to "data"; a
    /// relative one is relative to the current directory, as the server takes it), where the
    /// one-command launcher writes the token it makes up. An empty value counts as none, and
    /// no token at all is fine for `member list`. A flag shows in `ps`: prefer the others.
    #[arg(long, global = true, value_name = "TOKEN")]
    admin_token: Option<admin::Secret>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Get an id (or, with --count, a dense block of ids).
    GetId {
        /// Sequence name ([A-Za-z0-9._-]{1,64}); default "default".
        #[arg(long, default_value = "")]
        sequence: String,
        /// Ask for a block of this many ids (GetIds); prints first..last.
        #[arg(long)]
        count: Option<u32>,
        /// Repeat the call this many times, one line each.
        #[arg(long, default_value_t = 1)]
        repeat: u64,
    },
    /// The last id of a sequence as applied on the answering server.
    CurrentId {
        #[arg(long, default_value = "")]
        sequence: String,
    },
    /// The cluster as a server sees it.
    Status,
    /// The cluster's membership: list it, or add, promote or remove a node. Changes need the
    /// admin token (see --admin-token).
    Member {
        #[command(subcommand)]
        cmd: admin::MemberCmd,
    },
    /// Hand the primary to another voter at once, without waiting for an election. Needs the
    /// admin token (see --admin-token).
    TransferPrimary {
        /// The voter to hand it to; default: the most up-to-date one.
        #[arg(long, value_name = "ID")]
        to: Option<u32>,
    },
    /// Save a consistent copy of the whole replicated state into FILE (written whole or not at
    /// all). Needs the admin token (see --admin-token).
    Backup {
        /// Where to write it; an existing file is replaced only once the new copy is whole.
        file: PathBuf,
    },
    /// Print the client addresses of the config, one per line.
    Servers,
    /// Load the cluster from C concurrent callers for a while, then report throughput,
    /// latency percentiles and errors, after checking what came back (BENCHMARKS.md).
    Bench {
        #[arg(long, value_enum, default_value = "get-id")]
        mode: bench::Mode,
        /// What to load: this cluster, or etcd or Redis at the --server addresses, to compare.
        #[arg(long, value_enum, default_value = "sequencer")]
        system: bench::System,
        /// Concurrent callers, spread over the servers.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Ids per call, for get-ids.
        #[arg(long, default_value_t = 1000)]
        count: u32,
        /// HTTP/2 connections per server.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Payload bytes per message, for send.
        #[arg(long, default_value_t = 64)]
        payload: usize,
    },
    /// Make a private CA and certificates for every node of the config and for a client,
    /// to turn on TLS (see SECURITY.md).
    GenCerts {
        /// Where to write them.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
    /// Register a group-messaging identity; prints its client id and token.
    Register {
        #[arg(long)]
        name: String,
    },
    /// Join a group (created if it does not exist).
    Join {
        #[command(flatten)]
        me: groups::IdentityArgs,
        #[arg(long)]
        group: String,
    },
    /// Leave a group.
    Leave {
        #[command(flatten)]
        me: groups::IdentityArgs,
        #[arg(long)]
        group: String,
    },
    /// Send one message to a group.
    Send {
        #[command(flatten)]
        me: groups::IdentityArgs,
        #[arg(long)]
        group: String,
        /// This client's message number in the group; default: the next one the server expects.
        #[arg(long)]
        seq: Option<u64>,
        /// The message text.
        text: String,
    },
    /// Every group with its member count.
    Groups,
    /// The members of a group.
    Members { group: String },
    /// Print a group's deliveries as they come (heartbeats while it listens).
    Listen {
        #[command(flatten)]
        me: groups::IdentityArgs,
        group: String,
        /// First group_seq to print; default: from the next delivery on.
        #[arg(long = "from", default_value_t = 0)]
        from_seq: u64,
    },
    /// Interactive group chat: each line typed is sent; deliveries are printed as they come.
    Chat {
        #[arg(long)]
        name: String,
        #[arg(long)]
        group: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn servers(cli: &Cli) -> anyhow::Result<Vec<String>> {
    if !cli.servers.is_empty() {
        return Ok(cli.servers.clone());
    }
    Ok(addrs_from_config(&config_text(cli)?)?)
}

/// The config file's text, or `{}` where there is none.
fn config_text(cli: &Cli) -> anyhow::Result<String> {
    match std::fs::read_to_string(&cli.config) {
        Ok(text) => Ok(text),
        // No config file: the defaults a fresh checkout's config.json also has.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("{}".into()),
        Err(e) => Err(e).with_context(|| format!("reading {}", cli.config.display())),
    }
}

/// TLS settings from the flags, with the files read.
fn tls_options(cli: &Cli) -> anyhow::Result<Option<Tls>> {
    if !cli.tls && cli.ca.is_none() && cli.cert.is_none() {
        return Ok(None);
    }
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let ca = cli.ca.as_ref().map(read).transpose()?;
    let identity = match (&cli.cert, &cli.key) {
        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
        _ => None,
    };
    Ok(Some(Tls { ca, identity }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let addrs = servers(&cli)?;
    if let Cmd::Servers = cli.command {
        for a in addrs {
            println!("{a}");
        }
        return Ok(());
    }
    if let Cmd::GenCerts { out } = &cli.command {
        let nodes = node_hosts_from_config(&config_text(&cli)?)?;
        for file in certs::generate(out, &nodes)? {
            println!("{file}");
        }
        return Ok(());
    }
    if let Cmd::Bench {
        mode,
        system,
        concurrency,
        duration,
        count,
        connections,
        payload,
    } = &cli.command
    {
        if !(duration.is_finite() && *duration > 0.0) {
            anyhow::bail!("--duration must be a positive number of seconds");
        }
        return bench::run(bench::Options {
            system: *system,
            mode: *mode,
            concurrency: *concurrency,
            duration: std::time::Duration::from_secs_f64(*duration),
            count: *count,
            connections: *connections,
            payload: *payload,
            servers: addrs,
            tls: tls_options(&cli)?,
            json: cli.json,
        })
        .await;
    }
    let mut client = Client::new(&addrs)?;
    if let Some(tls) = tls_options(&cli)? {
        client = client.with_tls(tls)?;
    }
    if matches!(
        cli.command,
        Cmd::Member { .. } | Cmd::TransferPrimary { .. } | Cmd::Backup { .. }
    ) {
        let flag = cli.admin_token.as_ref().map(|s| s.0.as_str());
        let env = admin::token_from_env()?;
        if let Some((token, source)) =
            admin::find_token(flag, env.as_deref(), || config_text(&cli))?
        {
            tracing::debug!("admin token from {source}");
            client = client.with_admin_token(token);
        }
    }
    match &cli.command {
        Cmd::GetId {
            sequence,
            count,
            repeat,
        } => {
            for _ in 0..*repeat {
                match count {
                    None => {
                        let r = client.get_id(sequence).await?;
                        print_result(
                            cli.json,
                            json!({"id": r.id, "served_by": r.served_by, "primary": r.primary}),
                            r.id,
                        );
                    }
                    Some(n) => {
                        let r = client.get_ids(sequence, *n).await?;
                        let last = r.first + u64::from(r.count) - 1;
                        print_result(
                            cli.json,
                            json!({"first": r.first, "last": last, "count": r.count,
                                   "served_by": r.served_by, "primary": r.primary}),
                            format!("{}..{}", r.first, last),
                        );
                    }
                }
            }
        }
        Cmd::CurrentId { sequence } => {
            let r = client.current_id(sequence).await?;
            print_result(
                cli.json,
                json!({"id": r.id, "served_by": r.served_by, "applied_index": r.applied_index}),
                r.id,
            );
        }
        Cmd::Status => print_status(&client.status().await?, cli.json),
        Cmd::Member { cmd } => admin::member(&client, cmd, cli.json).await?,
        Cmd::TransferPrimary { to } => admin::transfer_primary(&client, *to, cli.json).await?,
        Cmd::Backup { file } => backup::save(&client, file, cli.json).await?,
        Cmd::Servers | Cmd::GenCerts { .. } | Cmd::Bench { .. } => {
            unreachable!("handled above")
        }
        Cmd::Register { name } => groups::register(&client, name, cli.json).await?,
        Cmd::Join { me, group } => groups::join(&client, &me.identity(), group, cli.json).await?,
        Cmd::Leave { me, group } => client.leave(&me.identity(), group).await?,
        Cmd::Send {
            me,
            group,
            seq,
            text,
        } => groups::send(&client, &me.identity(), group, *seq, text, cli.json).await?,
        Cmd::Groups => groups::list_groups(&client, cli.json).await?,
        Cmd::Members { group } => groups::list_members(&client, group, cli.json).await?,
        Cmd::Listen {
            me,
            group,
            from_seq,
        } => groups::listen(&client, &me.identity(), group, *from_seq, cli.json).await?,
        Cmd::Chat { name, group } => groups::chat(client, name, group).await?,
    }
    Ok(())
}

/// Prints one result: as a line of JSON under --json, else as text for people.
fn print_result(json_out: bool, json: serde_json::Value, text: impl std::fmt::Display) {
    if json_out {
        println!("{json}");
    } else {
        println!("{text}");
    }
}

fn print_status(s: &pb::StatusResponse, json_out: bool) {
    if json_out {
        let nodes: Vec<_> = s
            .nodes
            .iter()
            .map(|n| {
                json!({"id": n.id, "addr": n.addr, "peer_addr": n.peer_addr,
                       "reachable": n.reachable, "primary": n.primary, "role": n.role})
            })
            .collect();
        println!(
            "{}",
            json!({"node_id": s.node_id, "primary": s.primary, "role": s.role, "term": s.term,
                   "commit_index": s.commit_index, "applied_index": s.applied_index, "nodes": nodes})
        );
        return;
    }
    let primary = if s.primary == 0 {
        "none".to_string()
    } else {
        s.primary.to_string()
    };
    println!(
        "answered by node {} ({}), primary {primary}, term {}, commit {}, applied {}",
        s.node_id, s.role, s.term, s.commit_index, s.applied_index
    );
    println!(
        "{:<4} {:<22} {:<22} {:<10} {:<12} PRIMARY",
        "NODE", "CLIENT", "PEER", "REACHABLE", "ROLE"
    );
    for n in &s.nodes {
        // A server from before roles were reported sends none.
        let role = if n.role.is_empty() { "-" } else { &n.role };
        let reachable = if n.reachable { "yes" } else { "no" };
        let primary = if n.primary { "*" } else { "" };
        let row = format!(
            "{:<4} {:<22} {:<22} {:<10} {role:<12} {primary}",
            n.id, n.addr, n.peer_addr, reachable
        );
        println!("{}", row.trim_end());
    }
}
