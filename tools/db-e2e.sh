#!/usr/bin/env bash
# Databases end to end through a failover and a failback.
#
#   tools/db-e2e.sh                     # everything, with target/debug/tandem
#   TANDEM=path/to/tandem tools/db-e2e.sh
#
# Self-contained: in a temporary directory it starts a witness and a pair (alpha, beta) on free
# loopback ports, makes alpha primary, and starts `tandem attach`. The attach endpoint becomes a
# file through nbdfuse, a block device through losetup, and an ext4 filesystem, mounted. Then,
# for each database (PostgreSQL 15, then SQLite):
#   1. a load client inserts numbered rows, one row per committed transaction, on one
#      long-lived connection, logging each commit it saw succeed (outside the volume);
#   2. in the middle of the load the primary is killed with kill -9; the load goes on through
#      the failover for a few seconds, then stops; every logged row must be in the database
#      (SQLite: PRAGMA integrity_check = ok too) and the longest gap between consecutive logged
#      commits is the stall the database saw;
#   3. the killed node is restarted, rejoins as secondary and resyncs; more load, with
#      `tandem switchover` back to it in the middle; verify again.
# PostgreSQL keeps running during the SQLite part. At the end (full mode) PostgreSQL is stopped,
# the filesystem unmounted and checked with e2fsck -fn, the two nodes' backing files compared,
# and everything remounted and verified again from disk.
# A summary line per database and phase; the exit status is non-zero on any missing row,
# integrity failure, or (unless DB_E2E_STRICT=0) any error a database or the kernel saw.
#
# Environment (all optional):
#   TANDEM               tandem binary (default: target/debug/tandem)
#   DB_E2E_DBS           "pg sqlite" (default) or a subset
#   DB_E2E_MODE          full (default) | failover: only the kill -9 part, then a line
#                        "RESULT db=pg max_gap_ms=… event_gap_ms=…" per database (for benches)
#   DB_E2E_SIZE          volume size (default 256M)
#   DB_E2E_PING_TIMEOUT  [net] ping_timeout (default 1s)
#   DB_E2E_LEASE         [failover] lease (default 2s)
#   DB_E2E_BEFORE        seconds of load before the kill / switchover (default 3)
#   DB_E2E_AFTER         seconds of load after the new primary is up / the switchover (default 3)
#   DB_E2E_SQLITE_JOURNAL  wal (default) | delete
#   DB_E2E_STRICT        1 (default): also fail when a client saw an error, PostgreSQL crashed,
#                        or the kernel logged an I/O error on the loop device
#   DB_E2E_KEEP          1: keep the work directory (logs) afterwards
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TANDEM=${TANDEM:-$ROOT/target/debug/tandem}
DBS=${DB_E2E_DBS:-pg sqlite}
MODE=${DB_E2E_MODE:-full}
SIZE=${DB_E2E_SIZE:-256M}
PING_TIMEOUT=${DB_E2E_PING_TIMEOUT:-1s}
LEASE=${DB_E2E_LEASE:-2s}
BEFORE=${DB_E2E_BEFORE:-3}
AFTER=${DB_E2E_AFTER:-3}
JOURNAL=${DB_E2E_SQLITE_JOURNAL:-wal}
STRICT=${DB_E2E_STRICT:-1}
KEEP=${DB_E2E_KEEP:-0}
PY=/usr/bin/python3
LOAD="$PY $ROOT/tools/db/dbload.py"
PGBIN=/usr/lib/postgresql/15/bin

[ -x "$TANDEM" ] || { echo "no tandem binary at $TANDEM (cargo build, or set TANDEM)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "needs root (losetup, mount)" >&2; exit 1; }
case $MODE in full | failover) ;; *) echo "DB_E2E_MODE must be full or failover" >&2; exit 2 ;; esac
for c in nbdfuse losetup mkfs.ext4 e2fsck fusermount3 runuser psql "$PGBIN/initdb" "$PGBIN/pg_ctl"; do
  command -v "$c" >/dev/null || { echo "missing: $c" >&2; exit 1; }
done

W=$(mktemp -d /tmp/tandem-db.XXXXXX)
chmod 755 "$W"
CFG=$W/r0.toml
MNT=$W/fuse       # nbdfuse mount point; the image is $MNT/nbd
FS=$W/fs          # the ext4 filesystem
PGDATA=$FS/pgdata
PGSOCK=$W/pgsock
SQLITE_DB=$FS/sqlite/load.db
declare -A PID=()  # tandem nodes
WITNESS_PID= ATTACH_PID= FUSE_PID= LOOPDEV= MOUNTED=0 PG_STARTED=0 LOAD_PID=
FINDINGS=()        # errors a database or the kernel saw (fail in strict mode)
FAILURES=()        # missing rows, integrity failures
DMESG0=$(dmesg 2>/dev/null | wc -l || echo 0)
T0=$(date +%s)

