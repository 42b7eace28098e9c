#!/usr/bin/python3
"""The cost of `tandem attach` on the data path: replicated 4 KiB random write QD32 (fio's NBD
engine) through `attach` and straight to the primary, in turn, median of the repetitions.
Target: attach >= 0.85x direct. The volume is filled first, and both nodes' files are written
back and evicted from the page cache before every run.

Two reference proxies to the same primary run in the same rounds: nbdkit's nbd plugin (the NBD
proxy an operator would otherwise pick) and socat, a plain TCP relay that parses nothing and
keeps nothing, so no proxy process can do much better than it. Needs fio, nbdkit and socat.

    benches/attach_vs_direct.py [--fio-runtime 8] [--fio-reps 5]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile

from failover import ROOT, TANDEM, Cluster, fio, free_port, wait_tcp
from settle_caches import settle_caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fio-runtime", type=int, default=8)
    ap.add_argument("--fio-reps", type=int, default=5)
    args = ap.parse_args()
    missing = [t for t in ("fio", "nbdkit", "socat") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install fio nbdkit socat)")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="tandem-attach-bench.", dir="/var/tmp")
    c = None
    try:
        c = Cluster(work, "pair", 'ping_interval = "200ms"\nping_timeout = "1s"\n', "witness")
        port = free_port()
        c.spawn("attach", [TANDEM, "attach", "-c", c.config, "--listen", f"127.0.0.1:{port}"])
        wait_tcp(f"127.0.0.1:{port}")
        primary = f"127.0.0.1:{c.nbd['alpha']}"
        kit, relay = free_port(), free_port()
        c.spawn("nbdkit", ["nbdkit", "-f", "-p", str(kit), "nbd", "hostname=127.0.0.1",
                           f"port={c.nbd['alpha']}", "export=r0"])
        c.spawn("socat", ["socat", "-b", "262144",
                          f"TCP-LISTEN:{relay},reuseaddr,fork,nodelay",
                          f"TCP:{primary},nodelay"])
        wait_tcp(f"127.0.0.1:{kit}")
        wait_tcp(f"127.0.0.1:{relay}")
        # Overwrite allocated blocks, not fresh holes: fill the volume through the primary.
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={c.uri('alpha')}",
                        "--rw=write", "--bs=1M", "--iodepth=8", "--size=1G", "--end_fsync=1",
                        "--output=/dev/null"], check=True, capture_output=True)
        images = [os.path.join(c.dir, f"{n}.img") for n in ("alpha", "beta")]
        targets = [("direct", c.uri("alpha")), ("attach", f"nbd://127.0.0.1:{port}/r0"),
                   ("socat", f"nbd://127.0.0.1:{relay}/r0"), ("nbdkit", f"nbd://127.0.0.1:{kit}/")]
        iops = {k: [] for k, _ in targets}
        print(f"== 4 KiB random write QD32 to the primary: direct, through attach, through a "
              f"TCP relay (socat), through nbdkit's nbd plugin; median of "
              f"{args.fio_reps} x {args.fio_runtime}s ==", flush=True)
        for rep in range(args.fio_reps):
            # Rotate the order so no target always runs first or last.
            for kind, uri in targets[rep % 4:] + targets[:rep % 4]:
                settle_caches(images)
                v = fio(uri, args.fio_runtime, os.path.join(work, "fio.json"))
                iops[kind].append(v)
                print(f"  rep {rep + 1}: {kind:7} {v:8.0f} IOPS", flush=True)
        med = {k: statistics.median(v) for k, v in iops.items()}
        for k in ("attach", "socat", "nbdkit"):
            print(f"{k:7} {med[k]:8.0f} IOPS = {med[k] / med['direct']:.3f}x direct "
                  f"({med['direct']:.0f} IOPS)")
        ratio = med["attach"] / med["direct"]
        print(f"attach = {med['attach'] / med['socat']:.3f}x socat, "
              f"{med['attach'] / med['nbdkit']:.3f}x nbdkit")
        print(f"attach / direct = {ratio:.3f}x (target >= 0.85x: "
              f"{'met' if ratio >= 0.85 else 'MISSED'})")
    finally:
        if c:
            c.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
