//! The membership changes while the cluster serves: nodes join, are promoted, removed and
//! replaced; the primary is handed over; and every bad request is refused without changing
//! anything. Real node processes, real Raft logs, the public Admin service.

use std::time::Duration;

use sequencer_proto::v1::admin_client::AdminClient;
use sequencer_proto::v1::{
    AddMemberRequest, AdminListRequest, AdminListResponse, PromoteMemberRequest,
    RemoveMemberRequest, TransferPrimaryRequest, TransferPrimaryResponse,
};
use testkit::Cluster;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

mod common;

const SERVER: &str = env!("CARGO_BIN_EXE_server");
const TOKEN: &str = "a-test-admin-token-0123";

/// Admin calls to one node, with a token (or none).
struct Admin {
    client: AdminClient<Channel>,
    token: Option<String>,
}

impl Admin {
    async fn to(cluster: &Cluster, id: u64, token: Option<&str>) -> Admin {
        let client = AdminClient::connect(format!("http://{}", cluster.node(id).addr))
            .await
            .expect("the node listens");
        Admin {
            client,
            token: token.map(str::to_string),
        }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.set_timeout(Duration::from_secs(60));
        if let Some(t) = &self.token {
            req.metadata_mut()
                .insert("x-admin-token", t.parse().unwrap());
        }
        req
    }

    async fn list(&mut self) -> Result<AdminListResponse, Status> {
        let req = self.req(AdminListRequest {});
        self.client.list_members(req).await.map(|r| r.into_inner())
    }

    async fn add(
        &mut self,
        id: u32,
        addr: &str,
        peer_addr: &str,
        learner_only: bool,
    ) -> Result<AdminListResponse, Status> {
        let req = self.req(AddMemberRequest {
            id,
            addr: addr.into(),
            peer_addr: peer_addr.into(),
            learner_only,
        });
        let resp = self.client.add_member(req).await?.into_inner();
        Ok(resp.members.unwrap_or_default())
    }

    async fn promote(&mut self, id: u32) -> Result<AdminListResponse, Status> {
        let req = self.req(PromoteMemberRequest { id });
        let resp = self.client.promote_member(req).await?.into_inner();
        Ok(resp.members.unwrap_or_default())
    }

    async fn remove(&mut self, id: u32, force: bool) -> Result<AdminListResponse, Status> {
        let req = self.req(RemoveMemberRequest { id, force });
        let resp = self.client.remove_member(req).await?.into_inner();
        Ok(resp.members.unwrap_or_default())
    }

    async fn transfer(&mut self, to: u32) -> Result<TransferPrimaryResponse, Status> {
        let req = self.req(TransferPrimaryRequest { to });
        self.client
            .transfer_primary(req)
            .await
            .map(|r| r.into_inner())
    }
}

/// The refusal of a call that must fail.
#[track_caller]
fn code(r: Result<AdminListResponse, Status>) -> Status {
    match r {
        Ok(list) => panic!("the call was taken: {list:?}"),
        Err(e) => e,
    }
}

/// (voters, learners) of a listing, sorted.
fn roles(list: &AdminListResponse) -> (Vec<u32>, Vec<u32>) {
    let with = |role: &str| {
        let mut ids: Vec<u32> = list
            .members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.id)
            .collect();
        ids.sort();
        ids
    };
    (with("voter"), with("learner"))
}

async fn three_nodes(settings: &[(&str, &str)]) -> Cluster {
    let builder = settings
        .iter()
        .fold(Cluster::builder(SERVER).nodes(3), |b, (k, v)| b.set(k, *v));
    let mut cluster = builder.set("admin_token", TOKEN).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    cluster
}

