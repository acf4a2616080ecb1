//! Membership changes under load: the cluster grows and shrinks, replaces a lost node, takes
//! back a removed id with an empty disk, loses its primary in the middle of a change, catches
//! up a learner that was cut off, and restarts every node in turn, while the chaos workload
//! (GetId and Send, recorded in a history) runs. Each test checks the history with the chaos
//! checker (no id twice, ids in real-time order, no message lost, invented or reordered) and
//! the membership it ends with, as every member sees it: ListMembers through each of them, and
//! the membership each has applied (its Status).
//!
//! Real node processes; every wait polls with a deadline. The gaps printed are figures for a
//! reader, never asserted: test machines are shared and noisy.

use std::io::Write;
use std::time::{Duration, Instant};

use testkit::checker::check;
use testkit::history::{History, Outcome};
use testkit::members::{Admin, Roles};
use testkit::workload::Workload;
use testkit::Cluster;

const SERVER: &str = env!("CARGO_BIN_EXE_server");
const TOKEN: &str = "a-test-admin-token-0123";

/// How long the load runs between two steps.
const PHASE: Duration = Duration::from_millis(1000);

/// One test at a time: on 2 cores two clusters of 5 under load would starve each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lets the workload run.
async fn run_for(d: Duration) {
    tokio::time::sleep(d).await;
}

/// Three nodes with an admin token, each announced as a started member. They snapshot every
/// 2000 entries (not 10 000): a node that joins a loaded cluster starts from a snapshot, where
/// replaying the whole log would race a log that grows almost as fast.
async fn cluster(proxies: bool) -> Cluster {
    let mut b = Cluster::builder(SERVER)
        .set("admin_token", TOKEN)
        .set("snapshot_logs", 2000);
    if proxies {
        b = b.with_proxies();
    }
    let mut c = b.start().unwrap();
    c.wait_for_primary().await.unwrap();
    c.wait_all_started().await.unwrap();
    c
}

/// Prints one line past the test harness's capture.
fn say(line: String) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Checks the history and the final state (primary agreed among `members`, every id handed
/// out at or below what it has allocated), prints the summary line, and fails the test on any
/// safety violation.
async fn verdict(name: &str, cluster: &mut Cluster, members: &[u64], h: &History) {
    let report = check(h);
    let line = report.line(name);
    if let Ok(dir) = std::env::var("CHAOS_LOG_DIR") {
        for id in cluster.ids() {
            let _ = std::fs::write(format!("{dir}/{name}-node-{id}.log"), cluster.log(id));
        }
    }
    say(format!(
        "{line}\n  per fault (ms): recovery {:?}, longest gap {:?}; refusals by code: {:?}",
        report.recovery_ms, report.windows_ms, report.failed_codes
    ));
    assert!(report.is_safe(), "{line}\n{}", report.details.join("\n"));
    assert!(report.ok > 0, "{line}: nothing succeeded");
    let primary = cluster.wait_for_primary_among(members).await.unwrap();
    let highest = h.highest_id();
    let current = cluster.client_for(primary).current_id("").await.unwrap().id;
    assert!(
        current >= highest,
        "{line}: id {highest} was handed out above the final state {current}"
    );
}

/// The longest stretch within `from..=to` without an acknowledged operation (an id or a
/// message): from `from` to the first, between two, and from the last to `to`.
fn longest_gap(h: &History, from: Instant, to: Instant) -> Duration {
    let ids = h
        .ids
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.complete);
    let sends = h
        .sends
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .map(|o| o.complete);
    let mut done: Vec<Instant> = ids
        .chain(sends)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    done.sort();
    let mut prev = from;
    let mut worst = Duration::ZERO;
    for t in done {
        worst = worst.max(t - prev);
        prev = t;
    }
    worst.max(to - prev)
}

/// Operations acknowledged within `from..=to`.
fn acknowledged(h: &History, from: Instant, to: Instant) -> usize {
    let within = |t: &Instant| *t >= from && *t <= to;
    let ids = h
        .ids
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && within(&o.complete))
        .count();
    let sends = h
        .sends
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && within(&o.complete))
        .count();
    ids + sends
}

