#!/usr/bin/python3
"""Replicated writes across separate network hosts, beside `tandem serve` over the same link.

    sudo benches/across_hosts.py [--rtt 0,0.5,2] [--runtime 10] [--reps 2] [--size 256M]

Builds the nemesis hosts (tools/nemesis/cluster.py: alpha, beta, witness and client in their
own network namespaces behind one bridge), brings up the pair (witness fencing, alpha
primary, initial sync done) and `tandem serve` on alpha's host on a file of its own. For each
added round trip it delays every packet to and from alpha by half of it (an NFQUEUE delayer,
tools/nemesis/nfq_delay.py; this kernel has no netem), so the client-alpha and alpha-beta
links both gain that round trip, then runs from the client host, alternating targets:

  * fio 4 KiB random write, QD32, IOPS;
  * fio 4 KiB random write, QD1, mean and 99th percentile completion latency.

Targets: `serve` (one network round trip per write) and `pair` (the replicated primary,
protocol C: client to alpha, alpha to beta and back, then the reply). Both files are written
in full first, so no write lands in a hole. Prints the machine, each repetition, the median,
and the pair/serve ratios. Needs root (namespaces, iptables), fio with its nbd engine.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "nemesis"))
import cluster  # noqa: E402

SERVE_PORT = 10811


def parse_size(s):
    s = s.strip().upper()
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * m[s[-1]] if s[-1] in m else int(s)


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    return f"{platform.node()}: {os.cpu_count()} cpu ({cpu}), {mem} GiB, Linux {platform.release()}"


def fio(c, uri, size, rw, bs, qd, runtime, name):
    argv = ["ip", "netns", "exec", c.ns["client"], "fio", f"--name={name}", "--ioengine=nbd",
            f"--uri={uri}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}",
            "--output-format=json"]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"fio {name} failed: {r.stderr}{r.stdout[-2000:]}")
    out = r.stdout[r.stdout.index("{"):]
    job = json.loads(out)["jobs"][0]["write"]
    clat = job["clat_ns"]
    p99 = clat.get("percentile", {}).get("99.000000", 0)
    return {"iops": job["iops"], "lat_mean_us": clat["mean"] / 1000, "lat_p99_us": p99 / 1000}


def wait_in_sync(c, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        a, b = c.status("alpha"), c.status("beta")
        ok = all(s and s["connection"] == "Connected" and s["disk"] == "UpToDate"
                 and s["out_of_sync_bytes"] == 0 for s in (a, b))
        if ok and a["role"] == "primary":
            return
        time.sleep(0.2)
    raise RuntimeError("the pair did not get in sync")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rtt", default="0,0.5,2", help="added round trips in ms, comma-separated")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "tandem"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("across_hosts.py needs root (network namespaces, iptables)")
    rtts = [float(x) for x in args.rtt.split(",")]
    size = parse_size(args.size)
    if args.bin == os.path.join(ROOT, "target", "release", "tandem"):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    print(f"machine: {machine()}")
    print(f"tandem: {args.bin}; volume {size >> 20} MiB; fio runtime {args.runtime} s; "
          f"{args.reps} repetitions; added round trips {rtts} ms", flush=True)
    work = tempfile.mkdtemp(prefix="tandem-hosts-bench.", dir="/var/tmp")
    c = cluster.Cluster(work, args.bin, seed=1, size=size, log=lambda m: None)
    try:
        c.witness_up()
        c.up("alpha")
        c.up("beta")
        code, out = c.ctl("alpha", "primary", "--force")
        if code != 0:
            raise RuntimeError(f"primary --force: {out}")
        wait_in_sync(c)
        serve_disk = os.path.join(work, "serve.img")
        c.spawn("serve", "alpha", [c.bin, "serve", "--disk", serve_disk, "--size", str(size),
                                   "--listen", f"{cluster.ADDR['alpha']}:{SERVE_PORT}"], "node")
        if not c.wait_listening("alpha", SERVE_PORT, c.procs["serve"]):
            raise RuntimeError("tandem serve did not start")
        uris = {"serve": f"nbd://{cluster.ADDR['alpha']}:{SERVE_PORT}/",
                "pair": c.nbd_uri("alpha")}
        for t, uri in uris.items():
            fio(c, uri, size, "write", "1M", 8, 0, f"fill-{t}")
        wait_in_sync(c)
        results = {}
        for rtt in rtts:
            fault = c.delay("alpha", rtt / 2) if rtt > 0 else None
            try:
                for rep in range(args.reps):
                    order = ["serve", "pair"] if rep % 2 == 0 else ["pair", "serve"]
                    for t in order:
                        qd32 = fio(c, uris[t], size, "randwrite", "4k", 32, args.runtime,
                                   f"{t}-qd32")
                        qd1 = fio(c, uris[t], size, "randwrite", "4k", 1, args.runtime,
                                  f"{t}-qd1")
                        r = {"iops32": qd32["iops"], "lat1": qd1["lat_mean_us"],
                             "p99": qd1["lat_p99_us"]}
                        results.setdefault((rtt, t), []).append(r)
                        print(f"  +{rtt} ms rtt  rep {rep + 1}  {t:5}  QD32 {r['iops32']:8.0f} "
                              f"IOPS   QD1 mean {r['lat1']:7.0f} us  p99 {r['p99']:7.0f} us",
                              flush=True)
            finally:
                if fault:
                    c.heal(fault)
        print()
        print("median of the repetitions (pair = replicated primary; serve = tandem serve "
              "over the same link)")
        print(f"{'added rtt':>9} | {'serve QD32':>10} {'pair QD32':>10} {'ratio':>6} | "
              f"{'serve QD1':>9} {'pair QD1':>9} {'ratio':>6} | {'pair QD1 p99':>12}")
        for rtt in rtts:
            med = {t: {k: statistics.median(r[k] for r in results[(rtt, t)])
                       for k in ("iops32", "lat1", "p99")} for t in ("serve", "pair")}
            s, p = med["serve"], med["pair"]
            print(f"{rtt:>6} ms | {s['iops32']:>10.0f} {p['iops32']:>10.0f} "
                  f"{p['iops32'] / s['iops32']:>5.2f}x | {s['lat1']:>6.0f} us {p['lat1']:>6.0f} us "
                  f"{p['lat1'] / s['lat1']:>5.2f}x | {p['p99']:>9.0f} us")
    finally:
        c.close()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
