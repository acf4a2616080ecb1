//! The state machine's apply path, which every node runs for every log entry: a batch of id
//! requests, a batch of Sends, and the codec a log entry goes through on its way to disk and
//! to the followers. Also the snapshot build: the copy of the state taken under the lock that
//! apply needs, and its encoding. `cargo bench -p sequencer-server --bench apply`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use sequencer_server::raft::codec::{decode, encode};
use sequencer_server::state::groups::hash_token;
use sequencer_server::state::{AllocRequest, Command, GroupLimits, SendRequest, State, Touched};

const BATCH: usize = 64;

fn limits() -> GroupLimits {
    GroupLimits {
        max_clients: 100_000,
        max_groups: 10_000,
        max_members_per_group: 1_000,
        retain_messages: 10_000,
        retain_bytes: 16 << 20,
        retain_total_bytes: 256 << 20,
    }
}

fn allocate(sequences: usize) -> Command {
    Command::Allocate {
        requests: (0..BATCH)
            .map(|i| AllocRequest {
                sequence: format!("seq-{}", i % sequences),
                count: 1,
            })
            .collect(),
        max_sequences: 10_000,
    }
}

/// A state with `BATCH` registered members of group "g", and the Send batch they make.
fn group_and_sends() -> (State, Command) {
    let mut state = State::default();
    let mut touched = Touched::default();
    let token_hash = hash_token("token");
    for i in 0..BATCH {
        state.apply(
            &Command::Register {
                name: format!("c{i}"),
                token_hash: token_hash.clone(),
                limits: limits(),
            },
            1,
            &mut touched,
        );
        state.apply(
            &Command::Join {
                client_id: i as u64 + 1,
                token_hash: token_hash.clone(),
                group: "g".into(),
                limits: limits(),
            },
            1,
            &mut touched,
        );
    }
    let sends = Command::Send {
        sends: (0..BATCH)
            .map(|i| SendRequest {
                client_id: i as u64 + 1,
                token_hash: token_hash.clone(),
                group: "g".into(),
                sender_seq: 1,
                payload: vec![b'x'; 64],
            })
            .collect(),
        limits: limits(),
    };
    (state, sends)
}

fn bench_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    g.throughput(Throughput::Elements(BATCH as u64));
    for sequences in [1, 16] {
        let cmd = allocate(sequences);
        let mut state = State::default();
        let mut touched = Touched::default();
        g.bench_function(
            format!("allocate {BATCH} ids over {sequences} sequences"),
            |b| b.iter(|| state.apply(&cmd, 1, &mut touched)),
        );
    }
    let (state, sends) = group_and_sends();
    g.bench_function(format!("send {BATCH} messages of 64 bytes"), |b| {
        b.iter_batched(
            || state.clone(),
            |mut s| s.apply(&sends, 1, &mut Touched::default()),
            BatchSize::SmallInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(BATCH as u64));
    let cmd = allocate(1);
    let bytes = encode(&cmd).unwrap();
    g.bench_function("encode an allocate entry", |b| {
        b.iter(|| encode(&cmd).unwrap())
    });
    g.bench_function("decode an allocate entry", |b| {
        b.iter(|| decode::<Command>(&bytes).unwrap())
    });
    let send_bytes = encode(&sends).unwrap();
    g.bench_function("decode a send entry", |b| {
        b.iter(|| decode::<Command>(&send_bytes).unwrap())
    });
    g.finish();
}

/// A group retaining 10,000 messages of 1 KiB, about 10 MiB of payload.
fn full_group() -> State {
    let (mut state, sends) = group_and_sends();
    let Command::Send { mut sends, limits } = sends else {
        unreachable!()
    };
    for round in 1..=10_000 / BATCH as u64 + 1 {
        for s in &mut sends {
            s.sender_seq = round;
            s.payload = vec![b'x'; 1024];
        }
        let cmd = Command::Send {
            sends: sends.clone(),
            limits,
        };
        state.apply(&cmd, 1, &mut Touched::default());
    }
    state
}

fn bench_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    let state = full_group();
    g.bench_function("copy a state retaining 10 MiB", |b| {
        b.iter(|| state.clone())
    });
    g.bench_function("encode a state retaining 10 MiB", |b| {
        b.iter(|| encode(&state).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_apply, bench_snapshot);
criterion_main!(benches);
