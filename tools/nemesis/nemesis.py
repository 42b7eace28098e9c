#!/usr/bin/python3
"""nemesis: inject faults into a real tandem pair on separate network namespaces and check
that no acknowledged write is lost, no split brain goes unnoticed and nothing hangs.

    nemesis.py --seed N --faults K [--bin PATH] [--keep] [--plan FILE] [--dir DIR]

From the seed it draws a schedule (the plan), writes it to DIR/plan.json, builds the cluster
(cluster.py: alpha, beta, witness and client hosts behind one switch), puts load on it through
`tandem attach` and directly on the primary, and plays the plan. `--plan FILE` replays a plan
exactly (same faults at the same times; the seed is taken from the file). At the end it heals
everything, waits for the pair to converge, stops the load and runs the checks (README.md).

The last line is `faults: N, lost: L, split brains: S, panics: P`; the exit status is 0 only if
every check passed. A failing run keeps its directory and prints the command that replays it.
"""

import argparse
import bisect
import calendar
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, HERE)
import cluster as cl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
ACKCHECK = os.path.join(REPO, "tools", "ackcheck.py")
PLAN_VERSION = 1

# Bounds (README.md).
RSS_BOUND_KIB = 512 * 1024  # every tandem process, sampled every second
STATUS_BOUND_S = 5.0  # every status poll of a live, running node
POLL_EVERY_S = 0.2
ACK_SLACK_S = 1.0  # an acknowledgement is logged after its reply arrived, never before
CONVERGE_TIMEOUT_S = 150.0
MARK_LIFT_TIMEOUT_S = 15.0
FORCE_AFTER_S = 45.0
PROBE_TAKEOVER_S = 10.0  # kill -9 of the in-sync primary -> the secondary is primary  # at the end: nobody promotable this long -> `primary --force`
NO_PRIMARY_PROMOTE_S = 20.0  # at the end: no primary for this long -> the operator promotes
RUN_NO_PRIMARY_PROMOTE_S = 10.0  # during the run

# The load: two checkers on separate block ranges of the 64 MiB volume.
SIZE = 64 << 20
ATTACH_AREA = (0, 4096)  # (offset in blocks of 4 KiB, blocks)
DIRECT_AREA = (32 << 20 >> 12, 4096)
QD = 8

# ---------------------------------------------------------------------------------------------
# The plan

CATALOGUE = [
    # (kind, weight)
    ("kill9", 3), ("term", 2), ("sigstop", 3),
    ("cut_link", 3), ("oneway", 2), ("isolate", 3), ("isolate_from_witness", 2),
    ("witness_isolate", 1), ("witness_stop", 1), ("witness_kill", 1),
    ("delay", 3), ("loss", 2), ("dup", 1),
    ("switchover", 2), ("disconnect", 2), ("verify", 1), ("invalidate", 1),
    ("disk_error", 2), ("disk_stall", 2),
]
LEASE_S = 2.0


def hold_time(rng, lo=0.2, hi=6.0):
    """Log-uniform in [lo, hi]: as many short faults as long ones, around the 2 s lease."""
    return round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 2)