/// Starts node `id` with `--join` through `via`'s client address, and waits until it is a
/// voter beside `voters` everywhere and has caught up. Returns the voters.
async fn join(c: &mut Cluster, id: u64, via: u64, voters: &[u64]) -> Vec<u64> {
    let addr = c.node(via).addr.clone();
    c.start_node_with(id, &["--join", &addr]).unwrap();
    let mut now: Vec<u64> = voters.to_vec();
    now.push(id);
    c.wait_members(&now, &[]).await.unwrap();
    c.wait_caught_up(via, id).await.unwrap();
    now
}

/// SIGTERM node `id` and waits until it exited cleanly.
async fn stop(c: &mut Cluster, id: u64) {
    c.signal(id, libc::SIGTERM).unwrap();
    let status = c.wait_exit(id, Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "node {id} stopped with {status}");
}

/// Every id of `all` but `but`.
fn without(all: &[u64], but: u64) -> Vec<u64> {
    all.iter().copied().filter(|id| *id != but).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grows_from_3_to_5_and_shrinks_back_to_3_under_load() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(false).await;
    // In the config from the start, so that the workload's clients know every node.
    let added = c.add_nodes(2).unwrap();
    let mut w = Workload::start(&c, 1, 3).await;
    run_for(PHASE).await;

    // 3 -> 4 -> 5, one join after the other, each through another node.
    let mut voters = vec![1, 2, 3];
    for (i, &id) in added.iter().enumerate() {
        w.fault();
        voters = join(&mut c, id, i as u64 + 1, &voters).await;
        run_for(PHASE).await;
    }
    assert_eq!(voters, vec![1, 2, 3, 4, 5]);

    // 5 -> 4 -> 3: two followers of the first three, asked of a joined node. (Removing the
    // primary hands it over first, which fails often with 5 voters: see
    // the_primary_of_5_voters_is_handed_over_where_asked.)
    let p = c.wait_for_primary().await.unwrap();
    let followers = without(&[1, 2, 3], p);
    let removed = [followers[0], followers[1]];
    let ask = 5;
    for id in removed {
        w.fault();
        let res = c.admin(ask).remove(id, false).await;
        assert!(res.is_ok(), "removing node {id}: {res:?}");
        voters.retain(|v| *v != id);
        c.wait_members(&voters, &[]).await.unwrap();
        run_for(PHASE).await;
    }
    for id in removed {
        stop(&mut c, id).await;
    }
    let list = c.wait_members(&voters, &[]).await.unwrap();
    assert_eq!(voters.len(), 3, "{list:?}");
    run_for(PHASE).await;

    let h = w.finish().await;
    verdict("grow-3-5-shrink-3", &mut c, &voters, &h).await;
}

