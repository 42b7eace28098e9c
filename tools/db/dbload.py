#!/usr/bin/python3
"""Database load and checks for tools/db-e2e.sh.

    dbload.py pg-load     --host SOCKDIR --port N --first ID --phase P --log FILE --stop FILE
    dbload.py sqlite-load --db PATH [--journal wal|delete] --first ID --phase P --log FILE --stop FILE
    dbload.py pg-ids      --host SOCKDIR --port N           (prints every id in the table)
    dbload.py sqlite-check --db PATH                         (integrity_check, then every id)
    dbload.py verify      --log FILE --ids FILE [--kill-ms T] [--label L]

A load client inserts numbered rows, one row per committed transaction, on one long-lived
connection. Only after COMMIT has returned OK does it append "ID UNIX_MS" to --log (outside the
volume), so the log holds exactly the commits a client saw succeed. A row whose COMMIT did not
return (the connection dropped, an error) is not logged: it may or may not be in the table.
Errors and reconnects go to stderr with a timestamp and are counted in the last line,
"done: committed=N errors=E reconnects=R". The client stops at the next row once --stop exists.

`verify` reads a commit log and the ids found in the database: every logged id must be
present; it prints the number of commits, the longest gap between consecutive logged commits
(and, given --kill-ms, the longest gap that ends after that event and starts less than 10 s
after it), and exits 1 on a missing row.
"""

import argparse
import os
import sqlite3
import subprocess
import sys
import time


def now_ms():
    return time.time() * 1000.0


def say(msg):
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}] {msg}\n")
    sys.stderr.flush()


