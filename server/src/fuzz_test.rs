//! Fuzzing, with proptest because `cargo fuzz` needs a nightly compiler that CI does not have.
//!
//! Every decoder that reads bytes from outside this process gets mutated versions of a seed
//! corpus (`server/fuzz-corpus/`, one directory per input kind) and arbitrary bytes: log
//! entries and snapshots as read from disk, peer messages, public protobuf requests, request
//! names and config files. Whatever they are fed, they must return a value or an error, never
//! panic; a decoded command must apply without panicking, and a bad config gives one line.
//!
//! `PROPTEST_CASES=100000 cargo test -p sequencer-server --lib fuzz` runs longer.
//! `cargo test -p sequencer-server --lib write_fuzz_corpus -- --ignored` rewrites the seeds.

use std::path::PathBuf;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership, Vote};
use proptest::prelude::*;
use prost::Message;
use sequencer_proto::v1 as pb;

use crate::config::Config;
use crate::peer::messages::HeartbeatMsg;
use crate::raft::codec::{decode, encode};
use crate::raft::store::snapshot_file::{parse, SnapshotFile, SNAPSHOT_FILE};
use crate::raft::{Member, NodeId, TypeConfig};
use crate::state::{AllocRequest, Command, GroupLimits, SendRequest, State, Touched};

fn corpus_dir(kind: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz-corpus")
        .join(kind)
}

/// The seeds of one kind, as bytes.
fn corpus(kind: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "fuzz corpus {} is empty", dir.display());
    seeds
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    Repeat(usize, usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), 1..64usize).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ];
    prop::collection::vec(edit, 1..8)
}

fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *e {
            Edit::Flip(i, x) if !b.is_empty() => {
                let i = at(i, b.len());
                b[i] ^= x;
            }
            Edit::Insert(i, x) => {
                let i = at(i, b.len() + 1);
                b.insert(i, x);
            }
            Edit::Remove(i) if !b.is_empty() => {
                let i = at(i, b.len());
                b.remove(i);
            }
            Edit::Truncate(i) => b.truncate(at(i, b.len() + 1)),
            Edit::Repeat(i, n) if !b.is_empty() => {
                let i = at(i, b.len());
                let end = (i + n).min(b.len());
                let piece = b[i..end].to_vec();
                b.splice(i..i, piece);
            }
            _ => {}
        }
    }
    b
}

/// A mutated seed of `kind`, or plain random bytes.
fn input(kind: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus(kind);
    let n = seeds.len();
    prop_oneof![
        4 => (0..n, edits()).prop_map(move |(i, e)| mutate(&seeds[i], &e)),
        1 => prop::collection::vec(any::<u8>(), 0..512),
    ]
}

fn limits() -> GroupLimits {
    GroupLimits {
        max_clients: 100,
        max_groups: 10,
        max_members_per_group: 10,
        retain_messages: 50,
        retain_bytes: 1 << 16,
        retain_total_bytes: 1 << 18,
    }
}

/// A state with something in it, so commands have sequences, clients and groups to touch.
fn busy_state() -> State {
    let mut state = State::default();
    let mut touched = Touched::default();
    for cmd in seed_commands() {
        state.apply(&cmd, 1, &mut touched);
    }
    state
}

fn seed_commands() -> Vec<Command> {
    let token_hash = crate::state::groups::hash_token("token");
    vec![
        Command::Allocate {
            requests: vec![
                AllocRequest::new("default", 3),
                AllocRequest::new("orders", 1000),
            ],
            max_sequences: 10,
        },
        Command::Register {
            name: "alice".into(),
            token_hash: token_hash.clone(),
            limits: limits(),
        },
        Command::Join {
            client_id: 1,
            token_hash: token_hash.clone(),
            group: "g".into(),
            limits: limits(),
        },
        Command::Send {
            sends: vec![SendRequest {
                client_id: 1,
                token_hash: token_hash.clone(),
                group: "g".into(),
                sender_seq: 1,
                payload: b"hello".to_vec(),
            }],
            limits: limits(),
        },
        Command::Leave {
            client_id: 1,
            token_hash: token_hash.clone(),
            group: "g".into(),
            limits: limits(),
        },
        Command::Fail {
            client_ids: vec![1, 2],
            term: 1,
            limits: limits(),
        },
        Command::Unregister {
            client_id: 1,
            token_hash,
            limits: limits(),
        },
    ]
}

