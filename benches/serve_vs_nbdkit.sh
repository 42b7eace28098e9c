#!/usr/bin/env bash
# Benchmark `tandem serve` against `nbdkit file` on the same backing file, in the same run,
# with fio's NBD engine. The raw file through fio's io_uring engine (buffered, like both
# servers) is printed beside them as the reference for the storage itself.
# Prints IOPS and MiB/s per workload and the ratio tandem/nbdkit, plus tandem's peak RSS.
#
#   benches/serve_vs_nbdkit.sh [--runtime SECONDS] [--reps N] [--size BYTES] [--engine E]
#
# Runs alternate between servers (nbdkit, tandem, nbdkit, tandem, ...) and the median of the
# repetitions is reported, because this machine is shared and noisy.
set -euo pipefail

runtime=10
reps=3
size=1G
engine=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --runtime) runtime=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
for tool in fio nbdkit python3; do
  command -v "$tool" >/dev/null || { echo "$tool is missing (apt-get install -y fio nbdkit)" >&2; exit 1; }
done
cargo build --release --quiet
tandem=$PWD/target/release/tandem

work=$(mktemp -d /var/tmp/tandem-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

disk=$work/disk.img
# Fill the file so reads hit real blocks, not holes.
fio --name=fill --ioengine=io_uring --filename="$disk" --size="$size" --rw=write --bs=1M \
    --iodepth=8 --end_fsync=1 --output=/dev/null

"$tandem" serve --disk "$disk" --listen "unix:$work/tandem.sock" --engine "$engine" 2>"$work/tandem.log" &
tandem_pid=$!; pids+=("$tandem_pid")
nbdkit -f -U "$work/nbdkit.sock" file file="$disk" 2>"$work/nbdkit.log" &
pids+=("$!")
for s in tandem nbdkit; do
  for _ in $(seq 100); do [ -S "$work/$s.sock" ] && break; sleep 0.1; done
done

# name rw bs iodepth
workloads=(
  "randwrite-4k-qd32 randwrite 4k 32"
  "randread-4k-qd32 randread 4k 32"
  "seqwrite-1m-qd8 write 1M 8"
)

run_fio() { # target-args... ; prints "iops mibps"
  # fio's nbd engine prints to stdout, so the JSON goes to a file.
  fio --output-format=json --output="$work/fio.json" --time_based --runtime="$runtime" \
      --ramp_time=1 --numjobs=1 --name=b "$@" >/dev/null
  python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["write"] if j["write"]["io_bytes"] else j["read"]
print(round(d["iops"]), round(d["bw_bytes"] / 1048576, 1))' "$work/fio.json"
}

median() { python3 -c 'import sys, statistics; v=[float(x) for x in sys.argv[1:]]; print(statistics.median(v))' "$@"; }

printf '%-18s %-8s %12s %10s %10s\n' workload server IOPS MiB/s ratio
for w in "${workloads[@]}"; do
  read -r name rw bs qd <<<"$w"
  common=(--rw="$rw" --bs="$bs" --iodepth="$qd" --size="$size")
  declare -a t_iops=() k_iops=() t_mib=() k_mib=()
  for _ in $(seq "$reps"); do
    read -r i m < <(run_fio --ioengine=nbd --uri="nbd+unix:///?socket=$work/nbdkit.sock" "${common[@]}")
    k_iops+=("$i"); k_mib+=("$m")
    read -r i m < <(run_fio --ioengine=nbd --uri="nbd+unix:///?socket=$work/tandem.sock" "${common[@]}")
    t_iops+=("$i"); t_mib+=("$m")
  done
  read -r r_iops r_mib < <(run_fio --ioengine=io_uring --filename="$disk" "${common[@]}")
  ki=$(median "${k_iops[@]}"); km=$(median "${k_mib[@]}")
  ti=$(median "${t_iops[@]}"); tm=$(median "${t_mib[@]}")
  ratio=$(python3 -c "print(f'{$ti / $ki:.2f}x')")
  printf '%-18s %-8s %12.0f %10.1f %10s\n' "$name" nbdkit "$ki" "$km" ""
  printf '%-18s %-8s %12.0f %10.1f %10s\n' "$name" tandem "$ti" "$tm" "$ratio"
  printf '%-18s %-8s %12.0f %10.1f %10s\n' "$name" raw-file "$r_iops" "$r_mib" "(fio io_uring)"
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$tandem_pid/status")
echo "tandem peak RSS: $((hwm / 1024)) MiB (engine: $(grep -o '[a-z_]* engine' "$work/tandem.log" | head -1))"
