#!/usr/bin/env bash
# The benchmark matrix (BENCHMARKS.md): clusters of 1, 3 and 5 nodes from the release build,
# `client bench` for every mode, concurrency and target (callers spread over every node, or
# all on the primary), then the memory and disk check after 10,000,000 ids. Writes
# bench/results/latest.json and bench/results/latest.svg.
#
# Narrow it with NODES="3" MODES="get-id ping" CONCURRENCY="1 64" TARGETS="spread"
# SECONDS_EACH=5 (the defaults run everything, about 10 minutes at 5 s each).
#
# When `etcd` or `redis-server` is on the PATH, the same harness loads them too: etcd clusters
# of the same sizes (get-id is a Put, its revision the id) and one Redis (get-id is INCR), for
# get-id and ping, callers spread over the members. OTHERS="" leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."

NODES=${NODES:-"1 3 5"}
MODES=${MODES:-"get-id get-ids send ping"}
CONCURRENCY=${CONCURRENCY:-"1 16 64 256"}
TARGETS=${TARGETS:-"spread primary"}
SECONDS_EACH=${SECONDS_EACH:-5}
MEMORY_IDS=${MEMORY_IDS:-10000000}
OTHERS=${OTHERS-"etcd redis-server"}

cargo build --release --quiet --bin server --bin client --bin chart
bin=$PWD/target/release
out=bench/results
mkdir -p "$out"
work=$(mktemp -d)
launcher=""
others=()
cleanup() {
    # Only the processes we started: the launcher stops its own nodes.
    if [ -n "$launcher" ]; then kill "$launcher" 2>/dev/null || true; wait "$launcher" 2>/dev/null || true; fi
    stop_others
    rm -rf "$work"
}
stop_others() {
    local pid
    for pid in "${others[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    others=()
}
trap cleanup EXIT

free_ports() { # n: n distinct free ports, held together while picked
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
EOF
}

start_cluster() { # n: writes $work/config.json, starts the launcher, waits for a primary
    local n=$1 ports i nodes=""
    read -r -a ports <<< "$(free_ports $((2 * n)))"
    for ((i = 0; i < n; i++)); do
        nodes+="{\"id\": $((i + 1)), \"addr\": \"127.0.0.1:${ports[2*i]}\", \"peer_addr\": \"127.0.0.1:${ports[2*i+1]}\"},"
    done
    rm -rf "$work/data"
    echo "{\"nodes\": [${nodes%,}], \"data_dir\": \"$work/data\"}" > "$work/config.json"
    RUST_LOG=warn "$bin/server" --config "$work/config.json" > "$work/launcher.log" 2>&1 &
    launcher=$!
    local deadline=$((SECONDS + 60))
    until "$bin/client" --config "$work/config.json" status --json 2>/dev/null | grep -q '"primary":true'; do
        if ((SECONDS > deadline)); then echo "no primary within 60 s" >&2; cat "$work/launcher.log" >&2; exit 1; fi
        sleep 0.2
    done
}

stop_cluster() {
    kill "$launcher"; wait "$launcher" 2>/dev/null || true; launcher=""
}

primary_addr() {
    "$bin/client" --config "$work/config.json" status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(next(n["addr"] for n in s["nodes"] if n["primary"]))'
}

# bench_cell SYSTEM NODES TARGET MODE C ARGS...: one cell, appended to $runs.
bench_cell() {
    local system=$1 n=$2 target=$3 mode=$4 c=$5 line
    shift 5
    printf '%s nodes=%s target=%s mode=%s concurrency=%s ... ' "$system" "$n" "$target" "$mode" "$c" >&2
    line=$("$bin/client" --config "$work/config.json" "$@" --json bench --system "$system" \
        --mode "$mode" --concurrency "$c" --duration "$SECONDS_EACH")
    echo "$line" | python3 -c '
import json, sys
r = json.load(sys.stdin)
r.update(system=sys.argv[1], nodes=int(sys.argv[2]), target=sys.argv[3])
print(json.dumps(r))
print("%.0f/s p99 %d us" % (r["ops_per_s"], r["latency_us"]["p99"]), file=sys.stderr)' "$system" "$n" "$target" >> "$runs"
}