say() { printf '[%s +%3ss] %s\n' "$(date +%T.%3N)" $(($(date +%s) - T0)) "$*"; }
die() { say "FAILED: $*"; exit 1; }
now_ms() { date +%s%3N; }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT
  [ -n "$LOAD_PID" ] && { kill "$LOAD_PID" 2>/dev/null; wait "$LOAD_PID" 2>/dev/null; }
  if [ "$PG_STARTED" = 1 ] && [ -f "$PGDATA/postmaster.pid" ]; then
    (cd /tmp && timeout 30 runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1)
    [ -f "$PGDATA/postmaster.pid" ] && kill -9 "$(head -1 "$PGDATA/postmaster.pid")" 2>/dev/null
  fi
  if [ "$MOUNTED" = 1 ]; then
    timeout 30 umount "$FS" 2>/dev/null || umount -l "$FS"
  fi
  [ -n "$LOOPDEV" ] && losetup -d "$LOOPDEV"
  if [ -n "$FUSE_PID" ]; then
    fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -uz "$MNT" 2>/dev/null
    kill "$FUSE_PID" 2>/dev/null; wait "$FUSE_PID" 2>/dev/null
  fi
  for p in "$ATTACH_PID" "${PID[@]}" "$WITNESS_PID"; do
    [ -n "$p" ] && { kill -9 "$p" 2>/dev/null; wait "$p" 2>/dev/null; }
  done
  if [ "$rc" != 0 ]; then
    echo "---- logs (exit $rc; work directory $W) ----"
    for f in alpha.log beta.log attach.log witness.log pg.log fuse.log "$W"/*.client.log; do
      f=${f#"$W"/}
      [ -s "$W/$f" ] && { echo "== $f (last 40 lines)"; tail -n 40 "$W/$f"; }
    done
    echo "== kernel messages during the run"
    dmesg 2>/dev/null | tail -n +$((DMESG0 + 1)) | grep -E "loop|EXT4|I/O error|fuse" | tail -n 40
  fi
  if [ "$KEEP" = 1 ]; then echo "work directory kept: $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- the pair ------------------------------------------------------------------------------

# Free ports below the kernel's ephemeral range, so outgoing connections cannot take them.
read -r P_WIT P_AREP P_ANBD P_BREP P_BNBD P_ATT P_PG < <($PY - <<'EOF'
import random, socket
ports = set()
while len(ports) < 7:
    p = random.randint(20000, 31999)
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            continue
    ports.add(p)
print(*ports)
EOF
)

echo "db-e2e-secret" >"$W/secret"
chmod 600 "$W/secret"
mkdir -p "$W/witness"
cp "$W/secret" "$W/witness/r0.secret"
{
  echo "[resource]"
  echo "name = \"r0\""
  for n in alpha beta; do
    if [ $n = alpha ]; then rep=$P_AREP nbd=$P_ANBD; else rep=$P_BREP nbd=$P_BNBD; fi
    echo
    echo "[[node]]"
    echo "name = \"$n\""
    echo "disk = \"$W/$n.img\""
    echo "meta = \"$W/$n.meta\""
    echo "replication = \"127.0.0.1:$rep\""
    echo "nbd = \"127.0.0.1:$nbd\""
    echo "control = \"$W/$n.sock\""
  done
  echo
  echo "[net]"
  echo "secret_file = \"$W/secret\""
  echo "ping_timeout = \"$PING_TIMEOUT\""
  echo
  echo "[failover]"
  echo "fencing = \"witness\""
  echo "witness = \"127.0.0.1:$P_WIT\""
  echo "lease = \"$LEASE\""
} >"$CFG"

tandem() { "$TANDEM" "$1" -c "$CFG" -n "$2" "${@:3}"; }

# Evaluate a Python expression over node's `status --json` (as s).
status_is() {
  local out
  out=$(tandem status "$1" --json 2>/dev/null) || return 1
  $PY -c 'import json,sys; s=json.loads(sys.argv[1]); sys.exit(0 if eval(sys.argv[2]) else 1)' "$out" "$2"
}

wait_for() { # node what secs expr
  local deadline=$(($(date +%s) + $3))
  until status_is "$1" "$4"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "$1: timed out waiting for $2; status: $(tandem status "$1" --json 2>&1)"
    sleep 0.1
  done
}

wait_in_sync() {
  for n in alpha beta; do
    wait_for $n "Connected and UpToDate" "$1" \
      's["connection"]=="Connected" and s["disk"]=="UpToDate" and (s.get("peer") or {}).get("disk")=="UpToDate" and s["out_of_sync_bytes"]==0 and (s.get("failover") or {}).get("peer_outdated") is not True'
  done
}

node_up() {
  RUST_LOG=info "$TANDEM" up -c "$CFG" -n "$1" </dev/null >>"$W/$1.log" 2>&1 &
  PID[$1]=$!
  local i
  for i in $(seq 200); do
    [ -S "$W/$1.sock" ] && tandem status "$1" >/dev/null 2>&1 && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || die "$1 exited at start"
    sleep 0.1
  done
  die "$1 did not come up"
}

kill9() {
  kill -9 "${PID[$1]}"
  wait "${PID[$1]}" 2>/dev/null || true
  unset "PID[$1]"
}

wait_port() { # port what
  local i
  for i in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  die "$2 did not listen on port $1"
}

say "work directory $W; tandem $TANDEM; ping_timeout $PING_TIMEOUT, lease $LEASE"
RUST_LOG=info "$TANDEM" witness --listen "127.0.0.1:$P_WIT" --data "$W/witness" </dev/null >"$W/witness.log" 2>&1 &
WITNESS_PID=$!
wait_port "$P_WIT" witness
for n in alpha beta; do tandem create-md $n --size "$SIZE" >/dev/null; done
node_up alpha
node_up beta
tandem primary alpha --force >/dev/null
wait_in_sync 120
PRIMARY=alpha SECONDARY=beta
say "pair in sync, alpha primary"

RUST_LOG=info "$TANDEM" attach -c "$CFG" --listen "127.0.0.1:$P_ATT" </dev/null >"$W/attach.log" 2>&1 &
ATTACH_PID=$!
wait_port "$P_ATT" attach

# ---- the filesystem ------------------------------------------------------------------------

mkdir -p "$MNT" "$FS"
nbdfuse "$MNT" "nbd://127.0.0.1:$P_ATT/r0" </dev/null >"$W/fuse.log" 2>&1 &
FUSE_PID=$!
for i in $(seq 200); do [ -e "$MNT/nbd" ] && break; sleep 0.1; done
[ -e "$MNT/nbd" ] || die "nbdfuse did not mount"
LOOPDEV=$(losetup --find --show "$MNT/nbd")
mkfs.ext4 -q "$LOOPDEV"
mount "$LOOPDEV" "$FS"
MOUNTED=1
say "ext4 on $LOOPDEV (nbdfuse through attach) mounted on $FS"

# ---- databases -----------------------------------------------------------------------------

pgctl() { (cd /tmp && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA" "$@"); }
pg_running() { pgctl status >/dev/null 2>&1; }
pg_start() {
  pgctl -l "$W/pg.log" -w -t 120 \
    -o "-p $P_PG -k $PGSOCK -c listen_addresses='' -c fsync=on -c synchronous_commit=on" start >/dev/null
  PG_STARTED=1
}

pg_init() {
  mkdir -p "$PGDATA" "$PGSOCK"
  chown postgres:postgres "$PGDATA" "$PGSOCK"
  chmod 700 "$PGDATA"
  touch "$W/pg.log" && chown postgres "$W/pg.log"
  (cd /tmp && runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA" -A trust -U postgres --no-instructions) >"$W/initdb.log" 2>&1 \
    || { cat "$W/initdb.log"; die "initdb"; }
  pg_start
  psql -X -q -h "$PGSOCK" -p "$P_PG" -U postgres -v ON_ERROR_STOP=1 \
    -c "CREATE TABLE t(id bigint PRIMARY KEY, phase int, ts timestamptz DEFAULT now())"
  say "PostgreSQL $(psql -X -At -h "$PGSOCK" -p "$P_PG" -U postgres -c 'SHOW server_version') on the mount: fsync=$(psql -X -At -h "$PGSOCK" -p "$P_PG" -U postgres -c 'SHOW fsync'), synchronous_commit=$(psql -X -At -h "$PGSOCK" -p "$P_PG" -U postgres -c 'SHOW synchronous_commit')"
}

sqlite_init() {
  local mode
  mkdir -p "$(dirname "$SQLITE_DB")"
  mode=$($PY - "$SQLITE_DB" "$JOURNAL" <<'EOF'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
print(c.execute(f"PRAGMA journal_mode={sys.argv[2]}").fetchone()[0])
c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, phase INTEGER, pad TEXT)")
EOF
  )
  say "SQLite $($PY -c 'import sqlite3; print(sqlite3.sqlite_version)') database on the mount: journal_mode=$mode, synchronous=FULL"
}

# load_start DB PHASE FIRST_ID: the client logs commits to $W/DB-PHASE.commits
load_start() {
  local db=$1 phase=$2 first=$3 name=$1-$2
  rm -f "$W/$name.stop"
  : >"$W/$name.commits"
  if [ "$db" = pg ]; then
    $LOAD pg-load --host "$PGSOCK" --port "$P_PG" --first "$first" --phase "$phase" \
      --log "$W/$name.commits" --stop "$W/$name.stop" </dev/null >/dev/null 2>"$W/$name.client.log" &
  else
    $LOAD sqlite-load --db "$SQLITE_DB" --journal "$JOURNAL" --first "$first" --phase "$phase" \
      --log "$W/$name.commits" --stop "$W/$name.stop" </dev/null >/dev/null 2>"$W/$name.client.log" &
  fi
  LOAD_PID=$!
  LOAD_NAME=$name
}

commits() { wc -l <"$W/$1.commits"; }

load_require_running() {
  kill -0 "$LOAD_PID" 2>/dev/null || die "$LOAD_NAME: the load client exited early: $(cat "$W/$LOAD_NAME.client.log")"
  [ "$(commits "$LOAD_NAME")" -gt 0 ] || die "$LOAD_NAME: no commits yet"
}

load_stop() {
  touch "$W/$LOAD_NAME.stop"
  local i
  for i in $(seq 600); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$LOAD_PID" 2>/dev/null; then
    kill -9 "$LOAD_PID"
    FINDINGS+=("$LOAD_NAME: the load client hung (killed after 60 s)")
  fi
  wait "$LOAD_PID" 2>/dev/null || true
  LOAD_PID=
  local last errors
  last=$(tail -n 1 "$W/$LOAD_NAME.client.log")
  errors=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$last")
  if [ "${errors:-x}" != 0 ]; then
    FINDINGS+=("$LOAD_NAME: the client saw errors: $(grep -v 'done:' "$W/$LOAD_NAME.client.log" | head -5 | tr '\n' ' ') [$last]")
  fi
}

# The ids now in the database, into $W/DB.ids.
db_ids() {
  if [ "$1" = pg ]; then
    $LOAD pg-ids --host "$PGSOCK" --port "$P_PG" >"$W/pg.ids" || die "cannot read the ids from PostgreSQL"
  else
    if ! $LOAD sqlite-check --db "$SQLITE_DB" >"$W/sqlite.ids" 2>"$W/sqlite.check"; then
      FAILURES+=("sqlite: $(cat "$W/sqlite.check")")
      say "sqlite: $(cat "$W/sqlite.check")"
    fi
  fi
}

SUMMARY=()
# verify DB PHASE EVENT_MS LABEL
verify() {
  local out
  db_ids "$1"
  if out=$($LOAD verify --log "$W/$1-$2.commits" --ids "$W/$1.ids" --kill-ms "$3" --label "$4"); then :; else
    FAILURES+=("$4: rows missing")
  fi
  say "$out"
  SUMMARY+=("$(head -1 <<<"$out")")
  LAST_VERIFY=$out
}

pg_check_alive() { # after an event: PostgreSQL must still run; restart it if it crashed
  if [ "$PG_STARTED" = 1 ]; then
    if ! pg_running; then
      FINDINGS+=("PostgreSQL was not running after the $2 (log: $(grep -E 'PANIC|FATAL|ERROR' "$W/pg.log" | tail -3 | tr '\n' ' '))")
      say "PostgreSQL is down after the $2: restarting it for crash recovery"
      pg_start
    fi
  fi
}

# The primary dies with kill -9 in the middle of the load.
failover_phase() { # db phase first
  local db=$1 killed=$PRIMARY survivor=$SECONDARY t_kill
  load_start "$db" "$2" "$3"
  sleep "$BEFORE"
  load_require_running
  t_kill=$(now_ms)
  kill9 "$killed"
  say "$db: killed $killed (kill -9) after $(commits "$db-$2") commits"
  wait_for "$survivor" promotion 60 's["role"]=="primary"'
  say "$db: $survivor is primary ($(($(now_ms) - t_kill)) ms after the kill)"
  sleep "$AFTER"
  load_stop
  PRIMARY=$survivor SECONDARY=$killed
  pg_check_alive "$db" "failover"
  verify "$db" "$2" "$t_kill" "$db failover (kill -9 $killed)"
}

# The killed node comes back, resyncs, and a switchover returns the primary role to it.
failback_phase() { # db phase first
  local db=$1 back=$SECONDARY t_sw
  node_up "$back"
  wait_in_sync 120
  say "$db: $back rejoined and is in sync"
  load_start "$db" "$2" "$3"
  sleep "$BEFORE"
  load_require_running
  t_sw=$(now_ms)
  tandem switchover "$back" --to "$back" >"$W/switchover.out" 2>&1 || {
    cat "$W/switchover.out"
    die "switchover --to $back"
  }
  say "$db: switchover to $back done in $(($(now_ms) - t_sw)) ms"
  sleep "$AFTER"
  load_stop
  PRIMARY=$back SECONDARY=$([ "$back" = alpha ] && echo beta || echo alpha)
  pg_check_alive "$db" "switchover"
  verify "$db" "$2" "$t_sw" "$db failback (switchover to $back)"
}

RESULTS=()
for db in $DBS; do
  if [ -z "${PID[$SECONDARY]:-}" ]; then # failover mode: the killed node rejoins first
    node_up "$SECONDARY"
    wait_in_sync 120
  fi
  case $db in
    pg) pg_init ;;
    sqlite) sqlite_init ;;
    *) die "unknown database $db (pg, sqlite)" ;;
  esac
  failover_phase "$db" 1 1
  RESULTS+=("RESULT db=$db $(sed -n '1s/.*\(max_gap_ms=[0-9]*\).*\(event_gap_ms=[0-9]*\).*/\1 \2/p' <<<"$LAST_VERIFY")")
  [ "$MODE" = full ] || continue
  failback_phase "$db" 2 1000001