/// With 5 voters, the hand-over a TransferPrimary asks for and the one a RemoveMember of the
/// primary starts with both go to the voter asked for (or picked), under load. Fails most
/// runs: the target's campaign is refused by the other followers ("leader lease has not yet
/// expire": they heard the primary within election_timeout_max), the old primary steps down
/// having granted its vote, and the next election, once the lease has run out, is most often
/// won by the old primary again; the hand-over gives up after 4 leases (2 s), with writes
/// held all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_primary_of_5_voters_is_handed_over_where_asked() {
    let _one = SERIAL.lock().await;
    let mut c = Cluster::builder(SERVER)
        .nodes(5)
        .set("admin_token", TOKEN)
        .start()
        .unwrap();
    c.wait_for_primary().await.unwrap();
    c.wait_all_started().await.unwrap();
    let mut w = Workload::start(&c, 1, 3).await;
    run_for(PHASE).await;

    let mut failed = Vec::new();
    // Each time to the voter with the highest id but the primary's.
    for _ in 0..3 {
        let p = c.wait_for_primary().await.unwrap();
        let to = if p == 5 { 4 } else { 5 };
        w.fault();
        let asked = Instant::now();
        let res = c.admin(p).transfer(to).await;
        let took = asked.elapsed();
        let now = c.wait_for_primary().await.unwrap();
        let line = format!(
            "hand-over {p} -> {to}: {:?} after {} ms; primary now {now}",
            res.as_ref()
                .map(|r| r.to)
                .map_err(|e| e.message().to_string()),
            took.as_millis()
        );
        say(line.clone());
        if !matches!(&res, Ok(r) if u64::from(r.to) == to) || now != to {
            failed.push(line);
        }
        run_for(PHASE / 2).await;
    }
    // Removing the primary: it hands over first, and the removal goes on at the new primary.
    let p = c.wait_for_primary().await.unwrap();
    let ask = if p == 1 { 2 } else { 1 };
    w.fault();
    let res = c.admin(ask).remove(p, false).await;
    let mut voters: Vec<u64> = c.ids();
    match &res {
        Ok(_) => {
            voters.retain(|v| *v != p);
            c.wait_members(&voters, &[]).await.unwrap();
            stop(&mut c, p).await;
        }
        Err(e) => failed.push(format!("removing the primary {p}: {e:?}")),
    }
    say(format!(
        "removing the primary {p}: {:?}",
        res.map(|l| l.primary)
    ));
    run_for(PHASE).await;
    let h = w.finish().await;
    verdict("hand-over-5", &mut c, &voters, &h).await;
    assert!(
        failed.is_empty(),
        "with 5 voters the primary was not handed over where asked:\n{}",
        failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_is_replaced_and_a_removed_id_comes_back_with_an_empty_disk() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(false).await;
    let fresh = c.add_nodes(1).unwrap()[0];
    let mut w = Workload::start(&c, 1, 3).await;
    run_for(PHASE).await;

    // A follower dies for good: it is removed, and a fresh node under a new id replaces it.
    let p = c.wait_for_primary().await.unwrap();
    let dead = without(&[1, 2, 3], p)[0];
    w.fault();
    c.kill(dead);
    let res = c.admin(p).remove(dead, false).await;
    assert!(res.is_ok(), "removing the dead node {dead}: {res:?}");
    let mut voters = without(&[1, 2, 3], dead);
    c.wait_members(&voters, &[]).await.unwrap();
    run_for(PHASE).await;
    w.fault();
    voters = join(&mut c, fresh, p, &voters).await;
    run_for(PHASE).await;

    // A removed id comes back with an empty disk: removed while it runs, stopped, wiped, and
    // started with --join, asked of the fresh node.
    let p = c.wait_for_primary_among(&voters).await.unwrap();
    let back = voters
        .iter()
        .copied()
        .find(|id| *id != p && *id != fresh)
        .unwrap();
    w.fault();
    let res = c.admin(fresh).remove(back, false).await;
    assert!(res.is_ok(), "removing node {back}: {res:?}");
    voters.retain(|v| *v != back);
    c.wait_members(&voters, &[]).await.unwrap();
    stop(&mut c, back).await;
    c.wipe(back).unwrap();
    run_for(PHASE).await;
    w.fault();
    voters = join(&mut c, back, fresh, &voters).await;
    voters.sort();
    run_for(PHASE).await;

    // It holds everything the cluster handed out before it came back, and serves.
    let h = w.finish().await;
    let mut expected = without(&[1, 2, 3], dead);
    expected.push(fresh);
    expected.sort();
    assert_eq!(voters, expected);
    let list = c.wait_members(&voters, &[]).await.unwrap();
    assert!(
        !list.members.iter().any(|m| u64::from(m.id) == dead),
        "{list:?}"
    );
    let on_back = c.client_for(back).current_id("").await.unwrap().id;
    assert!(
        on_back >= h.highest_id(),
        "node {back} applied ids up to {on_back}, below {} handed out",
        h.highest_id()
    );
    verdict("replace-and-readd", &mut c, &voters, &h).await;
}

/// When the primary is killed during a membership change.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// This long after the call was sent.
    After(Duration),
    /// As soon as the primary lists the change as half done (joint).
    WhenPrimaryJoint,
    /// As soon as a follower has applied the new voters: it holds the joint entry (or more).
    WhenFollowerHasIt,
}

/// The change the primary is killed in.
#[derive(Debug, Clone, Copy)]
enum Change {
    Promote(u64),
    Remove(u64),
}