# until_answers SYSTEM ADDR: waits (60 s at most) until a ping to ADDR gets through.
until_answers() {
    local deadline=$((SECONDS + 60))
    until "$bin/client" --json bench --system "$1" --mode ping --concurrency 1 --duration 0.2 \
        --server "$2" 2>/dev/null | grep -q '"errors":{}'; do
        if ((SECONDS > deadline)); then echo "$1 at $2 did not answer within 60 s" >&2; exit 1; fi
        sleep 0.2
    done
}

runs=$work/runs.jsonl
: > "$runs"
for n in $NODES; do
    start_cluster "$n"
    for target in $TARGETS; do
        if [ "$target" = primary ]; then servers=(--server "$(primary_addr)"); else servers=(); fi
        for mode in $MODES; do
            for c in $CONCURRENCY; do
                bench_cell sequencer "$n" "$target" "$mode" "$c" "${servers[@]}"
            done
        done
    done
    stop_cluster
done

for other in $OTHERS; do
    command -v "$other" > /dev/null || continue
    case $other in
    etcd)
        for n in $NODES; do
            read -r -a ports <<< "$(free_ports $((2 * n)))"
            cluster="" servers=()
            for ((i = 0; i < n; i++)); do cluster+="e$i=http://127.0.0.1:${ports[2*i+1]},"; done
            for ((i = 0; i < n; i++)); do
                etcd --name "e$i" --data-dir "$work/etcd/e$i" --logger zap --log-level error \
                    --listen-client-urls "http://127.0.0.1:${ports[2*i]}" \
                    --advertise-client-urls "http://127.0.0.1:${ports[2*i]}" \
                    --listen-peer-urls "http://127.0.0.1:${ports[2*i+1]}" \
                    --initial-advertise-peer-urls "http://127.0.0.1:${ports[2*i+1]}" \
                    --initial-cluster "${cluster%,}" --initial-cluster-state new \
                    > "$work/etcd-$i.log" 2>&1 &
                others+=($!)
                servers+=(--server "127.0.0.1:${ports[2*i]}")
            done
            until_answers etcd "127.0.0.1:${ports[0]}"
            for mode in get-id ping; do
                for c in $CONCURRENCY; do bench_cell etcd "$n" spread "$mode" "$c" "${servers[@]}"; done
            done
            stop_others
            rm -rf "$work/etcd"
        done
        ;;
    redis-server)
        read -r -a ports <<< "$(free_ports 1)"
        redis-server --port "${ports[0]}" --bind 127.0.0.1 --save "" --appendonly no \
            > "$work/redis.log" 2>&1 &
        others+=($!)
        until_answers redis "127.0.0.1:${ports[0]}"
        for mode in get-id ping; do
            for c in $CONCURRENCY; do bench_cell redis 1 spread "$mode" "$c" --server "127.0.0.1:${ports[0]}"; done
        done
        stop_others
        ;;
    esac
done

# Memory and disk after MEMORY_IDS ids on 3 nodes (GetIds of 1000, 64 callers).
start_cluster 3
"$bin/client" --config "$work/config.json" --json bench --mode get-ids --count 1000 \
    --concurrency 64 --duration 1 > /dev/null
until [ "$("$bin/client" --config "$work/config.json" current-id)" -ge "$MEMORY_IDS" ]; do
    "$bin/client" --config "$work/config.json" --json bench --mode get-ids --count 1000 \
        --concurrency 64 --duration 5 > /dev/null
done
memory=$(for pid in $(pgrep -P "$launcher"); do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    echo "{\"pid\": $pid, \"rss_kib\": $rss}"
done | python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin]))')
disk=$(for d in "$work"/data/node-*; do echo "{\"dir\": \"$(basename "$d")\", \"bytes\": $(du -sb "$d" | cut -f1)}"; done \
    | python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin]))')
ids=$("$bin/client" --config "$work/config.json" current-id)
stop_cluster

python3 - "$runs" "$out/latest.json" "$SECONDS_EACH" "$ids" "$memory" "$disk" <<'EOF'
import json, os, platform, sys, time
runs_file, out, seconds, ids, memory, disk = sys.argv[1:]
doc = {
    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "machine": {"cores": os.cpu_count(), "system": platform.platform()},
    "seconds_each": float(seconds),
    "runs": [json.loads(l) for l in open(runs_file) if l.strip()],
    "memory_after_ids": {"ids": int(ids), "nodes": json.loads(memory), "data_dirs": json.loads(disk)},
}
json.dump(doc, open(out, "w"), indent=1)
print(out)
EOF
"$bin/chart" "$out/latest.json" "$out/latest.svg"