fn any_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("default".to_string()),
        Just("orders".to_string()),
        Just("g".to_string()),
        Just("x".to_string()),
        "[A-Za-z0-9._-]{0,70}",
        any::<String>(),
    ]
}

fn any_token_hash() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(crate::state::groups::hash_token("token")),
        Just(String::new()),
        any::<String>(),
    ]
}

fn any_limits() -> impl Strategy<Value = GroupLimits> {
    (0..4u32, 0..4u32, 0..4u32, 0..8u32, 0..1024u64, 0..2048u64).prop_map(|(c, g, m, r, b, t)| {
        GroupLimits {
            max_clients: c,
            max_groups: g,
            max_members_per_group: m,
            retain_messages: r,
            retain_bytes: b,
            retain_total_bytes: t,
        }
    })
}

fn any_count() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        1..10u64,
        Just(u64::MAX),
        Just(u64::MAX / 2),
        any::<u64>()
    ]
}

fn any_command() -> impl Strategy<Value = Command> {
    let alloc = (
        prop::collection::vec((any_name(), any_count()), 0..5),
        0..4u32,
    )
        .prop_map(|(reqs, max_sequences)| Command::Allocate {
            requests: reqs
                .into_iter()
                .map(|(sequence, count)| AllocRequest { sequence, count })
                .collect(),
            max_sequences,
        });
    let register =
        (any_name(), any_token_hash(), any_limits()).prop_map(|(name, token_hash, limits)| {
            Command::Register {
                name,
                token_hash,
                limits,
            }
        });
    let group_change = (
        any::<bool>(),
        0..4u64,
        any_token_hash(),
        any_name(),
        any_limits(),
    )
        .prop_map(|(join, id, token_hash, group, limits)| {
            Command::group_change(join, id, token_hash, group, limits)
        });
    let unregister =
        (0..4u64, any_token_hash(), any_limits()).prop_map(|(client_id, token_hash, limits)| {
            Command::Unregister {
                client_id,
                token_hash,
                limits,
            }
        });
    let send = (
        prop::collection::vec(
            (
                0..4u64,
                any_token_hash(),
                any_name(),
                any_count(),
                prop::collection::vec(any::<u8>(), 0..64),
            ),
            0..5,
        ),
        any_limits(),
    )
        .prop_map(|(sends, limits)| Command::Send {
            sends: sends
                .into_iter()
                .map(
                    |(client_id, token_hash, group, sender_seq, payload)| SendRequest {
                        client_id,
                        token_hash,
                        group,
                        sender_seq,
                        payload,
                    },
                )
                .collect(),
            limits,
        });
    let fail = (prop::collection::vec(0..5u64, 0..4), 0..5u64, any_limits()).prop_map(
        |(client_ids, term, limits)| Command::Fail {
            client_ids,
            term,
            limits,
        },
    );
    prop_oneof![
        1 => alloc,
        1 => register,
        2 => group_change,
        1 => unregister,
        1 => send,
        1 => fail
    ]
}

fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn seed_entries() -> Vec<Entry<TypeConfig>> {
    let mut members = std::collections::BTreeMap::new();
    for id in 1..=3u64 {
        members.insert(
            id,
            Member {
                addr: String::new(),
                peer_addr: format!("127.0.0.1:{}", 51050 + id),
            },
        );
    }
    let mut entries = vec![
        Entry {
            log_id: log_id(0, 0),
            payload: EntryPayload::Membership(Membership::new(
                vec![members.keys().copied().collect()],
                members,
            )),
        },
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
    ];
    for (i, cmd) in seed_commands().into_iter().enumerate() {
        entries.push(Entry {
            log_id: log_id(1, i as u64 + 2),
            payload: EntryPayload::Normal(cmd),
        });
    }
    entries
}

