//! The groups' rules through `Groups`' public calls: one dense order, access and limits,
//! retention per group and across groups, and sender dedup.

use super::dedup::RECENT_SENDS;
use super::*;
use crate::state::Rejected;

const LIMITS: GroupLimits = GroupLimits {
    max_clients: 10,
    max_groups: 2,
    max_members_per_group: 2,
    retain_messages: 3,
    retain_bytes: 1 << 20,
    retain_total_bytes: 1 << 20,
};

fn send(g: &mut Groups, client_id: u64, token: &str, sender_seq: u64) -> Result<Sent, Rejected> {
    let req = SendRequest {
        client_id,
        token_hash: hash_token(token),
        group: "g".into(),
        sender_seq,
        payload: vec![sender_seq as u8],
    };
    g.send(&req, &LIMITS, &mut Vec::new())
}

#[test]
fn membership_and_messages_share_one_dense_order() {
    let mut g = Groups::default();
    let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
    let b = g.register("bob", &hash_token("tb"), &LIMITS).unwrap();
    let j = g
        .join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    assert_eq!((j.next_seq, j.next_sender_seq), (2, 1));
    g.join(b, &hash_token("tb"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    assert_eq!(
        send(&mut g, a, "ta", 1),
        Ok(Sent {
            group_seq: 3,
            duplicate: false
        })
    );
    assert_eq!(
        send(&mut g, b, "tb", 1),
        Ok(Sent {
            group_seq: 4,
            duplicate: false
        })
    );
    // A retry is answered with the original seq and adds nothing.
    assert_eq!(
        send(&mut g, a, "ta", 1),
        Ok(Sent {
            group_seq: 3,
            duplicate: true
        })
    );
    assert_eq!(
        send(&mut g, a, "ta", 3),
        Err(Rejected::SenderSeqGap {
            expected: 2,
            got: 3
        })
    );
    g.fail(&[b], &LIMITS, &mut Vec::new());
    let slice = g.read("g", 1, 100, usize::MAX).unwrap();
    // Retention keeps the last 3 of 5 deliveries.
    assert_eq!(slice.oldest, 3);
    let kinds: Vec<_> = slice
        .deliveries
        .iter()
        .map(|d| (d.group_seq, d.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![(3, Kind::Message), (4, Kind::Message), (5, Kind::Failed)]
    );
    assert!(!g.has_client(b));
}

#[test]
fn access_and_limits_are_enforced_and_refusals_change_nothing() {
    let mut g = Groups::default();
    let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
    let b = g.register("bob", &hash_token("tb"), &LIMITS).unwrap();
    let c = g.register("carol", &hash_token("tc"), &LIMITS).unwrap();
    g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    let before = g.clone();
    assert_eq!(send(&mut g, a, "wrong", 1), Err(Rejected::Unauthenticated));
    assert_eq!(
        send(&mut g, b, "tb", 1),
        Err(Rejected::NotMember("g".into()))
    );
    assert_eq!(
        g.leave(b, &hash_token("tb"), "nope", &LIMITS, &mut Vec::new()),
        Err(Rejected::UnknownGroup("nope".into()))
    );
    assert!(matches!(
        g.join(a, &hash_token("ta"), "bad name", &LIMITS, &mut Vec::new()),
        Err(Rejected::InvalidName(_))
    ));
    assert_eq!(g, before);
    g.join(b, &hash_token("tb"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    assert_eq!(
        g.join(c, &hash_token("tc"), "g", &LIMITS, &mut Vec::new()),
        Err(Rejected::TooManyMembers { max: 2 })
    );
    g.join(a, &hash_token("ta"), "h", &LIMITS, &mut Vec::new())
        .unwrap();
    assert_eq!(
        g.join(a, &hash_token("ta"), "i", &LIMITS, &mut Vec::new()),
        Err(Rejected::TooManyGroups { max: 2 })
    );
}

#[test]
fn retention_also_counts_bytes() {
    let limits = GroupLimits {
        retain_messages: 100,
        retain_bytes: 10,
        ..LIMITS
    };
    let mut g = Groups::default();
    let a = g.register("alice", &hash_token("ta"), &limits).unwrap();
    g.join(a, &hash_token("ta"), "g", &limits, &mut Vec::new())
        .unwrap();
    for seq in 1..=4 {
        let req = SendRequest {
            client_id: a,
            token_hash: hash_token("ta"),
            group: "g".into(),
            sender_seq: seq,
            payload: vec![0; 4],
        };
        g.send(&req, &limits, &mut Vec::new()).unwrap();
    }
    // 16 payload bytes sent, 10 kept: the last two messages.
    let slice = g.read("g", 0, 100, usize::MAX).unwrap();
    assert_eq!(
        slice
            .deliveries
            .iter()
            .map(|d| d.group_seq)
            .collect::<Vec<_>>(),
        vec![4, 5]
    );
}

#[test]
fn all_groups_together_keep_at_most_retain_total_bytes_the_largest_giving_first() {
    let limits = GroupLimits {
        max_groups: 3,
        retain_messages: 100,
        retain_bytes: 100,
        retain_total_bytes: 150,
        ..LIMITS
    };
    let mut g = Groups::default();
    let me = g.register("alice", &hash_token("ta"), &limits).unwrap();
    // Sender seqs count per group.
    let mut sender_seqs = BTreeMap::<String, u64>::new();
    let mut send_to = |g: &mut Groups, group: &str, bytes: usize| {
        let seq = sender_seqs.entry(group.to_string()).or_default();
        *seq += 1;
        let req = SendRequest {
            client_id: me,
            token_hash: hash_token("ta"),
            group: group.into(),
            sender_seq: *seq,
            payload: vec![0; bytes],
        };
        g.send(&req, &limits, &mut Vec::new()).unwrap();
    };
    let kept = |g: &Groups, group: &str| {
        let slice = g.read(group, 0, usize::MAX, usize::MAX).unwrap();
        let seqs: Vec<u64> = slice.deliveries.iter().map(|d| d.group_seq).collect();
        let bytes: usize = slice.deliveries.iter().map(|d| d.payload.len()).sum();
        (seqs, bytes)
    };
    for group in ["a", "b"] {
        g.join(me, &hash_token("ta"), group, &limits, &mut Vec::new())
            .unwrap();
    }
    for _ in 0..10 {
        send_to(&mut g, "a", 10);
    }
    assert_eq!(kept(&g, "a").1, 100);
    for _ in 0..6 {
        send_to(&mut g, "b", 10);
    }
    // 160 bytes sent; "a", retaining the most, gave its oldest message.
    assert_eq!(g.retained_bytes(), 150);
    // (group_seq 1 of each group is the join; "a" gave it too, being older.)
    assert_eq!(kept(&g, "a"), ((3..=11).collect(), 90));
    assert_eq!(kept(&g, "b"), ((1..=7).collect(), 60));
    // A subscriber starting from the dropped message is told where history begins.
    assert_eq!(g.read("a", 2, 10, usize::MAX).unwrap().oldest, 3);

    // The two even out; on a tie the later name gives first.
    for _ in 0..4 {
        send_to(&mut g, "b", 10);
    }
    assert_eq!(g.retained_bytes(), 150);
    assert_eq!(kept(&g, "a").1, 80);
    assert_eq!(kept(&g, "b").1, 70);

    // A snapshot read back counts the same.
    let reread: Groups =
        crate::raft::codec::decode(&crate::raft::codec::encode(&g).unwrap()).unwrap();
    assert_eq!(reread, g);
    assert_eq!(reread.retained_bytes(), 150);
}

#[test]
fn limits_logged_before_the_total_existed_read_as_no_total() {
    let old = r#"{"max_clients":1,"max_groups":2,"max_members_per_group":3,"retain_messages":4,"retain_bytes":5}"#;
    let limits: GroupLimits = crate::raft::codec::decode(old.as_bytes()).unwrap();
    assert_eq!(limits.retain_total_bytes, u64::MAX);
    assert_eq!(limits.retain_bytes, 5);
}

#[test]
fn every_group_keeps_its_newest_message_whatever_the_total() {
    let limits = GroupLimits {
        max_groups: 3,
        retain_messages: 100,
        retain_bytes: 100,
        retain_total_bytes: 100,
        ..LIMITS
    };
    let mut g = Groups::default();
    let me = g.register("alice", &hash_token("ta"), &limits).unwrap();
    for group in ["a", "b", "c"] {
        g.join(me, &hash_token("ta"), group, &limits, &mut Vec::new())
            .unwrap();
        let req = SendRequest {
            client_id: me,
            token_hash: hash_token("ta"),
            group: group.into(),
            sender_seq: 1,
            payload: vec![0; 100],
        };
        g.send(&req, &limits, &mut Vec::new()).unwrap();
    }
    // Over the total, but each group holds one message: nothing more goes.
    assert_eq!(g.retained_bytes(), 300);
    for group in ["a", "b", "c"] {
        let slice = g.read(group, 0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(slice.deliveries.len(), 1, "{group}");
    }
}

#[test]
fn a_retry_too_old_to_look_up_is_refused_not_misreported() {
    let mut g = Groups::default();
    let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
    g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    for seq in 1..=(RECENT_SENDS as u64 + 1) {
        send(&mut g, a, "ta", seq).unwrap();
    }
    assert!(matches!(
        send(&mut g, a, "ta", 1),
        Err(Rejected::StaleRetry { sender_seq: 1, .. })
    ));
    assert!(send(&mut g, a, "ta", 2).unwrap().duplicate);
}

#[test]
fn leaving_keeps_the_sender_sequence() {
    let mut g = Groups::default();
    let a = g.register("alice", &hash_token("ta"), &LIMITS).unwrap();
    g.join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    send(&mut g, a, "ta", 1).unwrap();
    g.leave(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    let j = g
        .join(a, &hash_token("ta"), "g", &LIMITS, &mut Vec::new())
        .unwrap();
    // A stale Send of seq 1 from before the leave cannot pass for a new message.
    assert_eq!(j.next_sender_seq, 2);
    assert!(send(&mut g, a, "ta", 1).unwrap().duplicate);
}