def draw_fault(rng):
    kinds, weights = zip(*CATALOGUE)
    kind = rng.choices(kinds, weights)[0]
    node = rng.choice(cl.NODES)
    f = {"kind": kind, "hold": hold_time(rng)}
    if kind in ("kill9", "term", "isolate", "isolate_from_witness", "disconnect",
                "disk_error", "disk_stall"):
        f["node"] = node
    if kind == "sigstop":
        f["node"] = node
        # Shorter or longer than the lease, never close to it.
        f["hold"] = round(rng.uniform(0.2, 1.5) if rng.random() < 0.5 else
                          rng.uniform(LEASE_S + 0.5, 6.0), 2)
    elif kind == "oneway":
        f["src"], f["dst"] = rng.choice([("alpha", "beta"), ("beta", "alpha"),
                                         ("alpha", "witness"), ("beta", "witness"),
                                         ("witness", "alpha"), ("witness", "beta")])
    elif kind == "delay":
        f["host"] = rng.choice(cl.HOSTS)
        f["ms"] = rng.choice([5, 20, 100, 300, 700])
        f["jitter_ms"] = rng.choice([0, f["ms"] // 4, f["ms"] // 2])
        f["reorder"] = rng.random() < 0.5
    elif kind == "loss":
        f["host"] = rng.choice(cl.HOSTS)
        f["pct"] = rng.choice([2, 10, 30, 60])
    elif kind == "dup":
        f["host"] = rng.choice(cl.HOSTS)
        f["pct"] = rng.choice([10, 50, 100])
    elif kind in ("switchover", "verify", "invalidate"):
        f["hold"] = 0.2  # instantaneous; the target is resolved when it runs
    elif kind == "disk_error":
        area = rng.choice([ATTACH_AREA, DIRECT_AREA])
        first = area[0] + rng.randrange(0, area[1] - 256)
        lo, hi = first * 4096, (first + rng.choice([1, 16, 256])) * 4096
        f["rules"] = rng.choice([
            [f"write:{lo}-{hi}:eio"],
            [f"read:{lo}-{hi}:eio"],
            ["flush:0-0:eio"],
            [f"write:{lo}-{hi}:enospc", "flush:0-0:eio"],
            [f"any:0-{SIZE}:eio"],
        ])
    elif kind == "disk_stall":
        f["rules"] = [f"any:0-{SIZE}:delay={rng.choice(['20ms', '200ms', '1s', '3s'])}"]
    return f


def resources(f):
    """What a fault holds exclusively while it is applied."""
    k = f["kind"]
    if k in ("kill9", "term", "sigstop"):
        return {f"proc:{f['node']}"}
    if k in ("witness_stop", "witness_kill"):
        return {"proc:witness"}
    if k == "delay":
        return {f"delay:{f['host']}"}
    if k in ("switchover", "disconnect", "verify", "invalidate"):
        return {"op"}
    if k in ("disk_error", "disk_stall"):
        return {f"disk:{f['node']}"}
    return set()


def make_plan(seed, count):
    """Steps of 1-3 overlapping faults, each step after the previous one healed; sometimes a
    settle (everything healed, the pair resyncs under load) between steps."""
    rng = random.Random(seed)
    faults, settles = [], []
    t = 4.0  # the load runs a little before the first fault
    while len(faults) < count:
        k = min(rng.choice([1, 1, 2, 2, 3]), count - len(faults))
        step, held = [], set()
        tries = 0
        while len(step) < k and tries < 50:
            tries += 1
            f = draw_fault(rng)
            if resources(f) & held:
                continue
            held |= resources(f)
            f["at"] = round(t + rng.uniform(0, 0.8), 2)
            step.append(f)
        for f in step:
            f["id"] = len(faults) + 1
            faults.append(f)
        t = max(f["at"] + f["hold"] for f in step) + rng.uniform(0.3, 1.0)
        if rng.random() < 0.2 and len(faults) < count:
            d = round(rng.uniform(2.5, 5.0), 2)
            settles.append({"at": round(t, 2), "duration": d})
            t += d
        t = round(t, 2)
    return {"version": PLAN_VERSION, "seed": seed, "faults": faults, "settles": settles,
            "end": round(t + 1.0, 2), "size": SIZE}


def describe(f):
    k = f["kind"]
    where = f.get("node") or f.get("host") or (f"{f.get('src')}->{f.get('dst')}"
                                               if "src" in f else "")
    extra = ""
    if k == "delay":
        extra = f" {f['ms']}ms+-{f['jitter_ms']}ms{' reorder' if f['reorder'] else ''}"
    elif k in ("loss", "dup"):
        extra = f" {f['pct']}%"
    elif k in ("disk_error", "disk_stall"):
        extra = " " + ",".join(f["rules"])
    return f"{k} {where}{extra}".replace("  ", " ").strip() + f" (hold {f['hold']:.2f}s)"


# ---------------------------------------------------------------------------------------------
# The run


class Nemesis:
    def __init__(self, args, plan, run_dir):
        self.args, self.plan, self.dir = args, plan, run_dir
        self.out = open(os.path.join(run_dir, "nemesis.out"), "a")
        self.lock = threading.RLock()
        self.t0 = None
        self.findings = []  # (failing: bool, check, text)
        self.notes = []
        self.samples = {n: [] for n in cl.NODES}  # dicts, time ordered per node
        self.rss_max = {}
        self.status_slow = []
        self.verify_results = []
        self.disk_fault_windows = {n: [] for n in cl.NODES}  # (start, end)
        self.held = set()  # resources held by running faults
        self.res_locks = {}
        self.faults_done = 0
        self.stopping = False
        self.c = None
        self.checkers = {}
        self.operator_promotions = 0
        self.split_brains_reported = 0
        self.last_primary_seen = time.time()
        self.summary = "faults: 0, lost: ?, split brains: ?, panics: ?"

    # -- output --

    def now(self):
        return time.time() - self.t0 if self.t0 else 0.0

    def say(self, msg):
        t = time.time()
        wall = time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        line = f"[{self.now():7.2f}s {wall}] {msg}" if self.t0 else f"[{wall}] {msg}"
        with self.lock:
            print(line, flush=True)
            self.out.write(line + "\n")
            self.out.flush()

    def finding(self, check, text, failing=True):
        with self.lock:
            self.findings.append((failing, check, text))
        self.say(f"{'FINDING' if failing else 'note'} [{check}] {text}")

    # -- setup --

    def setup(self):
        self.c = cl.Cluster(self.dir, self.args.bin, seed=self.plan["seed"],
                            size=self.plan.get("size", SIZE), log=self.say)
        c = self.c
        c.witness_up()
        for n in cl.NODES:
            c.up(n)
        rc, out = c.ctl("alpha", "primary", "--force")
        if rc != 0:
            raise RuntimeError(f"primary --force on alpha: {out}")
        if not self.wait_in_sync(60):
            raise RuntimeError("initial sync did not finish in 60 s")
        c.attach_up()
        common = ["--qd", str(QD), "--reconnect-timeout", "3600",
                  "--seed", str(self.plan["seed"])]
        self.start_checker("attach-load", [c.attach_uri()], ATTACH_AREA, common +
                           ["--io-timeout", "120"])
        self.start_checker("direct-load", [c.nbd_uri(n) for n in cl.NODES], DIRECT_AREA,
                           common + ["--io-timeout", "10", "--log-issue-times"])

    def start_checker(self, name, uris, area, extra):
        stop = os.path.join(self.dir, f"{name}.stop")
        argv = [cl.PYTHON, ACKCHECK]
        for u in uris:
            argv += ["--uri", u]
        argv += ["--offset", str(area[0] * 4096), "--blocks", str(area[1]),
                 "--stop-file", stop, "--json", os.path.join(self.dir, f"{name}.json"),
                 "--log", os.path.join(self.dir, f"{name}.acks")] + extra
        self.checkers[name] = (self.c.client_spawn(name, argv), stop)

    def wait_in_sync(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.in_sync():
                return True
            time.sleep(0.2)
        return False

    def in_sync(self, need_primary=True, need_mark_lifted=True):
        """Both Connected, UpToDate on both sides, nothing out of sync, one primary, and
        (need_mark_lifted) the primary no longer holds its peer for outdated."""
        st = [self.c.status(n) for n in cl.NODES]
        if not all(st):
            return False
        for s in st:
            if not (s["connection"] == "Connected" and s["disk"] == "UpToDate"
                    and (s.get("peer") or {}).get("disk") == "UpToDate"
                    and s["out_of_sync_bytes"] == 0):
                return False
            if need_mark_lifted and s["failover"].get("peer_outdated"):
                return False
        return not need_primary or sum(s["role"] == "primary" for s in st) == 1

    # -- monitoring --

    def poller(self, node):
        c = self.c
        while not self.stopping:
            t_next = time.time() + POLL_EVERY_S
            p = c.procs.get(node)
            if p is not None and p.state == "running" and p.popen.poll() is None:
                gen = p.gen
                t0 = time.time()
                s, err, took = c.status_timed(node, STATUS_BOUND_S)
                t1 = time.time()
                judged = (p.state == "running" and p.gen == gen and p.popen.poll() is None)
                if s is not None:
                    sample = {"t0": t0, "t1": t1, "node": node, "role": s["role"],
                              "epoch": s["epoch"], "conn": s["connection"],
                              "disk": s["disk"], "peer_disk": (s.get("peer") or {}).get("disk"),
                              "peer_role": (s.get("peer") or {}).get("role"),
                              "oos": s["out_of_sync_bytes"], "sb": s["split_brain"],
                              "sb_detail": s.get("split_brain_detail"),
                              "lease": (s.get("lease") or {}).get("valid"),
                              "last_verify": s.get("last_verify")}
                    with self.lock:
                        self.samples[node].append(sample)
                    if s["role"] == "primary":
                        self.last_primary_seen = t1
                    if s["split_brain"]:
                        self.on_split_brain(node, s)
                if judged and (s is None or took > STATUS_BOUND_S):
                    with self.lock:
                        self.status_slow.append((self.now(), node, err, took))
                    self.finding("status", f"{node}: status did not answer within "
                                 f"{STATUS_BOUND_S:.0f} s ({err}, {took:.2f} s)")
            time.sleep(max(0.0, t_next - time.time()))

    def sampler(self):
        """RSS of every tandem process, and processes that exited on their own."""
        c = self.c
        while not self.stopping:
            for name, p in list(c.procs.items()):
                if p.kind == "load":
                    rc = p.popen.poll()
                    if rc is not None and not p.expected_exit and p.state != "dead":
                        p.set("dead")
                        self.finding("load", f"{name} stopped before the end with status "
                                     f"{rc}; see {p.log}")
                    continue
                if p.kind in ("node", "witness", "attach"):
                    rss = c.rss_kib(name)
                    if rss is not None:
                        with self.lock:
                            if rss > self.rss_max.get(name, 0):
                                self.rss_max[name] = rss
                        if rss > RSS_BOUND_KIB and not getattr(p, "rss_reported", False):
                            p.rss_reported = True
                            self.finding("rss", f"{name} RSS {rss // 1024} MiB exceeds "
                                         f"{RSS_BOUND_KIB // 1024} MiB")
                rc = p.popen.poll()
                if rc is not None and p.state in ("running", "stopped", "starting") \
                        and not p.expected_exit:
                    p.set("dead")
                    tail = "".join(open(p.log, errors="replace").readlines()[-8:])
                    self.finding("exit", f"{name} exited on its own with status {rc}; "
                                 f"last lines of {p.log}:\n{tail}")
            time.sleep(1.0)

    def on_split_brain(self, node, s):
        with self.lock:
            # One incident however many nodes and polls report it: keyed by the epoch.
            key = ("sb", s["epoch"])
            seen = getattr(self, "_sb_seen", set())
            if (node,) + key in seen:
                return
            new_incident = key not in seen
            self._sb_seen = seen | {key, (node,) + key}
            if new_incident:
                self.split_brains_reported += 1
        self.finding("split-brain", f"{node} reports a split brain (reported, not silent): "
                     f"{s.get('split_brain_detail')}")

    def run_verify(self, node):
        """`verify --wait` on `node`; differing blocks on a connected pair are a finding
        (a note only when a disk fault was active on either node meanwhile)."""
        t_start = time.time()
        rc, out = self.op(node, "verify", "--wait", timeout=120)
        m = re.search(r"verify finished: (\d+) mismatched bytes", out)
        with self.lock:
            self.verify_results.append((self.now(), node, rc, out))
        if m and int(m.group(1)):
            t_end = time.time()
            disk = any(s <= t_end and (e is None or e >= t_start)
                       for n in cl.NODES for s, e in self.disk_fault_windows[n])
            self.finding("verify", f"{node}: online verify found {m.group(1)} mismatched bytes"
                         f"{' while a disk fault was active' if disk else ''}: {out}",
                         failing=not disk)

    # -- faults --

    def res_lock(self, r):
        with self.lock:
            return self.res_locks.setdefault(r, threading.Lock())

    def run_fault(self, f):
        wait = self.t0 + f["at"] - time.time()
        if wait > 0:
            time.sleep(wait)
        locks = [self.res_lock(r) for r in sorted(resources(f))]
        got = []
        for lk in locks:
            if not lk.acquire(timeout=120):
                self.finding("harness", f"fault #{f['id']} could not start: its resources "
                             f"stayed busy", failing=False)
                for g in got:
                    g.release()
                return
            got.append(lk)
        with self.lock:
            self.held |= resources(f)
        try:
            late = time.time() - (self.t0 + f["at"])
            self.say(f"fault #{f['id']:<3} {describe(f)}"
                     + (f" (started {late:.1f}s late)" if late > 0.5 else ""))
            heal = self.apply(f)
            with self.lock:
                self.faults_done += 1
            end = max(self.t0 + f["at"] + f["hold"], time.time() + 0.05)
            time.sleep(max(0.0, end - time.time()))
            if heal:
                msg = heal()
                self.say(f"heal  #{f['id']:<3} {msg}")
        except Exception as e:
            self.finding("harness", f"fault #{f['id']} {f['kind']}: {type(e).__name__}: {e}\n"
                         f"{traceback.format_exc()}", failing=False)
        finally:
            with self.lock:
                self.held -= resources(f)
            for g in got:
                g.release()

    def roles(self):
        """Current (primary, secondary) names from a fresh status of both nodes."""
        st = {n: self.c.status(n, 2.0) for n in cl.NODES}
        prim = [n for n, s in st.items() if s and s["role"] == "primary"]
        sec = [n for n, s in st.items() if s and s["role"] == "secondary"]
        return (prim[0] if len(prim) == 1 else None), (sec[0] if len(sec) == 1 else None)

    def op(self, node, *args, timeout=60):
        rc, out = self.c.ctl(node, *args, timeout=timeout)
        self.say(f"      operator: tandem {' '.join(args)} on {node} -> exit {rc}: "
                 f"{out.splitlines()[-1] if out else ''}")
        return rc, out

    def restart(self, name):
        c = self.c
        for attempt in range(3):
            try:
                if name == "witness":
                    c.witness_up()
                else:
                    c.up(name)
                return f"restarted {name}"
            except Exception as e:
                self.finding("exit" if attempt == 2 else "harness",
                             f"restarting {name} failed: {e}", failing=attempt == 2)
                time.sleep(1)
        return f"{name} did not restart"

    def apply(self, f):
        """Apply a fault; returns its heal function (or None)."""
        c, k = self.c, f["kind"]
        n = f.get("node")
        if k == "kill9":
            c.kill9(n)
            return lambda: self.restart(n)
        if k == "term":
            rc = c.term(n)
            if rc != 0:
                # A clean stop flushes; with a disk fault on the node a failed flush may
                # rightly end it with an error.
                disk = any(e is None for _, e in self.disk_fault_windows[n])
                self.finding("exit", f"{n}: SIGTERM exit status {rc} (expected 0)"
                             + (" with a disk fault active" if disk else ""), failing=not disk)
            return lambda: self.restart(n)
        if k == "sigstop":
            c.stop(n)
            return lambda: (c.cont(n), f"SIGCONT {n}")[1]
        if k == "witness_stop":
            c.witness_stop()
            return lambda: (c.witness_cont(), "SIGCONT witness")[1]
        if k == "witness_kill":
            c.witness_kill9()
            return lambda: self.restart("witness")
        net = None
        if k == "cut_link":
            net = c.cut("alpha", "beta")
        elif k == "oneway":
            net = c.cut_oneway(f["src"], f["dst"])
        elif k == "isolate":
            net = c.isolate(n)
        elif k == "isolate_from_witness":
            net = c.cut(n, "witness")
        elif k == "witness_isolate":
            net = c.isolate("witness")
        elif k == "delay":
            net = c.delay(f["host"], f["ms"], f["jitter_ms"], f["reorder"])
        elif k == "loss":
            net = c.loss(f["host"], f["pct"])
        elif k == "dup":
            net = c.dup(f["host"], f["pct"])
        if net is not None:
            return lambda: (c.heal(net), f"healed {net.what}")[1]
        if k == "switchover":
            prim, sec = self.roles()
            if prim and sec:
                self.op(prim, "switchover", "--to", sec)
            else:
                self.say("      operator: no switchover (no primary/secondary pair)")
            return None
        if k == "disconnect":
            self.op(n, "disconnect", timeout=30)

            def reconnect():
                rc, out = self.op(n, "connect", timeout=30)
                return f"connect {n}: exit {rc}"
            return reconnect
        if k == "verify":
            prim, _ = self.roles()
            target = prim or "alpha"
            threading.Thread(target=self.run_verify, args=(target,), daemon=True).start()
            return None
        if k == "invalidate":
            _, sec = self.roles()
            if sec:
                self.op(sec, "invalidate", timeout=30)
            else:
                self.say("      operator: no invalidate (no secondary)")
            return None
        if k in ("disk_error", "disk_stall"):
            c.disk_fault(n, f["rules"])
            window = [time.time(), None]
            self.disk_fault_windows[n].append(window)

            def heal_disk():
                c.disk_heal(n)
                window[1] = time.time()
                return f"disk rules on {n} cleared"
            return heal_disk
        raise ValueError(f"unknown fault kind {k}")

    # -- the operator between steps --

    def operator_round(self, final=False):
        """Restart what died on its own, resolve reported split brains, reconnect StandAlone
        nodes that no fault keeps apart, and promote when nobody has been primary for long."""
        c = self.c
        with self.lock:
            held = set(self.held)
        for name in ("witness",) + cl.NODES:
            p = c.procs.get(name)
            if p and p.state == "dead" and f"proc:{name}" not in held:
                self.say(f"      operator: {name} is down; restarting it")
                self.restart(name)
        if c.procs.get("attach") and c.procs["attach"].state == "dead":
            self.say("      operator: attach is down; restarting it")
            try:
                c.attach_up()
            except Exception as e:
                self.finding("exit", f"restarting attach failed: {e}")
        st = {n: c.status(n, 3.0) for n in cl.NODES}
        if not all(st.values()):
            self.maybe_promote({n: s for n, s in st.items() if s}, final)
            return st
        sb = [n for n, s in st.items() if s["split_brain"]]
        if sb:
            for n, s in st.items():
                self.on_split_brain(n, s) if s["split_brain"] else None
            # Keep the primary's data (or alpha's when neither is primary).
            prim = [n for n, s in st.items() if s["role"] == "primary"]
            keep = prim[0] if prim else "alpha"
            lose = "beta" if keep == "alpha" else "alpha"
            self.say(f"      operator: resolving the split brain: {lose} discards its data")
            if st[lose]["role"] == "primary":
                self.op(lose, "secondary")
            self.op(lose, "connect", "--discard-my-data")
            self.op(keep, "connect")
            return st
        if "op" not in held:
            for n, s in st.items():
                if s["connection"] == "StandAlone":
                    self.op(n, "connect", timeout=30)
        self.maybe_promote(st, final)
        return st

    def maybe_promote(self, st, final):
        """Nobody primary for long: `primary` (through the witness, never forced) on an
        UpToDate node that answers, as an operator would."""
        if any(s["role"] == "primary" for s in st.values()):
            return
        idle = time.time() - self.last_primary_seen
        limit = NO_PRIMARY_PROMOTE_S if final else RUN_NO_PRIMARY_PROMOTE_S
        if idle <= limit:
            return
        cand = [n for n, s in st.items() if s["disk"] == "UpToDate"]
        if not cand:
            return
        tried = []
        for n in cand:  # the next one if the witness refuses the first
            rc, out = self.op(n, "primary", timeout=30)
            tried.append(f"{n}: exit {rc}")
            if rc == 0:
                break
        self.operator_promotions += 1
        self.finding("availability", f"nobody was primary for {idle:.1f} s; the operator ran "
                     f"`primary` ({', '.join(tried)})", failing=False)
        # Succeeded or not, wait a full period before the next try.
        self.last_primary_seen = time.time()

    # -- phases --

    def play(self):
        threads = []
        for f in self.plan["faults"]:
            t = threading.Thread(target=self.run_fault, args=(f,), daemon=True)
            t.start()
            threads.append(t)
        settles = sorted(self.plan["settles"], key=lambda s: s["at"])
        end = self.t0 + self.plan["end"]
        next_op = time.time() + 2.0
        while any(t.is_alive() for t in threads) or time.time() < end:
            now = self.now()
            if settles and now >= settles[0]["at"]:
                s = settles.pop(0)
                self.say(f"settle: heal everything, {s['duration']:.1f}s of resync under load")
                self.c.heal_all()
            if time.time() >= next_op:
                try:
                    self.operator_round()
                except Exception as e:
                    self.finding("harness", f"operator round: {e}", failing=False)
                next_op = time.time() + 2.0
            time.sleep(0.1)

    def final_heal(self):
        c = self.c
        self.say("end of plan: heal everything, restart what is down, wait for convergence")
        c.heal_all()
        for n in cl.NODES:
            c.disk_heal(n)
        for name in ("witness",) + cl.NODES:
            p = c.procs.get(name)
            if p and p.state == "stopped":
                c.cont(name)
        for name in ("witness",) + cl.NODES:
            p = c.procs.get(name)
            if p is None or p.state == "dead":
                self.restart(name)
        return self.converge("healing")

    def converge(self, after):
        """Wait (acting as the operator) until the pair is in sync with one primary; then
        until the primary no longer holds its peer for outdated. False if it never got
        there."""
        c = self.c
        deadline = time.time() + CONVERGE_TIMEOUT_S
        t_start = time.time()
        forced = False
        while time.time() < deadline:
            if self.in_sync(need_mark_lifted=False):
                break
            st = self.operator_round(final=True)
            # Plain `primary` refused for long: force it, as the operator is told to, so
            # the data checks can still run; the need for it is a finding.
            if not forced and time.time() - t_start > FORCE_AFTER_S and all(st.values()) \
                    and not any(x["role"] == "primary" for x in st.values()) \
                    and not any(x["split_brain"] for x in st.values()):
                forced = True
                cand = [n for n, x in st.items() if x["disk"] == "UpToDate"] or ["alpha"]
                rc, out = self.op(cand[0], "primary", "--force", timeout=30)
                # Both copies stale with nobody primary is an outcome tandem must report
                # (status failover.no_promotable, issue 11 B): reported, the operator's force
                # is the documented way out and only a note; unreported, it is a failure.
                reported = all(x["failover"].get("no_promotable") for x in st.values())
                self.finding("converge" if not reported else "no-promotable-reported",
                             f"no node could be promoted {FORCE_AFTER_S:.0f} s after "
                             f"{after} (both answering, neither primary): " + json.dumps(
                                 {n: {k: x[k] for k in ("role", "epoch", "connection", "disk",
                                                        "out_of_sync_bytes", "failover")}
                                  for n, x in st.items()})
                             + f"; the operator forced {cand[0]} (exit {rc})",
                             failing=not reported)
                self.last_primary_seen = time.time()
            time.sleep(0.5)
        else:
            st = {n: c.status(n) for n in cl.NODES}
            self.finding("converge", f"the pair did not converge within "
                         f"{CONVERGE_TIMEOUT_S:.0f} s of {after}: {json.dumps(st)}")
            return False
        self.say(f"converged {time.time() - t_start:.1f}s after {after} (one primary, both "
                 f"UpToDate, nothing out of sync)")
        # The primary must also have lifted its peer's outdated mark (at the witness), or the
        # secondary could not take over if the primary failed now.
        if self.wait_in_sync(MARK_LIFT_TIMEOUT_S):
            return True
        st = {n: c.status(n) for n in cl.NODES}
        marked = [n for n, s in st.items() if s and s["failover"].get("peer_outdated")]
        self.finding("outdated-mark", f"{marked}: still holds its in-sync peer for outdated "
                     f"{MARK_LIFT_TIMEOUT_S:.0f} s after convergence (failover.peer_outdated "
                     f"true; the peer could not take over): "
                     + json.dumps({n: {k: s[k] for k in ("role", "epoch", "connection", "disk",
                                                          "failover")}
                                   for n, s in st.items() if s}))
        return True

    def failover_probe(self):
        """After convergence the pair must still be able to fail over: kill -9 the primary
        (under load) and expect the secondary to take over within PROBE_TAKEOVER_S; then
        restart the old primary and converge again."""
        prim, sec = self.roles()
        if not (prim and sec):
            self.finding("failover-probe", "skipped: no primary/secondary pair", failing=False)
            return
        self.say(f"failover probe: kill -9 {prim}; {sec} must take over within "
                 f"{PROBE_TAKEOVER_S:.0f} s")
        t = time.time()
        self.c.kill9(prim)
        took = None
        while time.time() - t < PROBE_TAKEOVER_S:
            s = self.c.status(sec, 2.0)
            if s and s["role"] == "primary":
                took = time.time() - t
                break
            time.sleep(0.1)
        if took is None:
            s = self.c.status(sec) or {}
            self.finding("failover-probe", f"{sec} did not take over within "
                         f"{PROBE_TAKEOVER_S:.0f} s of kill -9 of the in-sync primary {prim}: "
                         f"{json.dumps({k: s.get(k) for k in ('role', 'epoch', 'disk', 'failover')})}")
        else:
            self.say(f"failover probe: {sec} primary {took:.2f}s after the kill")
        self.restart(prim)
        self.converge("the failover probe")

    def stop_load(self):
        results = {}
        for name, (proc, stop) in self.checkers.items():
            proc.expected_exit = True
            open(stop, "w").close()
        for name, (proc, stop) in self.checkers.items():
            try:
                rc = proc.popen.wait(120)
            except Exception:
                self.c.kill9(name)
                rc = None
            proc.expected_exit = True
            proc.set("dead")
            path = os.path.join(self.dir, f"{name}.json")
            try:
                r = json.load(open(path))
            except (OSError, ValueError) as e:
                r = {"ok": False, "error": f"no summary: {e}", "lost": 0, "corrupt": 0}
            r["exit"] = rc
            results[name] = r
            self.say(f"{name}: exit {rc}, acked {r.get('acked')}, lost {r.get('lost')}, "
                     f"corrupt {r.get('corrupt')}, reconnects {r.get('reconnects')}, "
                     f"max outage {r.get('max_outage_ms')} ms, acks by node "
                     f"{r.get('acks_by_uri')}" + (f", error: {r['error']}" if r.get("error")
                                                  else ""))
            if rc != 0 or not r.get("ok"):
                self.finding("acked-writes", f"{name}: exit {rc}, lost {r.get('lost')}, corrupt "
                             f"{r.get('corrupt')}, error {r.get('error')}, problems "
                             f"{r.get('problems')}")
        return results

    def compare_disks(self):
        c = self.c
        # Stop cleanly: the secondary first, so the primary has nothing to fence on the way.
        prim, sec = self.roles()
        order = [sec, prim] if prim and sec else list(cl.NODES)
        for n in order:
            if c.running(n):
                rc = c.term(n, timeout=60)
                if rc != 0:
                    self.finding("exit", f"{n}: clean stop at the end exited {rc}")
        a, b = c.disk("alpha"), c.disk("beta")
        differ, first = 0, None
        with open(a, "rb") as fa, open(b, "rb") as fb:
            off = 0
            while True:
                x, y = fa.read(1 << 20), fb.read(1 << 20)
                if not x and not y:
                    break
                if x != y:
                    for i in range(0, max(len(x), len(y)), 4096):
                        if x[i:i + 4096] != y[i:i + 4096]:
                            differ += 1
                            if first is None:
                                first = off + i
                off += 1 << 20
        if differ:
            self.finding("identical", f"the backing files differ in {differ} blocks of 4 KiB, "
                         f"first at byte {first} (block {first // 4096})")
        else:
            self.say(f"backing files identical ({os.path.getsize(a)} bytes)")

    def check_epochs(self):
        """Two primaries at once, from the status polls; and acknowledgements from a node for
        writes issued after the other node was seen primary in a higher epoch."""
        violations = 0
        with open(os.path.join(self.dir, "samples.jsonl"), "w") as fh:
            for n in cl.NODES:
                for smp in self.samples[n]:
                    fh.write(json.dumps(smp) + "\n")

        def runs(node, key):
            """Maximal runs of consecutive polls where `node` was primary with the same
            key(sample); each run spans from its first poll's send to its last poll's reply."""
            out, cur = [], None
            for smp in self.samples[node]:
                if smp["role"] == "primary":
                    k = key(smp)
                    if cur and cur["key"] == k:
                        cur["end"] = smp["t1"]
                        cur["polls"] += 1
                        continue
                    cur = {"key": k, "start": smp["t0"], "end": smp["t1"], "polls": 1,
                           "epoch": smp["epoch"]}
                    out.append(cur)
                else:
                    cur = None
            return out

        def overlaps(key):
            for ra in runs("alpha", key):
                for rb in runs("beta", key):
                    lo, hi = max(ra["start"], rb["start"]), min(ra["end"], rb["end"])
                    if hi > lo:
                        yield ra, rb, f"{lo - self.t0:.2f}s-{hi - self.t0:.2f}s"

        for ra, rb, when in overlaps(lambda smp: smp["epoch"]):
            if ra["epoch"] == rb["epoch"]:
                violations += 1
                self.finding("epoch", f"alpha and beta both primary in epoch {ra['epoch']} "
                             f"at {when}")
            else:
                self.finding("two-primaries", f"alpha (epoch {ra['epoch']}) and beta (epoch "
                             f"{rb['epoch']}) both reported primary at {when} (the older one "
                             f"had not yet stepped down)", failing=False)
        for ra, rb, when in overlaps(lambda smp: (smp["epoch"], smp["conn"])):
            if ra["key"][1] == "Connected" and rb["key"][1] == "Connected":
                violations += 1
                self.finding("silent-split-brain", f"alpha (epoch {ra['epoch']}) and beta "
                             f"(epoch {rb['epoch']}) both primary and Connected at {when}")
        # Deposed primaries acknowledging: the direct writer logs, per acknowledgement, when
        # the write was issued. A node that acknowledges a write issued after the other node
        # was seen primary in a higher epoch (than any this node was seen primary in up to
        # ACK_SLACK_S after the acknowledgement was logged) acknowledged as a deposed primary:
        # it cannot have answered before it received the write.
        acks = os.path.join(self.dir, "direct-load.acks")
        uri_node = {self.c.nbd_uri(n): n for n in cl.NODES}
        prim = {}
        for n in cl.NODES:
            # Evidence that a node was primary in an epoch, and since when: the polls, and
            # the node's own "promoted to primary: ... epoch N" log lines (a node can be
            # promoted and killed between two polls).
            ps = [(smp["t1"], smp["epoch"]) for smp in self.samples[n]
                  if smp["role"] == "primary"] + self.promotions_from_log(n)
            ps.sort()
            best, prefix = 0, []
            for _, e in ps:
                best = max(best, e)
                prefix.append(best)
            prim[n] = ([t for t, _ in ps], prefix)

        def max_epoch(n, t):
            times, prefix = prim[n]
            i = bisect.bisect_right(times, t)
            return prefix[i - 1] if i else 0

        bad = {}
        try:
            with open(acks) as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) != 5 or parts[4] == "None":
                        continue
                    t_ack, node, issued = float(parts[0]), uri_node.get(parts[1]), \
                        float(parts[4])
                    if node is None:
                        continue
                    other = "beta" if node == "alpha" else "alpha"
                    e_other = max_epoch(other, issued)
                    e_self = max_epoch(node, t_ack + ACK_SLACK_S)
                    if e_other > e_self:
                        b = bad.setdefault((node, e_self, e_other), [issued, t_ack, 0])
                        b[1] = t_ack
                        b[2] += 1
        except OSError as e:
            self.finding("harness", f"cannot read {acks}: {e}", failing=False)
        for (node, e_self, e_other), (t_first, t_last, count) in sorted(bad.items()):
            violations += 1
            other = "beta" if node == "alpha" else "alpha"
            self.finding("deposed-ack", f"{node} (seen primary at most in epoch {e_self}) "
                         f"acknowledged {count} direct writes issued from "
                         f"{t_first - self.t0:.2f}s on (last acknowledged at "
                         f"{t_last - self.t0:.2f}s), after {other} was seen primary in epoch "
                         f"{e_other}")
        return violations

    def promotions_from_log(self, node):
        """(wall time, epoch) of every promotion `node` logged."""
        out = []
        try:
            text = open(self.c.logfile(node), errors="replace").read()
        except OSError:
            return out
        for m in re.finditer(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s+\w+\s+\S+ "
                             r"promoted to primary:.*?epoch (\d+)", text, re.M):
            stamp, epoch = m.group(1), int(m.group(2))
            whole, _, frac = stamp.partition(".")
            t = calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + \
                (float("0." + frac) if frac else 0.0)
            out.append((t, epoch))
        return out

    def check_logs(self):
        panics = 0
        for name in ("alpha", "beta", "witness", "attach"):
            path = self.c.logfile(name)
            if not os.path.exists(path):
                continue
            lines = open(path, errors="replace").read().splitlines()
            for i, line in enumerate(lines):
                if "panicked" in line:
                    panics += 1
                    self.finding("panic", f"{name}: " + " | ".join(lines[i:i + 4]))
                elif "illegal state transition" in line:
                    # An edge the node's transition table does not have (src/node/core.rs).
                    self.finding("illegal transition", f"{name}: {line}")
                elif name in cl.NODES and re.search(r"split.brain", line, re.I):
                    self.notes.append(f"{name}: {line}")
        for n in self.notes[:20]:
            self.say(f"log: {n}")
        return panics

    def run(self):
        self.t0 = None
        self.say(f"nemesis: seed {self.plan['seed']}, {len(self.plan['faults'])} faults, "
                 f"binary {self.args.bin}")
        self.say(f"nemesis: run directory {self.dir}")
        self.say(f"nemesis: plan {os.path.join(self.dir, 'plan.json')}")
        started = time.time()
        self.setup()
        self.t0 = time.time()
        self.say("load running; playing the plan")
        for target in [lambda: self.poller("alpha"), lambda: self.poller("beta"),
                       self.sampler]:
            threading.Thread(target=target, daemon=True).start()
        self.play()
        if self.final_heal():
            self.failover_probe()
        results = self.stop_load()
        self.wait_in_sync(30)
        self.stopping = True
        time.sleep(POLL_EVERY_S * 2)
        self.compare_disks()
        epoch_violations = self.check_epochs()
        panics = self.check_logs()
        lost = sum((r.get("lost") or 0) + (r.get("corrupt") or 0) for r in results.values())
        silent = sum(1 for f in self.findings if f[1] == "silent-split-brain")
        split_brains = self.split_brains_reported + silent
        self.say(f"RSS peaks (bound {RSS_BOUND_KIB // 1024} MiB): " + ", ".join(
            f"{k} {v // 1024} MiB" for k, v in sorted(self.rss_max.items())))
        n_polls = sum(len(v) for v in self.samples.values())
        self.say(f"status polls answered: {n_polls}; over {STATUS_BOUND_S:.0f} s or failed on a "
                 f"live node: {len(self.status_slow)}")
        self.say(f"operator promotions: {self.operator_promotions}; verify runs: "
                 f"{len(self.verify_results)}; epoch/ack violations: {epoch_violations}")
        self.say("outage per load (max ms): " + ", ".join(
            f"{k} {r.get('max_outage_ms')}" for k, r in results.items()))
        failing = [f for f in self.findings if f[0]]
        self.say(f"wall time {time.time() - started:.1f}s; seed {self.plan['seed']}")
        for f in self.findings:
            self.say(f"  {'FAIL' if f[0] else 'note'} [{f[1]}] {f[2].splitlines()[0]}")
        verdict = "PASS" if not failing else f"FAIL ({len(failing)} failing findings)"
        self.say(f"verdict: {verdict}")
        if failing:
            self.say(f"seed {self.plan['seed']} failed; kept {self.dir}")
            self.say(f"replay: {sys.argv[0]} --plan {os.path.join(self.dir, 'plan.json')} "
                     f"--bin {self.args.bin}")
        self.summary = (f"faults: {self.faults_done}, lost: {lost}, split brains: "
                        f"{split_brains}, panics: {panics}")
        return not failing


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="seed of the schedule (required without --plan)")
    p.add_argument("--faults", type=int, default=30, help="number of faults to draw")
    p.add_argument("--bin", default=os.path.join(REPO, "target", "release", "tandem"))
    p.add_argument("--keep", action="store_true", help="keep the run directory when it passes")
    p.add_argument("--plan", help="replay this plan file instead of drawing one")
    p.add_argument("--dir", help="run directory (default: a new one under /tmp)")
    p.add_argument("--print-plan", action="store_true", help="print the plan and exit")
    args = p.parse_args(argv)
    if args.plan:
        plan = json.load(open(args.plan))
        if plan.get("version") != PLAN_VERSION:
            p.error(f"{args.plan}: plan version {plan.get('version')}, expected {PLAN_VERSION}")
    elif args.seed is not None:
        plan = make_plan(args.seed, args.faults)
    else:
        p.error("--seed or --plan is required")
    if args.print_plan:
        for f in plan["faults"]:
            print(f"{f['at']:7.2f}s #{f['id']:<3} {describe(f)}")
        for s in plan["settles"]:
            print(f"{s['at']:7.2f}s settle {s['duration']}s")
        return 0
    if os.geteuid() != 0:
        print("nemesis: must run as root (it creates network namespaces and iptables rules)",
              file=sys.stderr)
        return 2
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        print(f"nemesis: no tandem binary at {args.bin} (cargo build --release, or --bin)",
              file=sys.stderr)
        return 2
    if args.dir:
        run_dir = os.path.abspath(args.dir)
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = tempfile.mkdtemp(prefix=f"nemesis-seed{plan['seed']}-")
    with open(os.path.join(run_dir, "plan.json"), "w") as f:
        json.dump(plan, f, indent=1)
        f.write("\n")
    n = Nemesis(args, plan, run_dir)
    ok = False
    try:
        ok = n.run()
    except Exception as e:
        n.say(f"nemesis: harness error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        n.say(f"seed {plan['seed']} failed; kept {run_dir}")
        n.say(f"replay: {sys.argv[0]} --plan {os.path.join(run_dir, 'plan.json')} "
              f"--bin {args.bin}")
        n.summary = f"faults: {n.faults_done}, lost: ?, split brains: ?, panics: ?"
        ok = None
    finally:
        n.stopping = True
        if n.c:
            n.c.close()
    if ok and not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    # The last line, exactly `faults: N, lost: L, split brains: S, panics: P`.
    print(n.summary, flush=True)
    n.out.write(n.summary + "\n")
    n.out.close()
    return 0 if ok else (2 if ok is None else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
