#!/bin/sh
# /test.sh of the guest in tests/kernel_guest.rs: ext4 on /dev/nbd0, attached with
# `tandem attach --device`, while the host kills or stops the primary.
#
# Console protocol: after mkfs and a first set of files the guest prints "GUEST: WRITING
# round N" and keeps writing files until the host answers "again" (next round) or "done";
# then it writes more, reads every file back from the device and prints "GUEST: PASS ..." or
# "GUEST: FAIL ...".
say() { echo "GUEST: $*"; }
fail() {
    say "FAIL: $*"
    dmesg | grep -i -E 'nbd|ext4|i/o error|blk_' | tail -40 | sed 's/^/GUEST: dmesg: /'
    exit 1
}
# FILE KIB: random data, fsync'ed so that an IO error shows up in dd's status.
write() { dd if=/dev/urandom of="$1" bs=4k count=$(($2 / 4)) conv=fsync 2>/dev/null; }

[ -b /dev/nbd0 ] || fail "no /dev/nbd0 after loading nbd.ko"
RUST_LOG=info tandem attach -c /config.toml --device /dev/nbd0 &
attach=$!
n=0
while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
    n=$((n + 1))
    [ $n -le 600 ] || fail "/dev/nbd0 not connected after 60 s"
    kill -0 $attach 2>/dev/null || fail "tandem attach exited"
    sleep 0.1
done
say "connected: $(cat /sys/block/nbd0/size) sectors, timeout $(cat /sys/block/nbd0/queue/io_timeout 2>/dev/null) ms"
mkfs.ext4 -q -F /dev/nbd0 || fail "mkfs.ext4"
mount -t ext4 /dev/nbd0 /mnt || fail "mount"

for i in 1 2 3 4 5 6 7 8; do write /mnt/before$i 1024 || fail "write before$i"; done
md5sum /mnt/before* >/tmp/sums

# Rounds of writing while the host breaks the primary; no write may fail. The host answers
# "again" (another round) or "done".
round=0
while :; do
    round=$((round + 1))
    rm -f /tmp/stop
    (
        i=0
        while [ ! -e /tmp/stop ]; do
            i=$((i + 1))
            # A round rewrites 48 files of 256 KiB in turn, so however fast the guest runs,
            # the 64 MiB volume never fills up (ENOSPC would look like a lost write).
            f=/mnt/round${round}_$(((i - 1) % 48 + 1))
            if write $f 256; then
                grep -v " $f\$" /tmp/sums >/tmp/sums.new
                md5sum $f >>/tmp/sums.new
                mv /tmp/sums.new /tmp/sums
            else
                say "write $f failed"
                touch /tmp/write-error
            fi
        done
        echo $i >/tmp/written
    ) &
    writer=$!
    say "WRITING round $round"
    read -t 150 answer || answer=
    touch /tmp/stop
    wait $writer
    [ ! -e /tmp/write-error ] || fail "a write failed in round $round"
    say "round $round: $(cat /tmp/written) file writes"
    case $answer in
    again) ;;
    done) break ;;
    *) fail "no word from the host (got '$answer')" ;;
    esac
done

for i in 1 2 3 4; do write /mnt/after$i 1024 || fail "write after$i"; done
md5sum /mnt/after* >>/tmp/sums

# Read everything back from the device (the new primary), not from the page cache.
umount /mnt || fail "umount"
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 /dev/nbd0 /mnt || fail "remount"
md5sum -c /tmp/sums >/tmp/check 2>&1 || {
    grep -v ': OK$' /tmp/check | sed 's/^/GUEST: /'
    fail "checksums differ after the failover"
}
umount /mnt || fail "final umount"
errors=$(dmesg | grep -c -i -E 'i/o error|ext4-fs error|blk_update_request')
[ "$errors" = 0 ] || fail "$errors IO errors in the kernel log"
dmesg | grep -i nbd | sed 's/^/GUEST: dmesg: /'

kill -TERM $attach
wait $attach
rc=$?
[ $rc = 0 ] || fail "tandem attach exited with $rc"
n=0
while [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
    n=$((n + 1))
    [ $n -le 50 ] || fail "/dev/nbd0 still connected after tandem attach stopped"
    sleep 0.1
done
say "PASS: $(wc -l </tmp/sums) files verified"