class PsqlConn:
    """One psql process driven through a pipe. ON_ERROR_STOP makes psql exit at the first
    error, so the marker echoed after COMMIT is printed only if every statement before it,
    COMMIT included, succeeded."""

    def __init__(self, host, port):
        env = dict(os.environ, PGCONNECT_TIMEOUT="5")
        self.p = subprocess.Popen(
            ["psql", "-X", "-q", "-At", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres",
             "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1, env=env)

    def run(self, sql, marker):
        """Send SQL then `\\echo marker`; True once the marker is read back."""
        try:
            self.p.stdin.write(f"{sql}\n\\echo {marker}\n")
            self.p.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        line = self.p.stdout.readline()
        return line.strip() == marker

    def why(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        err = self.p.stderr.read().strip().replace("\n", " | ")
        return f"psql exited {self.p.returncode}: {err}"

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


class Unavailable(Exception):
    """The database cannot be reached or opened now (the load keeps trying)."""


def run_load(a, connect, commit, close):
    """One row per transaction until the stop file appears, logging each commit only after
    it was confirmed. `connect()` returns a connection or raises Unavailable; `commit(conn,
    i)` returns None or why the commit is not known to have happened; `close(conn)` ends it.
    A failed commit drops the connection; reconnecting is retried for `a.give_up` seconds."""
    log = open(a.log, "a", buffering=1)
    committed = errors = reconnects = 0
    i = a.first
    conn = None
    down_since = None
    while not os.path.exists(a.stop):
        if conn is None:
            try:
                conn = connect()
            except Unavailable as e:
                if down_since is None:
                    down_since = time.time()
                    say(f"cannot connect: {e}")
                if time.time() - down_since > a.give_up:
                    say(f"gave up: no connection for {a.give_up}s")
                    break
                time.sleep(0.2)
                continue
            if down_since is not None:
                say(f"reconnected after {time.time() - down_since:.1f}s")
                down_since = None
            if committed or errors:
                reconnects += 1
        why = commit(conn, i)
        if why is None:
            log.write(f"{i} {now_ms():.1f}\n")
            committed += 1
        else:
            errors += 1
            say(f"row {i}: commit not confirmed: {why}")
            close(conn)
            conn = None
            down_since = time.time()
        i += 1
    if conn is not None:
        close(conn)
    say(f"done: committed={committed} errors={errors} reconnects={reconnects}")
    return 0


def pg_load(a):
    def connect():
        conn = PsqlConn(a.host, a.port)
        if not conn.run("", "READY"):
            why = conn.why()
            conn.close()
            raise Unavailable(why)
        return conn

    def commit(conn, i):
        sql = f"BEGIN; INSERT INTO t(id, phase) VALUES ({i}, {a.phase}); COMMIT;"
        return None if conn.run(sql, f"OK {i}") else conn.why()

    def close(conn):
        conn.run("", "BYE")
        conn.close()

    return run_load(a, connect, commit, close)


def sqlite_open(path, journal):
    c = sqlite3.connect(path, isolation_level=None, timeout=30)
    mode = c.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, phase INTEGER, pad TEXT)")
    return c, mode


def sqlite_load(a):
    pad = "x" * 200

    def connect():
        try:
            conn, mode = sqlite_open(a.db, a.journal)
        except sqlite3.Error as e:
            raise Unavailable(str(e))
        say(f"opened (journal_mode={mode})")
        return conn

    def commit(conn, i):
        try:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t(id, phase, pad) VALUES (?, ?, ?)", (i, a.phase, pad))
            conn.execute("COMMIT")
            return None
        except sqlite3.Error as e:
            return f"{type(e).__name__}: {e}"

    def close(conn):
        try:
            conn.close()
        except sqlite3.Error:
            pass

    return run_load(a, connect, commit, close)


def pg_ids(a):
    out = subprocess.run(
        ["psql", "-X", "-At", "-h", a.host, "-p", str(a.port), "-U", "postgres", "-d", "postgres",
         "-v", "ON_ERROR_STOP=1", "-c", "SELECT id FROM t ORDER BY id"],
        capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return 1
    sys.stdout.write(out.stdout)
    return 0


def sqlite_check(a):
    c = sqlite3.connect(a.db, isolation_level=None)
    res = [r[0] for r in c.execute("PRAGMA integrity_check").fetchall()]
    if res != ["ok"]:
        sys.stderr.write("integrity_check: " + "; ".join(res[:20]) + "\n")
        return 1
    sys.stderr.write("integrity_check: ok\n")
    for (i,) in c.execute("SELECT id FROM t ORDER BY id"):
        sys.stdout.write(f"{i}\n")
    return 0


def verify(a):
    rows = []
    with open(a.log) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                rows.append((int(parts[0]), float(parts[1])))
    with open(a.ids) as f:
        present = {int(x) for x in f.read().split()}
    missing = [i for i, _ in rows if i not in present]
    gap = 0.0
    for (_, t0), (_, t1) in zip(rows, rows[1:]):
        if t1 - t0 > gap:
            gap = t1 - t0
    extra = ""
    if a.kill_ms is not None:
        # The stall the event caused: the longest gap that ends after the event and starts
        # less than 10 s after it (a commit in flight at the kill may still return just after).
        k = a.kill_ms
        near = [t1 - t0 for (_, t0), (_, t1) in zip(rows, rows[1:]) if t1 > k and t0 < k + 10000]
        if near and rows[0][1] <= k:
            extra = f" event_gap_ms={max(near):.0f}"
        else:
            extra = " event_gap_ms=none (no commits on both sides of the event)"
    verdict = "ok" if not missing and rows else "FAILED"
    print(f"{a.label}: committed={len(rows)} missing={len(missing)} max_gap_ms={gap:.0f}{extra} "
          f"verdict={verdict}")
    if missing:
        print(f"{a.label}: missing ids (first 20): {missing[:20]}")
    return 0 if verdict == "ok" else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["pg-load", "sqlite-load", "pg-ids", "sqlite-check", "verify"])
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--db")
    ap.add_argument("--journal", default="wal")
    ap.add_argument("--first", type=int, default=1)
    ap.add_argument("--phase", type=int, default=1)
    ap.add_argument("--log")
    ap.add_argument("--stop")
    ap.add_argument("--give-up", type=float, default=90.0)
    ap.add_argument("--ids")
    ap.add_argument("--kill-ms", type=float)
    ap.add_argument("--label", default="db")
    a = ap.parse_args()
    return {"pg-load": pg_load, "sqlite-load": sqlite_load, "pg-ids": pg_ids,
            "sqlite-check": sqlite_check, "verify": verify}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