impl Change {
    /// The roles before and after, with `base` the voters that stay.
    fn outcomes(self, base: &[u64]) -> (Roles, Roles) {
        match self {
            Change::Promote(id) => {
                let mut with = base.to_vec();
                with.push(id);
                (Roles::new(base, &[id]), Roles::new(&with, &[]))
            }
            Change::Remove(id) => {
                let mut with = base.to_vec();
                with.push(id);
                (Roles::new(&with, &[]), Roles::new(base, &[]))
            }
        }
    }

    /// The node the change is about.
    fn node(self) -> u64 {
        match self {
            Change::Promote(id) | Change::Remove(id) => id,
        }
    }

    async fn send(self, mut admin: Admin) -> Result<(), tonic::Status> {
        match self {
            Change::Promote(id) => admin.promote(id).await.map(|_| ()),
            Change::Remove(id) => admin.remove(id, false).await.map(|_| ()),
        }
    }
}

/// What one kill in the middle of a change came to.
struct Attempt {
    change: Change,
    kill: Kill,
    primary: u64,
    /// From sending the change to the SIGKILL.
    killed_after: Duration,
    /// Whether the change was answered before the kill, and how.
    answer: Result<(), String>,
    /// Whether a survivor applied a joint membership after the change was sent.
    survivors_saw_joint: bool,
    /// Whether a survivor listed the change as half done after the kill.
    half_done_after_kill: bool,
    /// What the survivors agreed on: the change "done" or "undone".
    settled: &'static str,
    /// From the kill until the survivors agreed on one membership.
    settled_in: Duration,
}

impl Attempt {
    fn line(&self) -> String {
        format!(
            "{:?}, primary {} killed {:?} after it was sent ({:?}); answered: {:?}; a survivor \
             applied the joint membership: {}; listed half done after the kill: {}; settled \
             {} within {} ms of the kill",
            self.change,
            self.primary,
            self.killed_after,
            self.kill,
            self.answer,
            self.survivors_saw_joint,
            self.half_done_after_kill,
            self.settled,
            self.settled_in.as_millis()
        )
    }
}

/// How many joint memberships node `id` has applied, by its log.
fn joint_lines(c: &Cluster, id: u64) -> usize {
    c.log(id)
        .lines()
        .filter(|l| {
            l.contains("sequencer_server::membership::book: membership") && l.contains("joint=true")
        })
        .count()
}

/// Makes node `id` a caught-up learner again: stopped, wiped, added as a learner only, and
/// started plainly (a fresh learner waits for the primary to catch it up).
async fn learner_again(c: &mut Cluster, id: u64, voters: &[u64]) {
    if c.running().contains(&id) {
        stop(c, id).await;
    }
    if c.data_dir(id).exists() {
        c.wipe(id).unwrap();
    }
    let (addr, peer) = (c.node(id).addr.clone(), c.member_peer_addr(id).unwrap());
    let res = c.admin(voters[0]).add(id, &addr, &peer, true).await;
    assert!(res.is_ok(), "adding node {id} as a learner: {res:?}");
    c.start_node(id).unwrap();
    c.wait_members(voters, &[id]).await.unwrap();
    c.wait_caught_up(voters[0], id).await.unwrap();
}

