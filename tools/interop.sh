#!/usr/bin/env bash
# Quick interoperability check of `tandem serve` with the NBD clients an operator has:
# starts a server on a temporary sparse file and runs each client against it.
#   tools/interop.sh [path/to/tandem]
set -euo pipefail
tandem=${1:-$(dirname "$0")/../target/release/tandem}
[ -x "$tandem" ] || { echo "build first: cargo build --release" >&2; exit 1; }
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
"$tandem" serve --disk "$dir/disk.img" --size 256M --listen "unix:$dir/nbd.sock" 2>"$dir/log" &
pid=$!
for _ in $(seq 100); do [ -S "$dir/nbd.sock" ] && break; sleep 0.1; done
U="nbd+unix:///?socket=$dir/nbd.sock"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH   # nbdsh needs the system python
step() { printf '%-28s' "$1"; shift; if out=$("$@" 2>&1); then echo ok; else echo FAILED; echo "$out"; exit 1; fi; }
step "nbdinfo"            nbdinfo "$U"
step "qemu-io patterns"   qemu-io -f raw "$U" -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' \
                            -c 'write -z 2M 1M' -c 'read -P 0 2M 1M' -c 'discard 0 1M' -c 'read -P 0 0 1M'
head -c 32M /dev/urandom >"$dir/src.img"
step "nbdcopy in"         nbdcopy --flush "$dir/src.img" "$U"
step "qemu-img compare"   qemu-img compare -f raw -F raw "$dir/src.img" "$U"
step "nbdsh flush"        nbdsh -u "$U" -c 'h.pwrite(b"x"*4096, 0, nbd.CMD_FLAG_FUA); h.flush()'
step "fio crc32c verify"  fio --name=v --ioengine=nbd --uri="$U" --rw=randwrite --bs=4k --size=64M \
                            --iodepth=32 --verify=crc32c --verify_fatal=1 --output=/dev/null
step "nbdinfo --map"      nbdinfo --map "$U"
echo "all clients interoperate"
