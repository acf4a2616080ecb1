//! Backups and restores with real processes: a backup taken under load restores into a new
//! cluster on other ports that holds the backup's state and never hands out an id again; bad
//! files and existing data dirs are refused with nothing written; a backup needs the admin
//! credential and a reachable primary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sequencer_client::{Client, Identity};
use sequencer_server::backup::file;
use testkit::{sibling_binary, Builder, Cluster};
use tonic::Code;

mod common;
use common::primary_and_follower;

const SERVER: &str = env!("CARGO_BIN_EXE_server");
const TOKEN: &str = "backup-test-admin-token";
const SKIP: u64 = 1_000_000;

fn settings(b: Builder) -> Builder {
    b.steady()
        .set("admin_token", TOKEN)
        // The load's client must outlive the backup and the restore without heartbeats.
        .set("client_heartbeat_interval_ms", 600_000)
}

/// `client --config CONFIG ARGS` with the admin token.
fn client_cli(config: &Path, args: &[&str]) -> Output {
    Command::new(sibling_binary(SERVER, "client"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env("SEQUENCER_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap()
}

/// `server restore --config CONFIG --from FILE --skip-ahead N`.
fn restore(config: &Path, from: &Path, skip: u64) -> Output {
    Command::new(SERVER)
        .arg("restore")
        .arg("--config")
        .arg(config)
        .arg("--from")
        .arg(from)
        .args(["--skip-ahead", &skip.to_string()])
        .output()
        .unwrap()
}

/// Waits until sequence `name` has handed out at least `at_least` ids.
async fn wait_at_least(cluster: &Cluster, name: &str, at_least: u64) -> u64 {
    let client = cluster.client();
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let now = client.current_id(name).await.unwrap().id;
        if now >= at_least {
            return now;
        }
        assert!(
            Instant::now() < end,
            "{name} stayed at {now}, below {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The node dirs under the data dir of `config`.
fn node_dirs(config: &Path) -> Vec<PathBuf> {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config).unwrap()).unwrap();
    let data = PathBuf::from(config["data_dir"].as_str().unwrap());
    match std::fs::read_dir(&data) {
        Err(_) => vec![],
        Ok(entries) => entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("node-")
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_cluster_that_holds_it_and_never_reissues_an_id() {
    let mut old = settings(Cluster::builder(SERVER)).start().unwrap();
    old.wait_for_primary().await.unwrap();
    let client = old.client();
    let me = Identity::from(&client.register("alice").await.unwrap());
    client.join(&me, "chat").await.unwrap();

    // GetId and Send load while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, me, stop) = (old.client(), me.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ids, mut seq) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                ids.push(client.get_id("a").await.unwrap().id);
                let b = client.get_ids("b", 3).await.unwrap();
                ids.extend(b.first..b.first + 3);
                seq += 1;
                let payload = format!("message {seq}").into_bytes();
                client.send(&me, "chat", seq, payload).await.unwrap();
            }
            ids
        })
    };
    wait_at_least(&old, "a", 20).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.seqbak");
    let out = client_cli(
        old.config_path(),
        &["--json", "backup", path.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The load goes on past the backup: those ids are in no copy.
    let after = old.client().current_id("a").await.unwrap().id + 10;
    wait_at_least(&old, "a", after).await;
    stop.store(true, Ordering::Relaxed);
    let ids = load.await.unwrap();
    let handed_out = *ids.iter().max().unwrap();

    let backup = file::read(&path).unwrap();
    assert_eq!(summary["index"], backup.header.index);
    assert_eq!(summary["sequences"], 2);
    assert_eq!(backup.state.sequences.current("created-later"), 0);
    assert_eq!(summary["groups"], 1);
    assert_eq!(summary["bytes"], std::fs::metadata(&path).unwrap().len());
    let in_backup = |name: &str| backup.state.sequences.current(name);
    assert!(
        in_backup("a") >= 20 && in_backup("a") < after,
        "{}",
        in_backup("a")
    );
    let members: Vec<u64> = backup.header.members.iter().map(|m| m.id).collect();
    assert_eq!(members, vec![1, 2, 3]);

    // A new cluster on other ports, from the backup.
    let mut new = settings(Cluster::builder(SERVER)).configure().unwrap();
    let out = restore(new.config_path(), &path, SKIP);
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for name in ["a", "b"] {
        let line = format!(
            "sequence {name}: last id {} in the backup; ids continue above {}",
            in_backup(name),
            in_backup(name) + SKIP
        );
        assert!(printed.contains(&line), "{printed}");
    }
    for id in new.ids() {
        new.start_node(id).unwrap();
    }
    new.wait_for_primary().await.unwrap();
    let fresh = new.client();
    for name in ["a", "b"] {
        assert_eq!(
            fresh.current_id(name).await.unwrap().id,
            in_backup(name) + SKIP,
            "{name}"
        );
    }
    assert!(printed.contains(&format!(
        "a sequence the backup does not hold starts above {SKIP}"
    )));
    // A sequence first used after the backup may have handed out ids the copy never saw.
    assert_eq!(fresh.get_id("created-later").await.unwrap().id, SKIP + 1);
    let next = fresh.get_id("a").await.unwrap().id;
    assert_eq!(next, in_backup("a") + SKIP + 1);
    assert!(
        next > handed_out,
        "{next} was handed out already (up to {handed_out})"
    );

    // Groups, members and retained messages are the backup's.
    let groups: Vec<(String, u32, u64)> = fresh
        .list_groups()
        .await
        .unwrap()
        .groups
        .into_iter()
        .map(|g| (g.name, g.members, g.next_seq))
        .collect();
    let expected: Vec<(String, u32, u64)> = backup
        .state
        .groups
        .list()
        .into_iter()
        .map(|(n, m, s)| (n, m as u32, s))
        .collect();
    assert_eq!(groups, expected);
    let members = fresh.list_members("chat").await.unwrap().members;
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].client_id, me.client_id);
    let next_seq = expected[0].2;
    let retained = backup
        .state
        .groups
        .read("chat", 1, usize::MAX, usize::MAX)
        .unwrap()
        .deliveries;
    assert_eq!(retained.len() as u64, next_seq - 1);
    // A subscriber resuming past the backup's end is told where it ends.
    let beyond = fresh.subscribe(&me, "chat", next_seq + 5).await;
    let (code, message) = match beyond {
        Err(e) => (e.code(), e.to_string()),
        Ok(mut s) => {
            let e = s.message().await.unwrap_err();
            (e.code(), e.message().to_string())
        }
    };
    assert_eq!(code, Code::OutOfRange, "{message}");
    let end = format!("next group_seq is {next_seq}");
    assert!(message.contains(&end), "{message}");
    // The restored client's token still works, and its stream replays the backup's.
    let mut stream = fresh.subscribe(&me, "chat", 1).await.unwrap();
    for want in &retained {
        let got = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (got.group_seq, got.sender_id, &got.payload),
            (want.group_seq, want.sender_id, &want.payload)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_backups_and_existing_data_dirs_are_refused_and_nothing_is_written() {
    let mut old = settings(Cluster::builder(SERVER)).nodes(1).start().unwrap();
    old.wait_for_primary().await.unwrap();
    old.client().get_ids("x", 5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.seqbak");
    let out = client_cli(old.config_path(), &["backup", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("written to"), "{}", text(&out));
    let bytes = std::fs::read(&good).unwrap();
    // It holds every message and the token hashes: the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&good).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let target = settings(Cluster::builder(SERVER)).configure().unwrap();
    let config = target.config_path().to_path_buf();
    let mut flipped = bytes.clone();
    flipped[bytes.len() / 2] ^= 0x20;
    for (name, content, why) in [
        ("cut.seqbak", bytes[..bytes.len() - 7].to_vec(), "checksum"),
        ("flipped.seqbak", flipped, "checksum"),
        ("short.seqbak", bytes[..10].to_vec(), "cut short"),
        (
            "other.json",
            b"{\"servers\": 3}".to_vec(),
            "not a sequencer backup",
        ),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let out = restore(&config, &path, 10);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().last().unwrap();
        assert!(
            line.contains(name) && line.contains(why),
            "{name}: {stderr}"
        );
        assert!(
            node_dirs(&config).is_empty(),
            "{name}: {:?}",
            node_dirs(&config)
        );
    }
    let missing = restore(&config, &dir.path().join("none.seqbak"), 10);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    assert!(node_dirs(&config).is_empty());

    // A good one builds every node's dir; a second restore over them is refused, naming them.
    let out = restore(&config, &good, 0);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(node_dirs(&config).len(), 3);
    let again = restore(&config, &good, 0);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    let said = String::from_utf8_lossy(&again.stderr);
    for dir in node_dirs(&config) {
        assert!(said.contains(&dir.display().to_string()), "{said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_needs_the_admin_credential_and_a_reachable_primary() {
    let mut cluster = settings(Cluster::builder(SERVER))
        .with_proxies()
        .set("request_timeout_ms", 1_000)
        .start()
        .unwrap();
    let (_, follower) = primary_and_follower(&mut cluster).await;
    let addr = cluster.node(follower).addr.clone();
    let without = Client::new([addr.as_str()]).unwrap();
    assert_eq!(
        without.backup().await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let with = Client::new([addr.as_str()])
        .unwrap()
        .with_admin_token(TOKEN);
    let mut stream = with.backup().await.unwrap();
    let mut n = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        n += chunk.data.len();
    }
    assert!(n > 0);

    cluster.isolate(follower);
    // The client retries UNAVAILABLE until its deadline; the node's own answer is that.
    let with = with.with_deadline(Duration::from_secs(5));
    let started = Instant::now();
    let err = with.backup().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_writes_scheduled_backups_and_keeps_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    let mut cluster = settings(Cluster::builder(SERVER))
        .set("backup_dir", backups.display().to_string())
        .set("backup_interval_s", 1)
        .set("backup_keep", 2)
        .start()
        .unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let client = cluster.client();
    // Wait for four written backups, each after more ids.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        client.get_id("s").await.unwrap();
        let written = cluster
            .log(primary)
            .matches("wrote a scheduled backup")
            .count();
        if written >= 4 {
            break;
        }
        assert!(Instant::now() < end, "{written} scheduled backups in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in cluster.ids().into_iter().filter(|&id| id != primary) {
        assert_eq!(
            cluster.log(id).matches("wrote a scheduled backup").count(),
            0
        );
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seqbak"))
        .collect();
    names.sort();
    // Rotation runs after each write: at most one more than kept while a write is between.
    assert!(
        (2..=3).contains(&names.len()),
        "{names:?} with backup_keep 2"
    );
    let read: Vec<_> = names.iter().map(|p| file::read(p).unwrap()).collect();
    assert!(read.iter().all(|b| b.header.served_by == primary));
    assert!(read
        .windows(2)
        .all(|w| w[0].header.index < w[1].header.index));
    // No temporary file passes as a backup, and none is left once writes stop.
    drop(cluster);
    let left: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().filter(|n| n.ends_with(".seqbak")).count() <= 3);
    assert!(left.iter().all(|n| !n.ends_with(".tmp")), "{left:?}");
}

/// A copy of `dir` in a temporary dir (under `data`).
fn dir_copy(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(copy.path().join("data"))
        .status()
        .unwrap();
    assert!(ok.success());
    copy
}

/// Puts a copy made by [`dir_copy`] back at `dir`.
fn copy_back(copy: &Path, dir: &Path) {
    let ok = Command::new("cp")
        .arg("-a")
        .arg(copy)
        .arg(dir)
        .status()
        .unwrap();
    assert!(ok.success());
}

/// Ids from `client` until `n` more are taken, each checked unseen in `seen`.
async fn take_ids(client: &Client, n: usize, seen: &mut std::collections::HashSet<u64>) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let id = client.get_id("ids").await.unwrap().id;
        assert!(seen.insert(id), "id {id} was handed out twice");
        assert!(id > last, "{id} after {last}");
        last = id;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_of_a_lost_majority_forms_a_new_cluster_that_never_reissues_an_id() {
    let mut cluster = settings(Cluster::builder(SERVER)).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let mut seen = std::collections::HashSet::new();
    take_ids(&cluster.client(), 50, &mut seen).await;

    // Node 1 goes down; the other two go on handing out ids it never hears of.
    cluster.kill(1);
    cluster.wait_for_primary_among(&[2, 3]).await.unwrap();
    let others =
        Client::new([cluster.node(2).addr.as_str(), cluster.node(3).addr.as_str()]).unwrap();
    let handed_out = take_ids(&others, 50, &mut seen).await;

    // While they answer, forcing node 1 is refused, naming them, and changes nothing.
    let config = cluster.dir().join("config-1.json");
    let force = |skip: &str| {
        Command::new(SERVER)
            .arg("--config")
            .arg(&config)
            .args(["--node", "1", "--force-new-cluster", "--skip-ahead", skip])
            .output()
            .unwrap()
    };
    let refused = force("1000");
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("refusing --force-new-cluster") && said.contains("[2, 3]"),
        "{said}"
    );
    assert!(node_dirs(&config)
        .iter()
        .all(|d| !d.to_string_lossy().contains("before-force")));

    // The majority is lost for good; a copy of node 3's data is kept, to bring it back later.
    cluster.kill(2);
    cluster.kill(3);
    let old3 = dir_copy(&cluster.data_dir(3));
    cluster.wipe(2).unwrap();
    cluster.wipe(3).unwrap();
    cluster
        .start_node_with(1, &["--force-new-cluster", "--skip-ahead", "1000"])
        .unwrap();
    cluster.wait_for_primary_among(&[1]).await.unwrap();
    assert!(
        cluster.log(1).contains("ids continue above"),
        "{}",
        cluster.log(1)
    );
    let alone = cluster.client_for(1);
    let first = alone.get_id("ids").await.unwrap().id;
    assert!(
        first > handed_out,
        "{first} was handed out already (up to {handed_out})"
    );
    assert!(seen.insert(first));
    take_ids(&alone, 20, &mut seen).await;
    assert!(node_dirs(&config)
        .iter()
        .any(|d| d.to_string_lossy().contains("before-force")));

    // Node 3 comes back with its old data: its campaigns reach node 1, which refuses them
    // (another incarnation), keeps its term and goes on serving.
    let term = alone.status().await.unwrap().term;
    copy_back(&old3.path().join("data"), &cluster.data_dir(3));
    cluster.start_node(3).unwrap();
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        take_ids(&alone, 5, &mut seen).await;
    }
    assert_eq!(
        alone.status().await.unwrap().term,
        term,
        "node 3 disturbed node 1"
    );
    assert!(cluster.running().contains(&1), "{}", cluster.log(1));
    cluster.kill(3);
    cluster.wipe(3).unwrap();

    // Grown back to three by joins; every node hands out ids none has seen.
    let via = cluster.node(1).addr.clone();
    for id in [2, 3] {
        cluster.start_node_with(id, &["--join", &via]).unwrap();
    }
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let list = alone.list_cluster_members().await;
        let voters = list.as_ref().map_or(0, |l| {
            l.members.iter().filter(|m| m.role == "voter").count()
        });
        if voters == 3 {
            break;
        }
        assert!(
            Instant::now() < end,
            "never grew back to 3 voters: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in [1, 2, 3] {
        take_ids(&cluster.client_for(id), 10, &mut seen).await;
    }
}

/// Figures for RELIABILITY.md, not a check: run by hand, against a release build with
/// `SEQTEST_SERVER_BIN=target/release/server cargo test --test backup -- --ignored
/// --nocapture`. Backup and restore of 10,000 sequences and groups retaining about 100 MiB,
/// and GetId throughput on the primary with and without a backup running, in alternating
/// rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_backup_and_restore_of_a_large_state() {
    let bin = std::env::var("SEQTEST_SERVER_BIN").unwrap_or_else(|_| SERVER.to_string());
    let big = |b: Builder| {
        settings(b)
            .set("max_sequences", 20_000)
            .set("retain_total_bytes", 256u64 << 20)
    };
    let mut cluster = big(Cluster::builder(&bin)).start().unwrap();
    let primary = cluster.wait_for_primary().await.unwrap();
    let client = Arc::new(cluster.client_for(primary));
    for chunk in (0..10_000).collect::<Vec<_>>().chunks(500) {
        let calls = chunk.iter().map(|i| {
            let client = client.clone();
            async move { client.get_id(&format!("s-{i}")).await.unwrap() }
        });
        futures::future::join_all(calls).await;
    }
    let me = Identity::from(&client.register("filler").await.unwrap());
    let payload = vec![7u8; 1 << 20];
    for g in 0..7 {
        let group = format!("g-{g}");
        client.join(&me, &group).await.unwrap();
        for seq in 1..=15 {
            client
                .send(&me, &group, seq, payload.clone())
                .await
                .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let admin = Client::new([cluster.node(primary).addr.as_str()])
        .unwrap()
        .with_admin_token(TOKEN)
        .with_deadline(Duration::from_secs(300));
    // GetId from 32 callers on the primary until `done`, as ids per second.
    async fn load(client: Arc<Client>, done: impl std::future::Future<Output = ()>) -> f64 {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let callers: Vec<_> = (0..32)
            .map(|_| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        client.get_id("load").await.unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        done.await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for c in callers {
            total += c.await.unwrap();
        }
        total as f64 / started.elapsed().as_secs_f64()
    }
    // Warm up: the followers are still taking in the messages.
    load(client.clone(), tokio::time::sleep(Duration::from_secs(3))).await;
    let mut path = None;
    for round in 0..3 {
        let idle = load(client.clone(), tokio::time::sleep(Duration::from_secs(3))).await;
        let target = dir.path().join(format!("big-{round}.seqbak"));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let took = {
            let admin = &admin;
            let target = target.clone();
            let backup = async move {
                let started = Instant::now();
                let mut stream = admin.backup().await.unwrap();
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await.unwrap() {
                    out.extend_from_slice(&chunk.data);
                }
                std::fs::write(&target, &out).unwrap();
                let _ = tx.send(());
                started.elapsed()
            };
            let (took, during) = tokio::join!(
                backup,
                load(client.clone(), async {
                    let _ = rx.await;
                })
            );
            println!(
                "round {round}: GetId idle {idle:.0}/s, during the backup {during:.0}/s ({:.2}x)",
                during / idle
            );
            took
        };
        let bytes = std::fs::metadata(&target).unwrap().len();
        println!(
            "round {round}: backup took {:.2} s, {:.1} MiB",
            took.as_secs_f64(),
            bytes as f64 / (1 << 20) as f64
        );
        path = Some(target);
    }
    let path = path.unwrap();
    let fresh = big(Cluster::builder(&bin)).configure().unwrap();
    let started = Instant::now();
    let out = Command::new(&bin)
        .arg("restore")
        .arg("--config")
        .arg(fresh.config_path())
        .arg("--from")
        .arg(&path)
        .args(["--skip-ahead", "1000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    println!(
        "restore of 3 nodes took {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