/// Waits until node `id`'s CurrentId of "default" reaches `at_least`.
async fn wait_applied_here(cluster: &Cluster, id: u64, at_least: u64) {
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    loop {
        let seen = cluster
            .client_for(id)
            .current_id("default")
            .await
            .map(|r| r.id);
        if matches!(seen, Ok(v) if v >= at_least) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} never applied id {at_least}: {seen:?}\n{}",
            cluster.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_joins_catches_up_and_becomes_a_voter() {
    let mut cluster = three_nodes(&[]).await;
    let block = cluster.client().get_ids("default", 1000).await.unwrap();
    assert_eq!(block.first, 1);
    let added = cluster.add_nodes(1).unwrap();
    let via = cluster.node(1).addr.clone();
    cluster
        .start_node_with(added[0], &["--join", &via])
        .unwrap();

    // The node has every id the cluster handed out, and is a voter.
    wait_applied_here(&cluster, 4, 1000).await;
    let mut admin = Admin::to(&cluster, 1, None).await;
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    loop {
        let list = admin.list().await.unwrap();
        if roles(&list) == (vec![1, 2, 3, 4], vec![]) {
            let four = list.members.iter().find(|m| m.id == 4).unwrap();
            assert_eq!(four.addr, cluster.node(4).addr);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never became a voter: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It serves, above everything handed out before it joined.
    let next = cluster.client_for(4).get_id("default").await.unwrap().id;
    assert_eq!(next, 1001);
    assert!(
        cluster.log(4).contains("joined the cluster as a voter"),
        "{}",
        cluster.log(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_whose_disk_was_lost_is_refused_and_rejoin_brings_it_back() {
    let mut cluster = three_nodes(&[]).await;
    let primary = cluster.wait_for_primary().await.unwrap();
    let victim = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    let first = cluster
        .client()
        .get_ids("default", 100)
        .await
        .unwrap()
        .first;
    assert_eq!(first, 1);
    // A member counts as having run once it announced so (one killed before that held
    // nothing, and may come back with an empty disk).
    cluster.wait_all_started().await.unwrap();
    cluster.kill(victim);
    cluster.wipe(victim).unwrap();

    // Started plainly, it refuses in one line that says what to do, and is not restarted.
    cluster.start_node(victim).unwrap();
    let line = cluster.wait_refused(victim).await.unwrap();
    assert!(line.contains("--rejoin") && line.contains("lost"), "{line}");

    // --rejoin removes its old self and joins again; it catches up and serves.
    let via = cluster.node(primary).addr.clone();
    cluster
        .start_node_with(victim, &["--rejoin", &via])
        .unwrap();
    wait_applied_here(&cluster, victim, 100).await;
    let mut admin = Admin::to(&cluster, primary, None).await;
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    while roles(&admin.list().await.unwrap()).0.len() != 3 {
        assert!(Instant::now() < deadline, "{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = cluster
        .client_for(victim)
        .get_id("default")
        .await
        .unwrap()
        .id;
    assert_eq!(next, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_beside_a_cluster_that_does_not_list_it_is_refused() {
    let mut cluster = three_nodes(&[]).await;
    let added = cluster.add_nodes(1).unwrap();
    cluster.start_node(added[0]).unwrap();
    let line = cluster.wait_refused(added[0]).await.unwrap();
    assert!(
        line.contains("does not list it") && line.contains("--join"),
        "{line}"
    );
    // Nothing changed.
    let list = Admin::to(&cluster, 1, None).await.list().await.unwrap();
    assert_eq!(roles(&list), (vec![1, 2, 3], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_with_another_cluster_secret_is_refused_in_one_line() {
    let mut cluster = three_nodes(&[]).await;
    let added = cluster.add_nodes(1).unwrap();
    // Node 4's config carries another secret.
    let path = cluster.dir().join("config-4.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["cluster_secret"] = "some-other-clusters-secret".into();
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let via = cluster.node(1).addr.clone();
    cluster
        .start_node_with(added[0], &["--join", &via])
        .unwrap();
    let line = cluster.wait_refused(added[0]).await.unwrap();
    assert!(line.contains("cluster secret differs"), "{line}");
    let list = Admin::to(&cluster, 1, None).await.list().await.unwrap();
    assert_eq!(roles(&list), (vec![1, 2, 3], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_handed_over_on_request_and_on_sigterm() {
    let mut cluster = three_nodes(&[]).await;
    let primary = cluster.wait_for_primary().await.unwrap();
    let target = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    let term = cluster.client_for(primary).status().await.unwrap().term;
    let first = cluster.client().get_id("default").await.unwrap().id;

    // Asked of the third node, which passes it to the primary: the hand-over happens once,
    // though the primary moves while the call is in flight.
    let third = cluster
        .ids()
        .into_iter()
        .find(|id| *id != primary && *id != target)
        .unwrap();
    let mut admin = Admin::to(&cluster, third, Some(TOKEN)).await;
    let moved = admin.transfer(target as u32).await.unwrap();
    assert_eq!((moved.from as u64, moved.to as u64), (primary, target));
    let status = cluster.client_for(target).status().await.unwrap();
    assert_eq!(status.primary as u64, target);
    // One campaign, won at once: no term was spent on a failed election.
    assert_eq!(status.term, term + 1, "{}", cluster.log_tails());
    let next = cluster.client().get_id("default").await.unwrap().id;
    assert_eq!(next, first + 1);

    // SIGTERM on the new primary: it hands over before it stops.
    cluster.signal(target, libc::SIGTERM).unwrap();
    cluster
        .wait_exit(target, Duration::from_secs(20))
        .await
        .unwrap();
    assert!(
        cluster
            .log(target)
            .contains("handed the primary over before stopping"),
        "{}",
        cluster.log(target)
    );
    let after = cluster.wait_for_primary().await.unwrap();
    assert_ne!(after, target);
    let status = cluster.client_for(after).status().await.unwrap();
    assert_eq!(
        status.term,
        term + 2,
        "a hand-over costs one term, not an election's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_calls_are_refused_and_change_nothing() {
    let mut cluster = three_nodes(&[]).await;
    let primary = cluster.wait_for_primary().await.unwrap();
    let follower = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    // Asked of a follower: it passes every call to the primary.
    let mut admin = Admin::to(&cluster, follower, Some(TOKEN)).await;
    let before = roles(&admin.list().await.unwrap());
    let n1_addr = cluster.node(1).addr.clone();

    let e = code(admin.add(2, "127.0.0.1:1", "127.0.0.1:2", true).await);
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = code(admin.add(9, &n1_addr, "127.0.0.1:2", true).await);
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    let e = code(admin.add(9, "not an address", "127.0.0.1:2", true).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = code(admin.remove(9, false).await);
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = code(admin.promote(2).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = admin.transfer(9).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");

    // Credentials: none, a wrong one.
    let mut anonymous = Admin::to(&cluster, follower, None).await;
    let e = code(anonymous.remove(3, false).await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let mut wrong = Admin::to(&cluster, follower, Some("not-the-admin-token-0")).await;
    let e = code(wrong.remove(3, false).await);
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // A learner nobody runs: a transfer to it is refused, and so is a second change while
    // a first one waits for it to catch up.
    admin
        .add(7, "127.0.0.1:9", "127.0.0.1:10", true)
        .await
        .unwrap();
    let e = admin.transfer(7).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let mut slow = Admin::to(&cluster, primary, Some(TOKEN)).await;
    let waiting = tokio::spawn(async move {
        let mut req = slow.req(PromoteMemberRequest { id: 7 });
        req.set_timeout(Duration::from_secs(3));
        slow.client.promote_member(req).await
    });
    // The primary has taken the promotion when it logs it.
    cluster
        .wait_log(primary, "change=promoting node 7")
        .await
        .unwrap();
    let e = code(admin.add(8, "127.0.0.1:11", "127.0.0.1:12", true).await);
    assert!(
        e.code() == Code::FailedPrecondition && e.message().contains("in progress"),
        "{e}"
    );
    let promoted = waiting.await.unwrap().unwrap_err();
    assert_eq!(promoted.code(), Code::FailedPrecondition, "{promoted}");
    // Still a learner: a node that never answered must not count against quorums.
    assert_eq!(roles(&admin.list().await.unwrap()).1, vec![7]);
    admin.remove(7, false).await.unwrap();

    // Removing a voter when the voters left could not form a quorum with those that answer.
    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != primary)
        .collect();
    cluster.kill(others[1]);
    let mut admin = Admin::to(&cluster, primary, Some(TOKEN)).await;
    let e = code(admin.remove(others[0] as u32, false).await);
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("--force"), "{e}");
    // Nor can the primary be handed to a voter that does not answer.
    let e = admin.transfer(others[1] as u32).await.unwrap_err();
    assert!(
        e.code() == Code::FailedPrecondition && e.message().contains("does not answer"),
        "{e}"
    );
    assert_eq!(roles(&admin.list().await.unwrap()), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_are_off_without_an_admin_credential_and_the_last_voter_stays() {
    let mut cluster = Cluster::builder(SERVER).nodes(1).start().unwrap();
    cluster.wait_for_primary().await.unwrap();
    let mut admin = Admin::to(&cluster, 1, Some(TOKEN)).await;
    let e = admin.remove(1, true).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // Listing stays open.
    assert_eq!(roles(&admin.list().await.unwrap()), (vec![1], vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_voter_cannot_be_removed() {
    let mut cluster = Cluster::builder(SERVER)
        .nodes(1)
        .set("admin_token", TOKEN)
        .start()
        .unwrap();
    cluster.wait_for_primary().await.unwrap();
    let mut admin = Admin::to(&cluster, 1, Some(TOKEN)).await;
    let e = admin.remove(1, true).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("last voter"), "{e}");
}

/// A node with an empty data dir takes no Raft traffic until it knows it may: otherwise a
/// primary would refill the log of a voter that lost its disk, or it would vote, before it
/// could be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_takes_no_raft_traffic_until_it_knows_it_may() {
    let mut cluster = three_nodes(&[]).await;
    cluster.wait_all_started().await.unwrap();
    cluster.kill_all();
    cluster.wipe(3).unwrap();
    // Alone, node 3 cannot find out yet: its peers are down.
    cluster.start_node(3).unwrap();
    cluster.wait_log(3, "do not answer yet").await.unwrap();
    let vote = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(9, 1), None);
    let mut peer = common::peer_client(&cluster.node(3).peer_addr).await;
    let data = serde_json::to_vec(&vote).unwrap();
    let e = peer
        .vote(common::message(&data, cluster.cluster_secret()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("does not yet know"), "{e}");

    // Once the others answer, it refuses: it lost the vote it gave as a member.
    cluster.start_node(1).unwrap();
    cluster.start_node(2).unwrap();
    let line = cluster.wait_refused(3).await.unwrap();
    assert!(line.contains("--rejoin"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_from_the_operators_side_then_started_with_join_becomes_a_voter() {
    let mut cluster = three_nodes(&[]).await;
    let added = cluster.add_nodes(1).unwrap()[0];
    let (addr, peer_addr) = (
        cluster.node(added).addr.clone(),
        cluster.node(added).peer_addr.clone(),
    );
    let mut admin = Admin::to(&cluster, 1, Some(TOKEN)).await;
    let list = admin
        .add(added as u32, &addr, &peer_addr, true)
        .await
        .unwrap();
    assert_eq!(roles(&list).1, vec![added as u32]);
    // The same node asking to join is no conflict: it never ran.
    let via = cluster.node(1).addr.clone();
    cluster.start_node_with(added, &["--join", &via]).unwrap();
    cluster
        .wait_log(added, "joined the cluster as a voter")
        .await
        .unwrap();
    assert_eq!(
        roles(&admin.list().await.unwrap()),
        (vec![1, 2, 3, 4], vec![])
    );
    // A primary wrote every member's addresses into the membership.
    let deadline = Instant::now() + testkit::READY_TIMEOUT;
    let wrote = |c: &Cluster| {
        (1..=4).any(|id| {
            c.log(id)
                .contains("wrote members' addresses into the membership")
        })
    };
    while !wrote(&cluster) {
        assert!(Instant::now() < deadline, "{}", cluster.log_tails());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_is_told_and_stops_campaigning() {
    let mut cluster = three_nodes(&[]).await;
    let primary = cluster.wait_for_primary().await.unwrap();
    let removed = cluster.ids().into_iter().find(|id| *id != primary).unwrap();
    let mut admin = Admin::to(&cluster, primary, Some(TOKEN)).await;
    let list = admin.remove(removed as u32, false).await.unwrap();
    assert!(!list.members.iter().any(|m| m.id as u64 == removed));
    cluster
        .wait_log(removed, "was removed from the cluster")
        .await
        .unwrap();
    // It hears no primary any more; were it to campaign, its term would climb by one each
    // election timeout (500 ms here).
    let status = |c: &Cluster| {
        let client = c.client_for(removed);
        async move { client.status().await.unwrap().term }
    };
    let before = status(&cluster).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status(&cluster).await, before, "{}", cluster.log(removed));
    // The others serve on.
    cluster.client_for(primary).get_id("default").await.unwrap();
}