/// Writes the seed corpus from today's types; run it when a stored format changes.
#[test]
#[ignore]
fn write_fuzz_corpus() {
    let write = |kind: &str, name: &str, bytes: Vec<u8>| {
        let dir = corpus_dir(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let entries = seed_entries();
    for (i, e) in entries.iter().enumerate() {
        write("entry", &format!("{i:02}.json"), encode(e).unwrap());
    }
    for (i, c) in seed_commands().iter().enumerate() {
        write("command", &format!("{i:02}.json"), encode(c).unwrap());
    }
    let state = busy_state();
    let meta = openraft::SnapshotMeta {
        last_log_id: Some(log_id(1, 8)),
        last_membership: Default::default(),
        snapshot_id: "1-8-1".into(),
    };
    write("snapshot", "state.json", encode(&state).unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let (file, _) = SnapshotFile::open(tmp.path()).unwrap();
    file.save(&meta, &encode(&state).unwrap()).unwrap();
    let stored = std::fs::read(tmp.path().join(SNAPSHOT_FILE)).unwrap();
    write("snapshot", SNAPSHOT_FILE, stored);
    let vote = VoteRequest::<NodeId>::new(Vote::new(3, 2), Some(log_id(2, 7)));
    write("peer", "vote.json", encode(&vote).unwrap());
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(2, 1),
        prev_log_id: Some(log_id(1, 1)),
        entries: entries[2..].to_vec(),
        leader_commit: Some(log_id(1, 1)),
    };
    write("peer", "append.json", encode(&append).unwrap());
    let heartbeat = HeartbeatMsg {
        client_id: 1,
        token_hash: crate::state::groups::hash_token("token"),
    };
    write("peer", "heartbeat.json", encode(&heartbeat).unwrap());
    write(
        "config",
        "shorthand.json",
        br#"{"servers": 3, "base_port": 50051, "max_batch": 1000}"#.to_vec(),
    );
    write(
        "config",
        "nodes.json",
        br#"{"nodes": [{"id": 1, "addr": "10.0.0.1:50051", "peer_addr": "10.0.0.1:51051"}], "cluster_secret": "0123456789abcdef0123"}"#.to_vec(),
    );
    let requests: Vec<(&str, Vec<u8>)> = vec![
        (
            "get_ids",
            pb::GetIdsRequest {
                sequence: "orders".into(),
                count: 10,
            }
            .encode_to_vec(),
        ),
        (
            "send",
            pb::SendRequest {
                client_id: 1,
                token: "t".into(),
                group: "g".into(),
                sender_seq: 1,
                payload: b"hi".to_vec(),
            }
            .encode_to_vec(),
        ),
        (
            "subscribe",
            pb::SubscribeRequest {
                client_id: 1,
                token: "t".into(),
                group: "g".into(),
                from_seq: 5,
            }
            .encode_to_vec(),
        ),
    ];
    for (name, bytes) in requests {
        write("request", &format!("{name}.bin"), bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// The log as read from disk.
    #[test]
    fn fuzz_log_entry_decoding_never_panics(bytes in input("entry")) {
        let _ = decode::<Entry<TypeConfig>>(&bytes);
    }

    /// Snapshots as read from disk at start, and as installed from a peer.
    #[test]
    fn fuzz_snapshot_decoding_never_panics(bytes in input("snapshot")) {
        if let Ok(stored) = parse(&bytes) {
            let _ = decode::<State>(&stored.data);
        }
        let _ = decode::<State>(&bytes);
    }

    /// What a peer sends: Raft messages, forwarded commands and heartbeats.
    #[test]
    fn fuzz_peer_message_decoding_never_panics(bytes in input("peer")) {
        let _ = decode::<AppendEntriesRequest<TypeConfig>>(&bytes);
        let _ = decode::<VoteRequest<NodeId>>(&bytes);
        let _ = decode::<InstallSnapshotRequest<TypeConfig>>(&bytes);
        let _ = decode::<HeartbeatMsg>(&bytes);
    }

    /// A command that decodes, however odd, applies without panicking, and ids never go back.
    #[test]
    fn fuzz_commands_apply_without_panicking(bytes in input("command"), term in 0..4u64) {
        if let Ok(cmd) = decode::<Command>(&bytes) {
            let mut state = busy_state();
            let before: Vec<u64> = ["default", "orders"].iter().map(|s| state.sequences.current(s)).collect();
            state.apply(&cmd, term, &mut Touched::default());
            let after: Vec<u64> = ["default", "orders"].iter().map(|s| state.sequences.current(s)).collect();
            prop_assert!(after.iter().zip(&before).all(|(a, b)| a >= b), "{before:?} -> {after:?}");
        }
    }

    /// Any sequence of well-formed but arbitrary commands (bad tokens, unknown clients, zero
    /// and huge counts, odd names, zero limits) applies without panicking, and ids never go
    /// back.
    #[test]
    fn fuzz_arbitrary_command_sequences_apply(cmds in prop::collection::vec(any_command(), 1..20)) {
        let mut state = busy_state();
        for (i, cmd) in cmds.iter().enumerate() {
            let before: Vec<u64> = ["default", "orders", "x"].iter().map(|s| state.sequences.current(s)).collect();
            state.apply(cmd, 1 + i as u64 % 3, &mut Touched::default());
            // What is kept across groups is what a snapshot read back would count.
            let reread: State = decode(&encode(&state).unwrap()).unwrap();
            prop_assert_eq!(&reread, &state);
            let after: Vec<u64> = ["default", "orders", "x"].iter().map(|s| state.sequences.current(s)).collect();
            prop_assert!(after.iter().zip(&before).all(|(a, b)| a >= b), "{before:?} -> {after:?}");
        }
    }

    /// Every public request type, from raw protobuf bytes.
    #[test]
    fn fuzz_public_requests_decode_or_fail_cleanly(bytes in input("request")) {
        let _ = pb::GetIdRequest::decode(bytes.as_slice());
        let _ = pb::GetIdsRequest::decode(bytes.as_slice());
        let _ = pb::CurrentIdRequest::decode(bytes.as_slice());
        let _ = pb::RegisterRequest::decode(bytes.as_slice());
        let _ = pb::JoinRequest::decode(bytes.as_slice());
        let _ = pb::LeaveRequest::decode(bytes.as_slice());
        let _ = pb::UnregisterRequest::decode(bytes.as_slice());
        let _ = pb::HeartbeatRequest::decode(bytes.as_slice());
        let _ = pb::ListMembersRequest::decode(bytes.as_slice());
        let _ = pb::SendRequest::decode(bytes.as_slice());
        let _ = pb::SubscribeRequest::decode(bytes.as_slice());
    }

    /// Names in requests: accepted exactly when they match the documented pattern, and a
    /// refusal quotes at most a short prefix of what was sent.
    #[test]
    fn fuzz_request_names_are_validated(name in prop_oneof![
        "[A-Za-z0-9._-]{0,70}",
        any::<String>(),
        ".{60,300}",
    ]) {
        let expected = (1..=64).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b));
        match crate::api::checked_name(name.clone(), "group name") {
            Ok(n) => { prop_assert!(expected); prop_assert_eq!(n, name); }
            Err(e) => {
                prop_assert!(!expected, "{name:?} refused");
                prop_assert!(e.to_string().chars().count() < 200, "{e}");
            }
        }
    }

    /// Config files: a value or a one-line error, never a panic.
    #[test]
    fn fuzz_config_files_give_a_config_or_one_line(bytes in input("config")) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Config::from_json(&text) {
            prop_assert_eq!(e.to_string().lines().count(), 1, "{}", e);
        }
    }
}
