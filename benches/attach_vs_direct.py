#!/usr/bin/python3
"""The cost of `tandem attach` on the data path: replicated 4 KiB random write QD32 (fio's NBD
engine) through `attach` and straight to the primary, alternating, median of the repetitions.
Target: attach >= 0.85x direct. The volume is filled first, and both nodes' files are written
back and evicted from the page cache before every run.

    benches/attach_vs_direct.py [--fio-runtime 8] [--fio-reps 5]
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from failover import ROOT, TANDEM, Cluster, fio, free_port
from settle_caches import settle_caches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fio-runtime", type=int, default=8)
    ap.add_argument("--fio-reps", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="tandem-attach-bench.", dir="/var/tmp")
    c = None
    try:
        c = Cluster(work, "pair", 'ping_interval = "200ms"\nping_timeout = "1s"\n', "witness")
        port = free_port()
        c.spawn("attach", [TANDEM, "attach", "-c", c.config, "--listen", f"127.0.0.1:{port}"])
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("attach did not come up")
                time.sleep(0.05)
        # Overwrite allocated blocks, not fresh holes: fill the volume through the primary.
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={c.uri('alpha')}",
                        "--rw=write", "--bs=1M", "--iodepth=8", "--size=1G", "--end_fsync=1",
                        "--output=/dev/null"], check=True, capture_output=True)
        images = [os.path.join(c.dir, f"{n}.img") for n in ("alpha", "beta")]
        targets = [("direct", c.uri("alpha")), ("attach", f"nbd://127.0.0.1:{port}/r0")]
        iops = {"direct": [], "attach": []}
        print(f"== 4 KiB random write QD32, direct to the primary vs through attach, "
              f"median of {args.fio_reps} x {args.fio_runtime}s ==", flush=True)
        for rep in range(args.fio_reps):
            for kind, uri in targets if rep % 2 == 0 else targets[::-1]:
                settle_caches(images)
                v = fio(uri, args.fio_runtime, os.path.join(work, "fio.json"))
                iops[kind].append(v)
                print(f"  rep {rep + 1}: {kind:7} {v:8.0f} IOPS", flush=True)
        md, ma = statistics.median(iops["direct"]), statistics.median(iops["attach"])
        ratio = ma / md
        print(f"attach {ma:.0f} IOPS vs direct {md:.0f} IOPS = {ratio:.3f}x "
              f"(target >= 0.85x: {'met' if ratio >= 0.85 else 'MISSED'})")
    finally:
        if c:
            c.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