/// Sends `change` to the primary, SIGKILLs it as `kill` says, waits until the survivors agree
/// on one membership, restarts it, and waits until all agree again. An error says how the
/// survivors did not agree (the old primary is then left down).
async fn kill_mid_change(
    c: &mut Cluster,
    w: &mut Workload,
    change: Change,
    kill: Kill,
    base: &[u64],
) -> Result<Attempt, String> {
    let all = c.running();
    let p = c.wait_for_primary().await.unwrap();
    let survivors = without(&all, p);
    let joint_before: Vec<usize> = survivors.iter().map(|id| joint_lines(c, *id)).collect();
    let (old, new) = change.outcomes(base);
    let follower = *survivors.iter().find(|id| base.contains(id)).unwrap();
    let mut watch = c.admin(p).with_timeout(Duration::from_millis(500));
    let admin = c.admin(p).with_timeout(Duration::from_secs(10));

    w.fault();
    let sent = Instant::now();
    let call = tokio::spawn(change.send(admin));
    match kill {
        Kill::After(d) => tokio::time::sleep(d).await,
        Kill::WhenPrimaryJoint => {
            while sent.elapsed() < Duration::from_secs(3) && !call.is_finished() {
                if matches!(watch.list().await, Ok(l) if l.changing) {
                    break;
                }
            }
        }
        Kill::WhenFollowerHasIt => {
            let status = c
                .client_for(follower)
                .with_deadline(Duration::from_millis(500));
            while sent.elapsed() < Duration::from_secs(3) && !call.is_finished() {
                if let Ok(s) = status.status().await {
                    let voters: Vec<u64> = s
                        .nodes
                        .iter()
                        .filter(|n| n.role == "voter")
                        .map(|n| u64::from(n.id))
                        .collect();
                    if Roles::new(&voters, &[]).voters == new.voters {
                        break;
                    }
                }
            }
        }
    }
    c.signal(p, libc::SIGKILL).unwrap();
    let killed_after = sent.elapsed();
    let killed_at = Instant::now();
    let answer = call
        .await
        .unwrap()
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()));
    c.kill(p);

    // The survivors elect a primary and settle on one membership: the change done or undone.
    // A node being removed is left out: once removed, it never hears of it.
    let changed = change.node();
    let others = match change {
        Change::Remove(id) => without(&survivors, id),
        Change::Promote(_) => survivors.clone(),
    };
    // They agree on a primary, which may be the node being removed while the removal is
    // still undone.
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    loop {
        let mut seen = Vec::new();
        for id in &others {
            let status = c
                .client_for(*id)
                .with_deadline(Duration::from_secs(1))
                .status()
                .await;
            seen.push(status.map(|s| s.primary).unwrap_or(0));
        }
        if seen[0] != 0 && seen.iter().all(|p| *p == seen[0]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no agreed primary among {others:?}: {seen:?}\n{}",
            c.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut half_done_after_kill = false;
    for id in &survivors {
        if let Ok((l, _)) = c.membership_seen_by(*id).await {
            half_done_after_kill |= l.changing;
        }
    }
    let settled = c.wait_settled(&others, Duration::from_secs(10)).await;
    let settled_in = killed_at.elapsed();
    let survivors_saw_joint = survivors
        .iter()
        .zip(&joint_before)
        .any(|(id, before)| joint_lines(c, *id) > *before);
    let settled = match settled {
        Ok(roles) => roles,
        Err(e) => {
            // What an operator would try next: the same change again.
            let again = change.send(c.admin(follower)).await;
            return Err(format!(
                "after the primary {p} was killed {killed_after:?} into {change:?} ({kill:?}; \
                 answered: {answer:?}; a survivor applied a joint membership: \
                 {survivors_saw_joint}), the survivors never settled on one membership \
                 (asked again, {change:?} answers {again:?}): {e}"
            ));
        }
    };
    assert!(
        settled == old || settled == new,
        "{change:?}: the survivors settled on {settled:?}, neither {old:?} nor {new:?}"
    );
    if answer.is_ok() {
        assert_eq!(
            settled, new,
            "{change:?} was acknowledged before the kill, then undone"
        );
    }
    // A node removed is stopped, as an operator would; it is made a learner again next.
    if !settled.voters.contains(&changed) && !settled.learners.contains(&changed) {
        c.kill(changed);
    }

    // The old primary comes back with its disk, and everyone agrees.
    c.start_node(p).unwrap();
    c.wait_for_primary().await.unwrap();
    let again = c
        .wait_settled(&c.running(), Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(
        again, settled,
        "node {p} came back and the membership moved"
    );
    c.wait_caught_up(follower, p).await.unwrap();
    Ok(Attempt {
        change,
        kill,
        primary: p,
        killed_after,
        answer,
        survivors_saw_joint,
        half_done_after_kill,
        settled: if settled == new { "done" } else { "undone" },
        settled_in,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_in_the_middle_of_a_membership_change_leaves_one_membership() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(false).await;
    let four = c.add_nodes(1).unwrap()[0];
    let base = [1, 2, 3];
    let mut w = Workload::start(&c, 1, 3).await;
    learner_again(&mut c, four, &base).await;
    run_for(PHASE).await;

    let ms = Duration::from_millis;
    let kills = [
        Kill::WhenPrimaryJoint,
        Kill::WhenFollowerHasIt,
        Kill::After(ms(0)),
        Kill::After(ms(3)),
        Kill::After(ms(10)),
        Kill::After(ms(30)),
        Kill::WhenFollowerHasIt,
        Kill::WhenPrimaryJoint,
    ];
    let mut attempts = Vec::new();
    let mut unsettled = None;
    for kill in kills {
        // Node 4 is a learner (promote it), a voter (remove it), or gone (a learner again).
        let roles = c
            .wait_settled(&c.running(), Duration::from_secs(20))
            .await
            .unwrap();
        let change = if roles.learners.contains(&four) {
            Change::Promote(four)
        } else if roles.voters.contains(&four) {
            // The change is made by another primary than the node it removes.
            let p = c.wait_for_primary().await.unwrap();
            if p == four {
                let moved = c.admin(four).transfer(base[0]).await;
                assert!(moved.is_ok(), "handing the primary over: {moved:?}");
                c.wait_for_primary().await.unwrap();
            }
            Change::Remove(four)
        } else {
            learner_again(&mut c, four, &base).await;
            Change::Promote(four)
        };
        match kill_mid_change(&mut c, &mut w, change, kill, &base).await {
            Ok(attempt) => {
                say(format!("kill-mid-change: {}", attempt.line()));
                attempts.push(attempt);
            }
            Err(stuck) => {
                say(format!("kill-mid-change: {stuck}"));
                unsettled = Some(stuck);
                break;
            }
        }
        run_for(PHASE / 2).await;
    }
    // Whatever the membership came to, the cluster serves: the history is checked either way.
    run_for(PHASE).await;
    let h = w.finish().await;
    let joint = attempts.iter().filter(|a| a.survivors_saw_joint).count();
    say(format!(
        "kill-mid-change: {} kills settled ({joint} after a survivor applied the joint \
         membership, {} listed half done after the kill){}",
        attempts.len(),
        attempts.iter().filter(|a| a.half_done_after_kill).count(),
        if unsettled.is_some() {
            "; then one left the membership half done"
        } else {
            ""
        }
    ));
    let members = c.running();
    verdict("kill-mid-change", &mut c, &members, &h).await;
    if let Some(stuck) = unsettled {
        panic!("{stuck}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_learner_cut_off_catches_up_after_the_heal_and_is_promoted() {
    let _one = SERIAL.lock().await;
    let mut c = cluster(true).await;
    let four = c.add_nodes(1).unwrap()[0];
    let mut w = Workload::start(&c, 1, 3).await;
    run_for(PHASE).await;

    // Node 4 joins cut off from every peer. The running nodes reach it where the membership
    // says, so the AddMember names the proxy in front of it (a `--join` would name its own
    // listener, which bypasses the proxies); it then starts plainly, as a learner that never
    // ran, and waits for the primary.
    c.isolate(four);
    w.fault();
    let cut = Instant::now();
    let (addr, peer) = (c.node(four).addr.clone(), c.member_peer_addr(four).unwrap());
    let admin = c.admin(1);
    let add = tokio::spawn(async move {
        let mut admin = admin;
        admin.add(four, &addr, &peer, false).await
    });
    let list = c.wait_members(&[1, 2, 3], &[four]).await.unwrap();
    // The primary dials it through its proxy, not at its listener.
    let dialed = list.members.iter().find(|m| u64::from(m.id) == four);
    assert_eq!(
        dialed.map(|m| m.peer_addr.as_str()),
        Some(c.member_peer_addr(four).unwrap().as_str())
    );
    assert_ne!(c.member_peer_addr(four).unwrap(), c.node(four).peer_addr);
    c.start_node(four).unwrap();

    // Cut off, it stays a learner that has nothing, and the cluster serves without it.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let p = c.progress(2, four).await.unwrap();
        let (listing, _) = c.membership_seen_by(3).await.unwrap();
        assert_eq!(
            Roles::of_listing(&listing),
            Roles::new(&[1, 2, 3], &[four]),
            "node 4 was promoted while cut off"
        );
        assert_eq!(p.matched, 0, "node 4 got entries while cut off: {p:?}");
        if add.is_finished() {
            panic!(
                "the AddMember answered while node 4 was cut off: {:?}",
                add.await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed = Instant::now();
    c.heal();

    // Healed, it catches up and is promoted: the AddMember answers.
    let added = add.await.unwrap();
    assert!(added.is_ok(), "adding node 4: {added:?}");
    let done = Instant::now();
    c.wait_members(&[1, 2, 3, four], &[]).await.unwrap();
    c.wait_caught_up(1, four).await.unwrap();
    run_for(PHASE).await;
    let h = w.finish().await;
    let served = acknowledged(&h, cut, healed);
    say(format!(
        "learner-partition: cut off {:?}, {served} operations acknowledged meanwhile; \
         promoted {:?} after the heal",
        healed - cut,
        done - healed
    ));
    assert!(
        served > 0,
        "nothing was acknowledged while a learner was cut off"
    );
    let on_four = c.client_for(four).current_id("").await.unwrap().id;
    assert!(on_four >= h.highest_id());
    verdict("learner-partition", &mut c, &[1, 2, 3, four], &h).await;
}

/// One step of a rolling restart.
struct Step {
    node: u64,
    was_primary: bool,
    /// Whether it logged that it handed the primary over, or else why not.
    handed_over: Result<(), String>,
    from: Instant,
    stopped: Instant,
    back: Instant,
}

/// Grows the cluster to `nodes`, then restarts every node in turn (SIGTERM, start, wait until
/// it is a voter again everywhere and has caught up) under load, and prints each step's
/// longest stretch without an acknowledged operation.
async fn rolling_restart(name: &str, nodes: usize, per_node: usize) {
    let _one = SERIAL.lock().await;
    let mut c = cluster(false).await;
    let added = c.add_nodes(nodes - 3).unwrap();
    let mut w = Workload::start(&c, per_node, 3).await;
    let mut voters = vec![1, 2, 3];
    for &id in &added {
        voters = join(&mut c, id, 1, &voters).await;
    }
    c.wait_all_started().await.unwrap();
    run_for(PHASE).await;

    let mut steps = Vec::new();
    for id in c.ids() {
        run_for(PHASE / 2).await;
        let p = c.wait_for_primary().await.unwrap();
        let via = *voters.iter().find(|v| **v != id).unwrap();
        let log_before = c.log(id).len();
        w.fault();
        let from = Instant::now();
        stop(&mut c, id).await;
        let stopped = Instant::now();
        c.start_node(id).unwrap();
        c.wait_members(&voters, &[]).await.unwrap();
        c.wait_caught_up(via, id).await.unwrap();
        let log = c.log(id);
        let this_run = log.get(log_before..).unwrap_or_default();
        let handed_over = if this_run.contains("handed the primary over before stopping") {
            Ok(())
        } else {
            let why = this_run
                .lines()
                .find(|l| l.contains("could not hand the primary over"))
                .and_then(|l| l.split_once("error=").map(|(_, e)| e.to_string()));
            Err(why.unwrap_or_else(|| "it logged neither".into()))
        };
        steps.push(Step {
            node: id,
            was_primary: id == p,
            handed_over,
            from,
            stopped,
            back: Instant::now(),
        });
    }
    run_for(PHASE).await;
    let h = w.finish().await;
    for s in &steps {
        say(format!(
            "{name}: node {} ({}{}): longest gap {} ms; stopped in {} ms, member and caught up \
             again {} ms after the SIGTERM",
            s.node,
            if s.was_primary { "primary" } else { "follower" },
            match (&s.handed_over, s.was_primary) {
                (Ok(()), _) => ", handed over".to_string(),
                (Err(why), true) => format!(", NOT handed over: {why}"),
                (Err(_), false) => String::new(),
            },
            longest_gap(&h, s.from, s.back).as_millis(),
            (s.stopped - s.from).as_millis(),
            (s.back - s.from).as_millis(),
        ));
    }
    verdict(name, &mut c, &voters, &h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_3_nodes_under_load_keeps_every_guarantee() {
    rolling_restart("rolling-restart-3", 3, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_5_nodes_under_load_keeps_every_guarantee() {
    rolling_restart("rolling-restart-5", 5, 1).await;
}
