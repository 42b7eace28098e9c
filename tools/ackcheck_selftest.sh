#!/usr/bin/env bash
# Self-test of tools/ackcheck.py against plain `tandem serve` exports: it passes on a healthy
# server, rides out a kill -9 and restart of the server, and catches a loss when verification
# runs on an older copy of the disk.
#   tools/ackcheck_selftest.sh [path/to/tandem]
set -euo pipefail
tandem=${1:-$(dirname "$0")/../target/release/tandem}
ackcheck=$(cd "$(dirname "$0")" && pwd)/ackcheck.py
[ -x "$tandem" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
cleanup() {
    for p in $(jobs -p); do kill -9 "$p" 2>/dev/null || true; done  # only our own children
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# start_server NAME FILE PORT: serves FILE on PORT, sets $server_pid, waits until it listens.
start_server() {
    "$tandem" serve --disk "$2" --size 64M --listen "127.0.0.1:$3" 2>"$dir/$1.log" &
    server_pid=$!
    for _ in $(seq 100); do
        grep -q "serving" "$dir/$1.log" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "server $1 did not start:" >&2; cat "$dir/$1.log" >&2; return 1
}

# jget FILE EXPR: evaluates a Python expression over the JSON summary `r`.
jget() {
    /usr/bin/python3 -c 'import json, sys; r = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))' "$1" "$2"
}

failures=0
# verdict NAME JSON CONDITION RC WANTED-RC: PASS when the checker exited with WANTED-RC and the
# condition (a Python expression over its JSON summary) holds.
verdict() {
    local name=$1 json=$2 cond=$3 rc=$4 want_rc=$5
    if [ "$rc" = "$want_rc" ] && [ -s "$json" ] && [ "$(jget "$json" "$cond")" = True ]; then
        echo "PASS $name: $(tail -1 "$dir/$name.err")"
    else
        echo "FAIL $name (exit $rc, wanted $want_rc; condition: $cond)"
        [ -s "$json" ] && cat "$json"
        sed 's/^/    /' "$dir/$name.err" 2>/dev/null | tail -20
        failures=$((failures + 1))
    fi
}

port=$(free_port)
dead_port=$(free_port)
U="nbd://127.0.0.1:$port/"
DEAD="nbd://127.0.0.1:$dead_port/"

# 1. A healthy server: every acknowledged write reads back.
start_server a "$dir/a.img" "$port"
rc=0
"$ackcheck" --uri "$U" --blocks 2048 --duration 3 --seed 1 --json "$dir/basic.json" \
    --log "$dir/basic.log" 2>"$dir/basic.err" || rc=$?
verdict basic "$dir/basic.json" 'r["ok"] and r["acked"] > 0 and r["lost"] == r["corrupt"] == 0' \
    "$rc" 0

# 2. Reconnect: the first URI never answers; the server dies (kill -9) and comes back on the
#    same file and port. Acknowledged writes are in the file's page cache, so none is lost.
rc=0
"$ackcheck" --uri "$DEAD" --uri "$U" --blocks 2048 --duration 4 --reconnect-timeout 15 \
    --json "$dir/reconnect.json" 2>"$dir/reconnect.err" &
checker=$!
sleep 1.2
kill -9 "$server_pid"
{ wait "$server_pid"; } 2>/dev/null || true
sleep 1
start_server a "$dir/a.img" "$port"
wait "$checker" || rc=$?
verdict reconnect "$dir/reconnect.json" \
    'r["ok"] and r["reconnects"] >= 1 and r["outages_ms"] and r["max_outage_ms"] >= 900' "$rc" 0

# 3. Mutation: verify on a copy of the disk taken mid-run, as if a failover went to a node that
#    missed the later writes. The checker must report lost blocks and exit 1.
copy_port=$(free_port)
rc=0
"$ackcheck" --uri "$U" --blocks 256 --stop-file "$dir/stop" \
    --verify-uri "nbd://127.0.0.1:$copy_port/" --json "$dir/mutation.json" 2>"$dir/mutation.err" &
checker=$!
sleep 0.8
cp --sparse=always "$dir/a.img" "$dir/copy.img"
start_server copy "$dir/copy.img" "$copy_port"
sleep 0.8
touch "$dir/stop"
wait "$checker" || rc=$?
verdict mutation "$dir/mutation.json" 'not r["ok"] and r["lost"] > 0 and r["acked"] > 0' "$rc" 1

# 4. SIGTERM stops the writes like the stop file, then verifies.
rc=0
"$ackcheck" --uri "$U" --blocks 1024 --stop-file "$dir/never" --json "$dir/sigterm.json" \
    2>"$dir/sigterm.err" &
checker=$!
sleep 1
kill -TERM "$checker"
wait "$checker" || rc=$?
verdict sigterm "$dir/sigterm.json" 'r["ok"] and r["acked"] > 0' "$rc" 0

# 5. Nothing to connect to at start: an infrastructure error (exit 2), not a verdict.
rc=0
"$ackcheck" --uri "$DEAD" --blocks 16 --duration 1 --json "$dir/noserver.json" \
    2>"$dir/noserver.err" || rc=$?
verdict noserver "$dir/noserver.json" 'not r["ok"] and r["error"] is not None' "$rc" 2

# 6. --log-issue-times: each acknowledgement line gains the time its write was issued, which
#    is never after the acknowledgement.
rc=0
"$ackcheck" --uri "$U" --blocks 256 --duration 1 --log "$dir/issued.log" --log-issue-times \
    --json "$dir/issued.json" 2>"$dir/issued.err" || rc=$?
/usr/bin/python3 -c 'import json, sys
rows = [l.split() for l in open(sys.argv[1])]
ok = rows and all(len(r) == 5 and float(r[4]) <= float(r[0]) for r in rows)
r = json.load(open(sys.argv[2])); r["log_ok"] = bool(ok) and len(rows) == r["acked"]
json.dump(r, open(sys.argv[2], "w"))' "$dir/issued.log" "$dir/issued.json" || true
verdict issued "$dir/issued.json" 'r["ok"] and r["log_ok"]' "$rc" 0

if [ "$failures" -eq 0 ]; then echo "ackcheck self-test: all cases passed"; else
    echo "ackcheck self-test: $failures case(s) failed"; exit 1; fi
