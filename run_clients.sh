#!/usr/bin/env bash
# Concurrent clients from the shell: starts CLIENTS client processes spread round-robin over
# every server of the config, each calling GetId REQUESTS times, then checks that every id is
# unique and that each client saw its ids rise.
#
# Usage: ./run_clients.sh [CLIENTS] [REQUESTS]        (defaults: 8 100)
#   CONFIG=path       config file naming the servers (default: config.json)
#   CLIENT_BIN=path   client binary (default: built with cargo build --release)
# Exits non-zero if any id repeats or any client fails.
set -euo pipefail

clients=${1:-8}
requests=${2:-100}
for v in "$clients" "$requests"; do
  [[ "$v" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 [CLIENTS] [REQUESTS] (positive integers)" >&2; exit 2; }
done
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=${CONFIG:-config.json}

if [[ -z "${CLIENT_BIN:-}" ]]; then
  cargo build --release --quiet --bin client --manifest-path "$here/Cargo.toml"
  CLIENT_BIN="$here/target/release/client"
fi

mapfile -t servers < <("$CLIENT_BIN" --config "$config" servers)
n=${#servers[@]}
(( n > 0 )) || { echo "no servers in $config" >&2; exit 2; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

pids=()
for ((i = 0; i < clients; i++)); do
  # Client i starts at server i mod n and moves on to the others if that one is down.
  args=()
  for ((j = 0; j < n; j++)); do args+=(--server "${servers[$(((i + j) % n))]}"); done
  "$CLIENT_BIN" "${args[@]}" get-id --repeat "$requests" >"$out/$i.ids" 2>"$out/$i.err" &
  pids+=($!)
done

failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    failed=$((failed + 1))
    echo "client $i (first server ${servers[$((i % n))]}) failed: $(tail -n 1 "$out/$i.err")" >&2
  elif ! sort -n -u -c "$out/$i.ids" 2>/dev/null; then
    failed=$((failed + 1))
    echo "client $i saw its ids go down or repeat" >&2
  fi
done

cat "$out"/*.ids | sort -n >"$out/all"
total=$(wc -l <"$out/all")
unique=$(uniq "$out/all" | wc -l)
first=$(head -n 1 "$out/all")
last=$(tail -n 1 "$out/all")
echo "clients=$clients requests=$requests servers=$n ids=$total unique=$unique range=${first:-none}..${last:-none} failed_clients=$failed"

status=0
if (( unique != total )); then
  echo "DUPLICATE ids: $(uniq -d "$out/all" | head -n 10 | tr '\n' ' ')" >&2
  status=1
fi
if (( failed > 0 || total != clients * requests )); then
  echo "expected $((clients * requests)) ids from $clients clients; got $total with $failed failed clients" >&2
  status=1
fi
(( status == 0 )) && echo "OK: all $total ids unique"
exit $status
