//! The status page at `/` in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, plain http on loopback) against a live 3-node cluster under load, the page
//! served by node 1. The page must name the primary that Cluster.Status names, show a non-zero
//! ids/s rate, and mark a killed node unreachable within seconds. It leaves a screenshot in
//! `target/status-page.png` (`$CARGO_TARGET_DIR/status-page.png`), and with
//! SEQUENCER_UPDATE_SCREENSHOT=1 also in `docs/status-page.png`.
//!
//! Needs `chromium` and `chromedriver` on PATH (Debian: `apt-get install chromium
//! chromium-driver`) and fails saying so when they are missing; SEQUENCER_SKIP_BROWSER=1 skips
//! it instead. The page's hooks it reads are listed at the top of
//! `server/src/http/assets/app.js`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use fantoccini::wd::Capabilities;
use fantoccini::{Client as Browser, ClientBuilder};
use futures::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use sequencer_client::Identity;
use serde_json::{json, Value};
use testkit::Cluster;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_server");

/// The node whose HTTP listener serves the page under test.
const SERVING: u64 = 1;

/// How often the test looks at the page again while it waits for something.
const POLL: Duration = Duration::from_millis(100);

/// The longest the whole browser part may take before the test gives up.
const WHOLE_TEST: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_follows_the_live_cluster() {
    if std::env::var_os("SEQUENCER_SKIP_BROWSER").is_some_and(|v| v == "1") {
        println!("SEQUENCER_SKIP_BROWSER=1: the status page is not checked in a browser");
        return;
    }
    let tools = match Tools::find() {
        Ok(tools) => tools,
        Err(missing) => panic!(
            "the status page test needs {missing} on PATH: apt-get install chromium \
             chromium-driver (or set SEQUENCER_SKIP_BROWSER=1 to skip this test)"
        ),
    };
    let scratch = tempfile::Builder::new()
        .prefix("seqpage")
        .tempdir()
        .unwrap();

    let mut cluster = Cluster::builder(SERVER).start().unwrap();
    cluster.wait_for_primary().await.unwrap();

    let mut driver = Chromedriver::start(&tools.chromedriver, scratch.path()).unwrap();
    let started = Instant::now();
    driver.wait_ready(Duration::from_secs(20)).await.unwrap();
    println!(
        "chromedriver answered /status after {:?}",
        started.elapsed()
    );
    let browser = match driver.session(&tools.chromium, scratch.path()).await {
        Ok(b) => b,
        Err(e) => panic!("{e:#}\n--- chromedriver's output ---\n{}", driver.output()),
    };

    let load = Load::start(&cluster).await;
    let outcome = AssertUnwindSafe(timeout(WHOLE_TEST, check_page(&mut cluster, &browser)))
        .catch_unwind()
        .await;
    let (ids, messages, errors) = load.stop().await;
    println!("load: {ids} ids and {messages} messages taken, {errors} calls failed");
    // Closing the session ends the browser; the guard then stops chromedriver by its pid.
    if timeout(Duration::from_secs(10), browser.close())
        .await
        .is_err()
    {
        println!("the browser session did not close within 10 s");
    }
    drop(driver);

    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(_)) => panic!(
            "the status page test did not finish within {WHOLE_TEST:?}\n{}",
            cluster.log_tails()
        ),
        Ok(Ok(Err(e))) => panic!("{e:#}\n{}", cluster.log_tails()),
        Ok(Ok(Ok(()))) => {}
    }
}