done

if [ "$MODE" = full ]; then
  # Everything again from disk: stop PostgreSQL as if it crashed (immediate: no shutdown
  # checkpoint, so the restart replays the WAL written through the failovers), unmount, drop the
  # page cache, check the filesystem, compare the two copies, remount, restart, and verify every
  # logged commit of every phase.
  if [ "$PG_STARTED" = 1 ]; then
    pg_running || FINDINGS+=("PostgreSQL was not running at the end")
    pgctl -m immediate -w stop >/dev/null
  fi
  umount "$FS"
  MOUNTED=0
  sync
  echo 3 >/proc/sys/vm/drop_caches
  e2fsck -fn "$LOOPDEV" >"$W/fsck.out" 2>&1 || { cat "$W/fsck.out"; FAILURES+=("e2fsck -fn found errors"); }
  say "e2fsck -fn: $(tail -1 "$W/fsck.out")"
  blockdev --flushbufs "$LOOPDEV" || true
  wait_in_sync 120
  if cmp -s "$W/alpha.img" "$W/beta.img"; then say "alpha's and beta's copies are identical"; else
    FAILURES+=("the two copies differ: $(cmp "$W/alpha.img" "$W/beta.img" 2>&1 | head -1)")
  fi
  mount "$LOOPDEV" "$FS"
  MOUNTED=1
  for db in $DBS; do
    if [ "$db" = pg ]; then
      pg_start
      say "PostgreSQL restarted: $(grep -E 'redo (starts|done)|database system was' "$W/pg.log" | tail -3 | sed 's/^.*LOG: *//' | tr '\n' ';')"
    fi
    db_ids "$db"
    for ph in 1 2; do
      $LOAD verify --log "$W/$db-$ph.commits" --ids "$W/$db.ids" --label "$db phase $ph after remount" >"$W/re.out" \
        || FAILURES+=("$db phase $ph: rows missing after the remount")
      say "$(head -1 "$W/re.out")"
    done
  done
fi

ioerr=$(dmesg 2>/dev/null | tail -n +$((DMESG0 + 1)) | grep -wF "${LOOPDEV#/dev/}" | grep -iE "error|fail|abort" || true)
[ -z "$ioerr" ] || FINDINGS+=("kernel: $(head -5 <<<"$ioerr" | tr '\n' ' ')")

echo "==== summary ($(($(date +%s) - T0)) s) ===="
for l in "${SUMMARY[@]}"; do echo "$l"; done
if [ "$MODE" = failover ]; then for l in "${RESULTS[@]}"; do echo "$l"; done; fi
for f in "${FINDINGS[@]}"; do echo "FINDING: $f"; done
for f in "${FAILURES[@]}"; do echo "FAILURE: $f"; done
if [ ${#FAILURES[@]} -gt 0 ]; then exit 1; fi
if [ "$STRICT" = 1 ] && [ ${#FINDINGS[@]} -gt 0 ]; then exit 1; fi
echo "all databases verified"
