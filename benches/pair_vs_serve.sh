#!/usr/bin/env bash
# Benchmark the replicated pair against `tandem serve` and `nbdkit file`, in one run, on loopback.
#
#   benches/pair_vs_serve.sh [--runtime SECONDS] [--reps N] [--size BYTES]
#
# 1. Initial full resync: a pair (alpha, beta) on a fresh sparse volume, alpha forced primary;
#    the time from `primary --force` until both nodes are Connected/UpToDate with nothing out of
#    sync (status polled every 100 ms), printed as MiB/s, with the resync's own bytes_per_sec.
# 2. Write throughput with fio's NBD engine over TCP loopback, alternating targets (nbdkit,
#    serve, replicated, nbdkit, ...), median of the repetitions: 4 KiB random write QD32,
#    1 MiB sequential write QD8 and 4 KiB random write QD1 (printed as mean latency) against `nbdkit file`, `tandem serve` (each on its own pre-filled
#    file) and the replicated primary (alpha's NBD export, protocol C: every write is on both
#    disks before it is acknowledged). Ratios replicated/serve and replicated/nbdkit. Every
#    workload starts with all four files written back and evicted from the page cache.
# 3. Peak RSS (VmHWM) of both pair nodes over the whole run.
# Everything is stopped with SIGTERM at the end and the exit codes are checked.
set -euo pipefail

runtime=8
reps=3
size=1G
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install -y fio nbdkit)" >&2; exit 1; }
done
cargo build --release --quiet
tandem=$PWD/target/release/tandem
size_bytes=$(python3 -c '
import sys
s = sys.argv[1].strip().upper()
m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
print(int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s))' "$size")