/// What the test does with the browser once the cluster, the load and the session are up.
async fn check_page(cluster: &mut Cluster, browser: &Browser) -> anyhow::Result<()> {
    let http_addr = cluster.node(SERVING).http_addr.clone();
    let started = Instant::now();
    wait_for(
        "node 1's HTTP listener to serve /",
        Duration::from_secs(15),
        || async {
            Ok(http_get(&http_addr, "/")
                .await
                .filter(|(status, _)| *status == 200))
        },
    )
    .await?;

    let url = format!("http://{http_addr}/");
    browser
        .goto(&url)
        .await
        .context("opening the status page")?;
    let first = wait_for(
        "the page's first refresh",
        Duration::from_secs(15),
        || async {
            Ok(number(browser, "body", "data-updated")
                .await?
                .filter(|n| *n >= 1.0))
        },
    )
    .await?;
    println!(
        "{url}: first refresh after {:?} (data-updated={first})",
        started.elapsed()
    );

    // The primary the page names is the one node 1 names over gRPC (asked again while an
    // election moves it between the two looks).
    let status = cluster.client_for(SERVING);
    let primary = wait_for(
        "the page to name the primary Cluster.Status names",
        Duration::from_secs(15),
        || async {
            let shown = number(browser, "#primary", "data-primary").await?;
            let text = text(browser, "#primary").await?;
            let grpc = u64::from(status.status().await.context("Cluster.Status")?.primary);
            println!("primary: page shows {shown:?} ({text:?}), Cluster.Status says {grpc}");
            Ok(match shown {
                Some(p) if grpc != 0 && p == grpc as f64 && text == grpc.to_string() => Some(grpc),
                _ => None,
            })
        },
    )
    .await?;

    let started = Instant::now();
    let rate = wait_for("a non-zero ids/s rate", Duration::from_secs(20), || async {
        Ok(number(browser, "#ids-rate", "data-rate")
            .await?
            .filter(|r| *r > 0.0))
    })
    .await?;
    println!(
        "ids/s: {rate:.1} after {:?} ({:?})",
        started.elapsed(),
        text(browser, "#ids-rate").await?
    );

    // Ten seconds of rates in the charts before anything changes.
    let now = number(browser, "body", "data-updated")
        .await?
        .unwrap_or(0.0);
    wait_for("ten more refreshes", Duration::from_secs(25), || async {
        Ok(number(browser, "body", "data-updated")
            .await?
            .filter(|n| *n >= now + 10.0))
    })
    .await?;

    // Kill a follower that does not serve the page; its row must turn unreachable.
    let victim = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != SERVING && id != primary)
        .max()
        .context("no follower besides the serving node")?;
    let row = format!("tr[data-node-id=\"{victim}\"]");
    wait_for(
        "node's row to show it reachable",
        Duration::from_secs(10),
        || async {
            Ok(attr(browser, &row, "data-reachable")
                .await?
                .filter(|r| r == "true"))
        },
    )
    .await?;
    cluster.kill(victim);
    let killed = Instant::now();
    wait_for(
        &format!("node {victim}'s row to turn unreachable"),
        Duration::from_secs(10),
        || async {
            Ok(attr(browser, &row, "data-reachable")
                .await?
                .filter(|r| r == "false"))
        },
    )
    .await?;
    println!(
        "node {victim} killed: its row showed data-reachable=\"false\" after {:?}",
        killed.elapsed()
    );

    // Two more refreshes, so the screenshot shows the page settled after the kill.
    let now = number(browser, "body", "data-updated")
        .await?
        .unwrap_or(0.0);
    wait_for("two more refreshes", Duration::from_secs(10), || async {
        Ok(number(browser, "body", "data-updated")
            .await?
            .filter(|n| *n >= now + 2.0))
    })
    .await?;
    let banner: Value = browser
        .execute("return document.getElementById('banner').hidden;", vec![])
        .await?;
    if banner != json!(true) {
        bail!(
            "node {SERVING} answers, yet the page shows its banner: {:?}",
            text(browser, "#banner").await?
        );
    }
    println!(
        "after the kill: ids {:?}, messages {:?}, primary {:?}",
        text(browser, "#ids-rate").await?,
        text(browser, "#msgs-rate").await?,
        text(browser, "#primary").await?
    );
    save_screenshot(browser).await
}

/// Writes the page's screenshot into the target dir, and into docs/ when asked to.
async fn save_screenshot(browser: &Browser) -> anyhow::Result<()> {
    let png = browser.screenshot().await.context("taking a screenshot")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the server crate sits in the workspace")?;
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    std::fs::create_dir_all(&target)?;
    let path = target.join("status-page.png");
    std::fs::write(&path, &png).with_context(|| format!("writing {}", path.display()))?;
    println!("screenshot: {} ({} bytes)", path.display(), png.len());
    if std::env::var_os("SEQUENCER_UPDATE_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = workspace.join("docs");
        std::fs::create_dir_all(&docs)?;
        std::fs::copy(&path, docs.join("status-page.png"))?;
        println!(
            "screenshot copied to {}",
            docs.join("status-page.png").display()
        );
    }
    Ok(())
}

/// Polls `probe` every [`POLL`] until it gives a value, for up to `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = match timeout(within, probe()).await {
            Ok(Ok(Some(v))) => return Ok(v),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(anyhow::anyhow!("a look took longer than {within:?}")),
        };
        if Instant::now() >= deadline {
            let why = last
                .map(|e| format!(": last error {e:#}"))
                .unwrap_or_default();
            bail!("waited {within:?} for {what} in vain{why}");
        }
        sleep(POLL).await;
    }
}

/// Attribute `name` of the first element matching `css`, or None (no such element or
/// attribute).
async fn attr(browser: &Browser, css: &str, name: &str) -> anyhow::Result<Option<String>> {
    let script = "const e = document.querySelector(arguments[0]); \
                  return e ? e.getAttribute(arguments[1]) : null;";
    let v = browser
        .execute(script, vec![json!(css), json!(name)])
        .await
        .with_context(|| format!("reading {css} [{name}]"))?;
    Ok(v.as_str().map(str::to_string))
}

/// Attribute `name` of `css` as a number, or None.
async fn number(browser: &Browser, css: &str, name: &str) -> anyhow::Result<Option<f64>> {
    Ok(attr(browser, css, name)
        .await?
        .and_then(|s| s.trim().parse::<f64>().ok()))
}

