#!/usr/bin/python3
"""Failover benchmark: time from `kill -9` of the primary to the first write acknowledged by the
new primary, and the cost of the witness lease on the write path.

    benches/failover.py [--runs 20] [--fio-runtime 8] [--fio-reps 3]

1. For each setting (default: ping_interval 200ms, ping_timeout 1s, lease 2s; tight:
   ping_interval 50ms, ping_timeout 300ms, lease 600ms), a witness and a pair on loopback
   (1 GiB sparse volume). Each run kills the primary with SIGKILL, then a libnbd probe tries
   to write one 4 KiB block through the other node every 5 ms (a secondary refuses the
   handshake); the time from the kill to the first acknowledged write is recorded. The killed
   node is restarted and the pair resynced before the next run, which kills the other node.
   Median and worst are printed.
2. Replicated 4 KiB random write QD32 (fio's NBD engine) through a primary with
   fencing = "witness" and through one with fencing = "none", alternating, median of the
   repetitions; the ratio is the lease's cost.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import nbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TANDEM = os.path.join(ROOT, "target", "release", "tandem")
SIZE = 1 << 30
USED_PORTS = set()


def free_port():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in USED_PORTS:
            USED_PORTS.add(port)
            return port


class Cluster:
    """A witness (optional) and two nodes, alpha and beta, in a temporary directory."""

    def __init__(self, work, name, net, failover_kind, lease="2s"):
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        self.procs = {}
        secret = os.path.join(self.dir, "secret")
        with open(secret, "w") as f:
            f.write("bench-secret\n")
        self.nbd = {n: free_port() for n in ("alpha", "beta")}
        nodes = ""
        for n in ("alpha", "beta"):
            nodes += (
                f'[[node]]\nname = "{n}"\ndisk = "{self.dir}/{n}.img"\nmeta = "{self.dir}/{n}.meta"\n'
                f'replication = "127.0.0.1:{free_port()}"\nnbd = "127.0.0.1:{self.nbd[n]}"\n'
                f'control = "{self.dir}/{n}.sock"\n\n'
            )
        if failover_kind == "witness":
            wdata = os.path.join(self.dir, "witness")
            os.makedirs(wdata)
            shutil.copy(secret, os.path.join(wdata, "r0.secret"))
            self.witness_addr = f"127.0.0.1:{free_port()}"
            self.spawn("witness", [TANDEM, "witness", "--listen", self.witness_addr, "--data", wdata])
            wait_tcp(self.witness_addr)
            failover = f'[failover]\nfencing = "witness"\nwitness = "{self.witness_addr}"\nlease = "{lease}"\n'
        else:
            failover = '[failover]\nfencing = "none"\n'
        self.config = os.path.join(self.dir, "r0.toml")
        with open(self.config, "w") as f:
            f.write(f'[resource]\nname = "r0"\n\n{nodes}[net]\nsecret_file = "{secret}"\n{net}\n{failover}')
        for n in ("alpha", "beta"):
            run([TANDEM, "create-md", "-c", self.config, "-n", n, "--size", str(SIZE)])
        for n in ("alpha", "beta"):
            self.up(n)
        run([TANDEM, "primary", "--force", "-c", self.config, "-n", "alpha"])
        self.wait_in_sync()

    def spawn(self, name, argv):
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def up(self, n):
        self.spawn(n, [TANDEM, "up", "-c", self.config, "-n", n])
        sock = os.path.join(self.dir, f"{n}.sock")
        deadline = time.time() + 20
        while True:
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(sock)
                s.close()
                return
            except OSError:
                if time.time() > deadline:
                    sys.exit(f"{n} did not come up")
                time.sleep(0.02)

    def kill9(self, n):
        p = self.procs.pop(n)
        p.send_signal(signal.SIGKILL)
        p.wait()

    def status(self, n):
        out = run([TANDEM, "status", "--json", "-c", self.config, "-n", n])
        return json.loads(out)

    def wait_in_sync(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            ok = True
            for n in ("alpha", "beta"):
                s = self.status(n)
                ok &= (
                    s["connection"] == "Connected"
                    and s["disk"] == "UpToDate"
                    and (s["peer"] or {}).get("disk") == "UpToDate"
                    and s["out_of_sync_bytes"] == 0
                    and not s["failover"]["peer_outdated"]
                )
            if ok:
                return
            time.sleep(0.1)
        sys.exit("pair did not get in sync")

    def primary(self):
        for n in ("alpha", "beta"):
            if n in self.procs and self.status(n)["role"] == "primary":
                return n
        return None

    def uri(self, n):
        return f"nbd://127.0.0.1:{self.nbd[n]}/r0"

    def close(self):
        for p in self.procs.values():
            p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def run(argv):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{argv}: {r.stderr}")
    return r.stdout


def wait_tcp(addr):
    host, port = addr.rsplit(":", 1)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on {addr}")


def first_write(uri, deadline):
    """Seconds-since-epoch of the first 4 KiB write acknowledged through `uri`."""
    buf = b"\xa5" * 4096
    while time.time() < deadline:
        try:
            h = nbd.NBD()
            h.connect_uri(uri)
            h.pwrite(buf, 0)
            return time.time()
        except nbd.Error:
            time.sleep(0.005)
    return None


def failover_runs(work, name, net, lease, runs):
    c = Cluster(work, name, net, "witness", lease)
    lease_s = float(lease[:-2]) / 1000 if lease.endswith("ms") else float(lease[:-1])
    times = []
    try:
        for i in range(runs):
            old = c.primary()
            new = "beta" if old == "alpha" else "alpha"
            # A crash comes at any point of the renewal cycle: sample it.
            time.sleep(random.uniform(0, lease_s))
            t0 = time.time()
            c.kill9(old)
            t1 = first_write(c.uri(new), t0 + 60)
            if t1 is None:
                sys.exit(f"{name} run {i}: {new} never acknowledged a write")
            times.append(t1 - t0)
            print(f"  {name} run {i + 1:2}: {old} killed, {new} acknowledged a write after {1000 * (t1 - t0):.0f} ms", flush=True)
            c.up(old)
            c.wait_in_sync()
    finally:
        c.close()
    return times


def fio(uri, runtime, out):
    host_port = uri.split("//")[1].split("/")[0]
    host, port = host_port.split(":")
    r = subprocess.run(
        ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", "--numjobs=1", f"--runtime={runtime}", "--time_based", "--size=1G",
         "--output-format=json", f"--output={out}"],
        capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"fio: {r.stderr}")
    with open(out) as f:
        return json.load(f)["jobs"][0]["write"]["iops"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--fio-runtime", type=int, default=8)
    ap.add_argument("--fio-reps", type=int, default=5)
    ap.add_argument("--only", choices=["failover", "lease"], help="run one part")
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="tandem-failover-bench.", dir="/var/tmp")
    try:
        settings = [
            ("default", 'ping_interval = "200ms"\nping_timeout = "1s"\nconnect_interval = "100ms"\n', "2s", 3.0),
            ("tight", 'ping_interval = "50ms"\nping_timeout = "300ms"\nconnect_interval = "50ms"\n', "600ms", 1.0),
        ]
        results = {}
        for name, net, lease, target in settings if args.only != "lease" else []:
            print(f"== failover, {name} settings (lease {lease}), {args.runs} runs ==", flush=True)
            t = failover_runs(work, name, net, lease, args.runs)
            results[name] = (statistics.median(t), max(t), target)

        ratio = None
        if args.only != "failover":
            ratio = lease_cost(work, args)

        print("\n== results ==")
        for name, (med, worst, target) in results.items():
            verdict = "met" if worst <= target else "MISSED"
            print(f"failover {name:8}: median {1000 * med:5.0f} ms, worst {1000 * worst:5.0f} ms "
                  f"(target worst <= {target:.0f} s: {verdict})")
        if ratio is not None:
            print(f"lease cost: {ratio:.3f}x (target >= 0.95x: {'met' if ratio >= 0.95 else 'MISSED'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def lease_cost(work, args):
    """Median IOPS ratio, fencing witness over fencing none."""
    print(f"== lease cost: 4 KiB random write QD32, fencing witness vs none, "
          f"median of {args.fio_reps} x {args.fio_runtime}s ==", flush=True)
    net = 'ping_interval = "200ms"\nping_timeout = "1s"\n'
    with_w = Cluster(work, "lease-witness", net, "witness")
    without = Cluster(work, "lease-none", net, "none")
    iops = {"witness": [], "none": []}
    try:
        for rep in range(args.fio_reps):
            # Alternate which goes first: the machine is shared and drifts.
            order = [("witness", with_w), ("none", without)]
            for kind, c in order if rep % 2 == 0 else order[::-1]:
                v = fio(c.uri("alpha"), args.fio_runtime, os.path.join(work, "fio.json"))
                iops[kind].append(v)
                print(f"  rep {rep + 1}: fencing {kind:8} {v:8.0f} IOPS", flush=True)
    finally:
        with_w.close()
        without.close()
    mw, mn = statistics.median(iops["witness"]), statistics.median(iops["none"])
    print(f"  median: witness {mw:.0f} IOPS, none {mn:.0f} IOPS")
    return mw / mn


if __name__ == "__main__":
    main()