work=$(mktemp -d /var/tmp/tandem-pair-bench.XXXXXX)
declare -A pid=()
cleanup() {
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A port below the ephemeral range, never handed out twice in this run (the used ones are kept
# in a file because callers run in subshells).
free_port() {
  python3 - "$work/ports" <<'PY'
import random, socket, sys
path = sys.argv[1]
try:
    used = set(open(path).read().split())
except FileNotFoundError:
    used = set()
while True:
    p = random.randrange(20000, 32000)
    if str(p) in used:
        continue
    try:
        socket.socket().bind(("127.0.0.1", p))
    except OSError:
        continue
    open(path, "a").write(f"{p}\n")
    print(p)
    break
PY
}

show_logs() {
  for n in alpha beta serve nbdkit; do
    [ -s "$work/$n.log" ] || continue
    echo "---- $n.log (last 40 lines) ----" >&2
    tail -n 40 "$work/$n.log" >&2
  done
}
die() { echo "error: $*" >&2; show_logs; exit 1; }

# tandem CMD NODE ARGS...: a pair command; on failure, its output and the node logs.
tctl() {
  local cmd=$1 node=$2; shift 2
  local out
  if ! out=$("$tandem" "$cmd" -c "$cfg" -n "$node" "$@" 2>&1); then
    die "tandem $cmd -n $node $* failed: $out"
  fi
  printf '%s' "$out"
}

alive() { # NAME: the process is still running
  kill -0 "${pid[$1]}" 2>/dev/null || die "$1 exited early"
}

wait_tcp() { # NAME PORT
  for _ in $(seq 200); do
    alive "$1"
    python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$2" 2>/dev/null && return
    sleep 0.05
  done
  die "$1 does not listen on 127.0.0.1:$2"
}

# ---------------------------------------------------------------------------------------------
# The pair.
declare -A nbd_port=()
{
  printf '[resource]\nname = "r0"\n\n'
  for n in alpha beta; do
    nbd_port[$n]=$(free_port)
    printf '[[node]]\nname = "%s"\ndisk = "%s/%s.img"\nmeta = "%s/%s.meta"\n' "$n" "$work" "$n" "$work" "$n"
    printf 'replication = "127.0.0.1:%s"\nnbd = "127.0.0.1:%s"\ncontrol = "%s/%s.sock"\n\n' \
      "$(free_port)" "${nbd_port[$n]}" "$work" "$n"
  done
  printf '[net]\nsecret_file = "%s/secret"\nconnect_interval = "100ms"\n\n' "$work"
  printf '[failover]\nfencing = "none"\n'
} >"$work/r0.toml"
echo "bench-secret" >"$work/secret"
cfg=$work/r0.toml

for n in alpha beta; do
  tctl create-md "$n" --size "$size" >/dev/null
done
for n in alpha beta; do
  RUST_LOG=info "$tandem" up -c "$cfg" -n "$n" </dev/null 2>"$work/$n.log" &
  pid[$n]=$!
done
for n in alpha beta; do
  for _ in $(seq 200); do
    alive "$n"
    "$tandem" status -c "$cfg" -n "$n" --json >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$tandem" status -c "$cfg" -n "$n" --json >/dev/null 2>&1 || die "$n: control socket never answered"
done

# Let the two nodes find each other before the clock starts, so the figure is the resync alone.
for _ in $(seq 300); do
  c=$(tctl status alpha --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["connection"])')
  [ "$c" = Connected ] && break
  sleep 0.1
done
[ "$c" = Connected ] || die "alpha never connected to beta (connection: $c)"

# Initial full resync. alpha's file is sparse, so the sync source reads zeros; that is still a
# full data copy here (tandem reads and ships every block of the volume; it does not skip
# holes), so this measures the real resync path, minus the source disk's read cost of
# allocated blocks.
# Dirty data the machine wrote before this run (an earlier benchmark, a build) would otherwise
# be written back during the resync and throttle it; start from a clean page cache.
sync
echo "== initial full resync of $size (alpha --force primary, beta SyncTarget) =="
python3 - "$tandem" "$cfg" "$size_bytes" "$work/resync.out" <<'EOF' || die "initial resync did not finish"
import json, subprocess, sys, time
tandem, cfg, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def status(node):
    r = subprocess.run([tandem, "status", "-c", cfg, "-n", node, "--json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"tandem status -n {node} failed: {r.stdout}{r.stderr}")
    return json.loads(r.stdout)

def in_sync(s):
    return (s["connection"] == "Connected" and s["disk"] == "UpToDate"
            and (s["peer"] or {}).get("disk") == "UpToDate" and s["out_of_sync_bytes"] == 0)

t0 = time.monotonic()
r = subprocess.run([tandem, "primary", "-c", cfg, "-n", "alpha", "--force"],
                   capture_output=True, text=True)
if r.returncode != 0:
    sys.exit(f"tandem primary --force failed: {r.stdout}{r.stderr}")
last_rate, last_done, deadline = None, None, t0 + 600
while True:
    now = time.monotonic()
    a, b = status("alpha"), status("beta")
    for s in (a, b):
        if s.get("resync"):
            last_rate, last_done = s["resync"]["bytes_per_sec"], s["resync"]["done_bytes"]
    if in_sync(a) and in_sync(b):
        break
    if now > deadline:
        sys.exit(f"timed out; alpha {json.dumps(a)}\nbeta {json.dumps(b)}")
    time.sleep(0.1)
secs = now - t0
mib = size / 1048576
line = f"resync: {mib:.0f} MiB in {secs:.2f} s = {mib / secs:.0f} MiB/s (promotion to both UpToDate, 100 ms polling)"
print(line)
if last_rate is not None:
    print(f"resync: last bytes_per_sec reported by status: {last_rate / 1048576:.0f} MiB/s"
          f" (at {last_done / 1048576:.0f} of {mib:.0f} MiB)")
else:
    print("resync: status never showed a resync in progress (finished between two polls)")
open(out, "w").write(f"{mib / secs:.1f}\n")
EOF
resync_mibps=$(cat "$work/resync.out")

# ---------------------------------------------------------------------------------------------
# The unreplicated references, each on its own pre-filled file so writes overwrite allocated
# blocks.
for s in serve nbdkit; do
  fio --name=fill --ioengine=io_uring --filename="$work/$s.img" --size="$size" --rw=write --bs=1M \
      --iodepth=8 --end_fsync=1 --output=/dev/null
done
# alpha's file is still sparse (the resync wrote beta only). Fill it through the primary, so
# the replicated target too overwrites allocated blocks on both nodes rather than allocating.
replicated_uri="nbd://127.0.0.1:${nbd_port[alpha]}/r0"
fio --name=fill --ioengine=nbd --uri="$replicated_uri" --size="$size" --rw=write --bs=1M \
    --iodepth=8 --end_fsync=1 --output-format=json --output="$work/fill.json" >/dev/null \
  || die "filling the replicated volume through $replicated_uri failed"

serve_port=$(free_port)
"$tandem" serve --disk "$work/serve.img" --listen "127.0.0.1:$serve_port" 2>"$work/serve.log" &
pid[serve]=$!
nbdkit_port=$(free_port)
nbdkit -f -i 127.0.0.1 -p "$nbdkit_port" file file="$work/nbdkit.img" 2>"$work/nbdkit.log" &
pid[nbdkit]=$!
wait_tcp serve "$serve_port"
wait_tcp nbdkit "$nbdkit_port"

declare -A uri=(
  [nbdkit]="nbd://127.0.0.1:$nbdkit_port/"
  [serve]="nbd://127.0.0.1:$serve_port/"
  [replicated]="$replicated_uri"
)
targets=(nbdkit serve replicated)

# name rw bs iodepth
workloads=(
  "randwrite-4k-qd32 randwrite 4k 32"
  "seqwrite-1m-qd8 write 1M 8"
  "randwrite-4k-qd1 randwrite 4k 1"
)

run_fio() { # TARGET fio-args... ; prints "iops mibps"
  local t=$1; shift
  # fio's nbd engine prints to stdout, so the JSON goes to a file.
  fio --output-format=json --output="$work/fio.json" --time_based --runtime="$runtime" \
      --ramp_time=1 --numjobs=1 --name=b --ioengine=nbd --uri="${uri[$t]}" "$@" >/dev/null \
    || die "fio against $t (${uri[$t]}) failed"
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
if j["error"]:
    sys.exit("fio error %d" % j["error"])
d = j["write"]
print(round(d["iops"]), round(d["bw_bytes"] / 1048576, 1))' "$work/fio.json" || die "fio against $t reported an error"
}

# Each target's file starts a workload with the same page-cache state (written back and
# evicted), so the comparison measures the servers, not the files' histories: the resync
# source's file was read while still sparse.
settle_caches() { python3 benches/settle_caches.py "$work"/*.img; }

median() { python3 -c 'import sys, statistics; print(statistics.median(float(x) for x in sys.argv[1:]))' "$@"; }

echo
echo "== fio --ioengine=nbd over TCP loopback, median of $reps x ${runtime}s, targets alternating =="
printf '%-18s %-11s %10s %10s %12s %14s\n' workload target IOPS MiB/s repl/serve repl/nbdkit
for w in "${workloads[@]}"; do
  read -r name rw bs qd <<<"$w"
  declare -A iops_l=() mib_l=()
  settle_caches
  for _ in $(seq "$reps"); do
    for t in "${targets[@]}"; do
      read -r i m < <(run_fio "$t" --rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size")
      iops_l[$t]="${iops_l[$t]:-} $i"; mib_l[$t]="${mib_l[$t]:-} $m"
    done
    alive alpha; alive beta
  done
  declare -A mi=() mm=()
  for t in "${targets[@]}"; do
    # shellcheck disable=SC2086 # word splitting of the per-rep lists is intended
    mi[$t]=$(median ${iops_l[$t]}); mm[$t]=$(median ${mib_l[$t]})
  done
  rs=$(python3 -c "print(f'{${mi[replicated]} / ${mi[serve]}:.2f}x')")
  rn=$(python3 -c "print(f'{${mi[replicated]} / ${mi[nbdkit]}:.2f}x')")
  for t in "${targets[@]}"; do
    if [ "$t" = replicated ]; then
      printf '%-18s %-11s %10.0f %10.1f %12s %14s\n' "$name" "$t" "${mi[$t]}" "${mm[$t]}" "$rs" "$rn"
    else
      printf '%-18s %-11s %10.0f %10.1f\n' "$name" "$t" "${mi[$t]}" "${mm[$t]}"
    fi
  done
  [ "$name" = randwrite-4k-qd32 ] && rand_ratio=${rs%x}
  if [ "$qd" = 1 ]; then
    # One request at a time: the mean time per write is the inverse of the rate.
    python3 -c "
s, r, n = ${mi[serve]}, ${mi[replicated]}, ${mi[nbdkit]}
print(f'QD1 mean write latency: nbdkit {1e6 / n:.0f} us, serve {1e6 / s:.0f} us, replicated {1e6 / r:.0f} us (serve + {1e6 / r - 1e6 / s:.0f} us)')"
  fi
  unset iops_l mib_l mi mm
done

# ---------------------------------------------------------------------------------------------
echo
for n in alpha beta; do alive "$n"; done
hwm_a=$(awk '/VmHWM/ {print $2}' "/proc/${pid[alpha]}/status")
hwm_b=$(awk '/VmHWM/ {print $2}' "/proc/${pid[beta]}/status")
hwm_s=$(awk '/VmHWM/ {print $2}' "/proc/${pid[serve]}/status")
echo "peak RSS (VmHWM): alpha (primary) $((hwm_a / 1024)) MiB, beta (secondary) $((hwm_b / 1024)) MiB, tandem serve $((hwm_s / 1024)) MiB"
engine=$(tctl status alpha --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("engine"))')
echo "pair storage engine: $engine; $(grep -o '[a-z_]* engine' "$work/serve.log" | head -1 || true) for serve"

echo
echo "targets: resync >= 200 MiB/s: $(python3 -c "print('met' if $resync_mibps >= 200 else 'MISSED')") ($resync_mibps MiB/s);" \
  "replicated random write >= 0.6x serve: $(python3 -c "print('met' if $rand_ratio >= 0.6 else 'MISSED')") (${rand_ratio}x);" \
  "peak RSS < 128 MiB: $( [ $((hwm_a > hwm_b ? hwm_a : hwm_b)) -lt $((128 * 1024)) ] && echo met || echo MISSED)"

# ---------------------------------------------------------------------------------------------
# Stop everything with SIGTERM and check that each process exits cleanly.
status_all=0
for n in nbdkit serve beta alpha; do
  kill -TERM "${pid[$n]}" 2>/dev/null || true
  rc=0
  wait "${pid[$n]}" || rc=$?
  unset "pid[$n]"
  if [ "$rc" -ne 0 ]; then
    echo "warning: $n exited with status $rc after SIGTERM" >&2
    status_all=1
  fi
done
[ "$status_all" -eq 0 ] || show_logs
