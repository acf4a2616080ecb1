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
