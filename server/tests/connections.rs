//! Connections that never speak HTTP/2, against real server processes: one past
//! `max_connections` is refused at once, the others are closed at
//! `connection_preface_timeout` (with TLS too, for a handshake that stalls), and a node out
//! of file descriptors warns, does not spin, and serves again once they are back.

use std::time::Duration;

use testkit::{sibling_binary, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// Reads `s` until the server closes it (EOF or reset); returns when, after `since`.
fn watch_close(mut s: TcpStream, since: Instant) -> JoinHandle<Duration> {
    tokio::spawn(async move {
        // The server's own SETTINGS frame may come first.
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    })
}

/// When each watched connection was closed, failing if one is still open at `deadline`.
async fn closed_after(watchers: Vec<JoinHandle<Duration>>, deadline: Instant) -> Vec<Duration> {
    let mut out = Vec::new();
    for (i, w) in watchers.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, w).await {
            Ok(elapsed) => out.push(elapsed.unwrap()),
            Err(_) => panic!(
                "raw connection {i} is still open at the deadline ({} closed before it)",
                out.len()
            ),
        }
    }
    out
}

/// GetId through a new connection, retried until `within` is over.
async fn get_id_within(cluster: &Cluster, within: Duration) {
    let c = cluster.client_for(1).with_deadline(within);
    if let Err(e) = c.get_id("").await {
        panic!("GetId failed for {within:?}: {e}\n{}", cluster.log_tails());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_past_the_cap_are_refused_and_the_rest_closed_at_the_deadline() {
    const CAP: usize = 20;
    const EXTRA: usize = 10;
    const PREFACE: Duration = Duration::from_millis(2000);
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("max_connections", CAP)
        .set("connection_preface_timeout_ms", PREFACE.as_millis() as u64)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let addr = cluster.node(1).addr.clone();
    // Connected before the flood: an established client is served while the listener is full.
    let held = cluster.client_for(1);
    let before = held.get_id("").await.unwrap().id;

    let opened = Instant::now();
    let mut watchers = Vec::new();
    for _ in 0..CAP + EXTRA {
        match TcpStream::connect(&addr).await {
            Ok(s) => watchers.push(watch_close(s, opened)),
            // The reset came before connect() looked: refused just as well.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                watchers.push(tokio::spawn(async move { opened.elapsed() }))
            }
            Err(e) => panic!("connecting: {e}"),
        }
    }
    let during = tokio::time::timeout(Duration::from_secs(5), held.get_id(""))
        .await
        .expect("GetId on an open connection got no answer while the listener was full")
        .unwrap();
    assert!(during.id > before);

    let closed = closed_after(watchers, opened + PREFACE + Duration::from_secs(8)).await;
    let refused = closed.iter().filter(|d| **d < PREFACE / 2).count();
    eprintln!("closed after: {closed:?}");
    // The held client has a place too; the status calls of wait_for_primary may still be
    // letting go of theirs.
    assert!(
        (EXTRA..=EXTRA + 4).contains(&refused),
        "{refused} of {} connections closed at once, expected about {EXTRA}: {closed:?}",
        CAP + EXTRA
    );
    for d in closed.iter().filter(|d| **d >= PREFACE / 2) {
        assert!(
            *d >= PREFACE - Duration::from_millis(100),
            "a connection under the cap was closed before its deadline: {closed:?}"
        );
    }
    // They are gone: new connections are served.
    get_id_within(&cluster, Duration::from_secs(10)).await;
    assert!(
        cluster.log(1).contains("max_connections"),
        "no warning about refused connections\n{}",
        cluster.log_tails()
    );
}

/// User and system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64
}

/// Lowers the open-file limit of a running process we started (same user: no privilege).
fn set_nofile(pid: u32, limit: u64) {
    let rl = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: limit as libc::rlim_t,
    };
    // Safety: plain syscall on a child of ours; both pointers are valid or null.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &rl,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_a_node_warns_does_not_spin_and_recovers() {
    const SPARE: u64 = 16;
    // Raw connections hold their descriptors for the whole test.
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("connection_preface_timeout_ms", 120_000)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    cluster.client_for(1).get_id("").await.unwrap();
    let pid = cluster.node(1).pid().unwrap();
    let addr = cluster.node(1).addr.clone();
    set_nofile(pid, open_fds(pid) + SPARE);

    // The kernel completes these handshakes itself; the node runs out of descriptors taking
    // them from the backlog.
    let mut raw = Vec::new();
    for _ in 0..SPARE + 40 {
        raw.push(TcpStream::connect(&addr).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let warned = |log: &str| {
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("accept failed"))
    };
    while !warned(&cluster.log(1)) {
        assert!(
            Instant::now() < deadline,
            "no warning about failing accepts\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Still out of descriptors: the accept loop must be pausing, not retrying flat out.
    let window = Duration::from_secs(2);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(window).await;
    let (spent, elapsed) = (cpu_ticks(pid) - c0, t0.elapsed());
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = spent as f64 / ticks_per_s / elapsed.as_secs_f64();
    eprintln!("cpu share while out of descriptors: {:.1} %", share * 100.0);
    assert!(
        share < 0.25,
        "the node used {:.0} % of a core while out of descriptors",
        share * 100.0
    );
    let log = cluster.log(1);
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("accept failed"))
        .count();
    assert!(
        warnings <= 6,
        "accept warnings are not rate-limited: {warnings} lines"
    );

    drop(raw);
    get_id_within(&cluster, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_at_the_deadline() {
    const PREFACE: Duration = Duration::from_millis(1000);
    let dir = tempfile::tempdir().unwrap();
    testkit::gen_certs(&sibling_binary(SERVER, "client"), dir.path(), 1).unwrap();
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .tls(&dir.path().join("certs"), false)
        .set("connection_preface_timeout_ms", PREFACE.as_millis() as u64)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let addr = cluster.node(1).addr.clone();

    let opened = Instant::now();
    // Silent from the start: closed by the listener's own deadline.
    let silent = watch_close(TcpStream::connect(&addr).await.unwrap(), opened);
    // The start of a ClientHello record announcing 512 bytes, then nothing: more than the
    // listener's preface count, so only the TLS handshake timeout can close it.
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
    hello.resize(64, 0);
    stalled.write_all(&hello).await.unwrap();
    let stalled = watch_close(stalled, opened);

    let closed = closed_after(
        vec![silent, stalled],
        opened + PREFACE + Duration::from_secs(8),
    )
    .await;
    for d in &closed {
        assert!(
            *d >= PREFACE - Duration::from_millis(100),
            "closed before the deadline: {closed:?}"
        );
    }
    get_id_within(&cluster, Duration::from_secs(10)).await;
}