/// The text of the first element matching `css` ("" when there is none).
async fn text(browser: &Browser, css: &str) -> anyhow::Result<String> {
    let script = "const e = document.querySelector(arguments[0]); \
                  return e ? e.textContent.trim() : '';";
    let v = browser.execute(script, vec![json!(css)]).await?;
    Ok(v.as_str().unwrap_or_default().to_string())
}

/// One GET on loopback: (status, body), or None when nothing answered.
async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let answer = timeout(Duration::from_secs(2), testkit::http::get(addr, path)).await;
    answer.ok()?.ok().map(|a| (a.status, a.text()))
}

/// The browser and its driver, found on PATH.
struct Tools {
    chromium: PathBuf,
    chromedriver: PathBuf,
}

impl Tools {
    /// Both binaries, or the names of those missing.
    fn find() -> Result<Tools, String> {
        let chromium = ["chromium", "chromium-browser"]
            .into_iter()
            .find_map(on_path);
        let chromedriver = on_path("chromedriver");
        match (chromium, chromedriver) {
            (Some(chromium), Some(chromedriver)) => Ok(Tools {
                chromium,
                chromedriver,
            }),
            (None, Some(_)) => Err("`chromium`".into()),
            (Some(_), None) => Err("`chromedriver`".into()),
            (None, None) => Err("`chromium` and `chromedriver`".into()),
        }
    }
}

/// The executable `name` in a directory of PATH, as `which` finds it.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A chromedriver process this test started. Dropping it kills, by their pids, any browser
/// it still runs (a test that failed before closing its session) and then chromedriver
/// itself, and reaps it.
struct Chromedriver {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Chromedriver {
    /// `chromedriver --port=P` on a free port, its output in `dir`.
    fn start(bin: &Path, dir: &Path) -> anyhow::Result<Chromedriver> {
        let port = testkit::free_ports(1)?[0];
        let log = dir.join("chromedriver.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Chromedriver { child, port, log })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What chromedriver printed so far.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its `/status` says it is ready; fails at once if it exited.
    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let addr = format!("127.0.0.1:{}", self.port);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("chromedriver exited ({status}):\n{}", self.output());
            }
            if let Some((200, body)) = http_get(&addr, "/status").await {
                let ready = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["value"]["ready"].as_bool());
                if ready == Some(true) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "chromedriver was not ready within {within:?}:\n{}",
                    self.output()
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new session of headless `chromium`, with a fresh profile under `dir`.
    async fn session(&self, chromium: &Path, dir: &Path) -> anyhow::Result<Browser> {
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile)?;
        let mut caps = Capabilities::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    format!("--user-data-dir={}", profile.display()),
                    "--window-size=1280,1000",
                ],
            }),
        );
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url())
            .await
            .context("opening a WebDriver session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        for pid in children_of(self.child.id()) {
            // Safety: a process chromedriver started for this test, signalled by its pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the processes whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let pid: libc::pid_t = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid ...: comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

/// Background load while the page is watched: ids through a client that follows the
/// primary, ids served by node 1 itself (so its latency chart has data), and messages to a
/// group. Each task is aborted and awaited by [`Load::stop`].
struct Load {
    tasks: Vec<JoinHandle<()>>,
    ids: Arc<AtomicU64>,
    messages: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Load {
    async fn start(cluster: &Cluster) -> Load {
        let ids = Arc::new(AtomicU64::new(0));
        let messages = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let clients = [cluster.client(), cluster.client_for(SERVING)];
        for client in clients {
            let client = client.with_deadline(Duration::from_secs(2));
            let (ids, errors) = (ids.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    match client.get_id("page").await {
                        Ok(_) => {
                            ids.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        let client = cluster.client().with_deadline(Duration::from_secs(2));
        let (count, errs) = (messages.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let me = loop {
                match client.register("page-load").await {
                    Ok(r) => break Identity::from(&r),
                    Err(_) => {
                        errs.fetch_add(1, Ordering::Relaxed);
                        sleep(Duration::from_millis(200)).await;
                    }
                }
            };
            let _alive = client.keep_alive(&me);
            while client.join(&me, "page").await.is_err() {
                errs.fetch_add(1, Ordering::Relaxed);
                sleep(Duration::from_millis(200)).await;
            }
            let mut seq = 1;
            loop {
                let payload = format!("message {seq}").into_bytes();
                if client.send(&me, "page", seq, payload).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    // Messages at a gentler pace than ids: tens a second.
                    sleep(Duration::from_millis(20)).await;
                } else {
                    // The same sender_seq again: a retry is answered, not repeated.
                    errs.fetch_add(1, Ordering::Relaxed);
                    sleep(Duration::from_millis(200)).await;
                }
            }
        }));
        Load {
            tasks,
            ids,
            messages,
            errors,
        }
    }

    /// Stops every task; returns (ids taken, messages sent, failed calls).
    async fn stop(self) -> (u64, u64, u64) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
        (
            self.ids.load(Ordering::Relaxed),
            self.messages.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}
