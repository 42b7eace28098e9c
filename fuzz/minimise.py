#!/usr/bin/env python3
"""Minimise a working corpus back into fuzz/corpus/TARGET, keeping the seeds.

    python3 fuzz/minimise.py TARGET WORKDIR [LIMIT] [-- libFuzzer args]

Runs the built target (fuzz/target/x86_64-unknown-linux-gnu/release/TARGET) in libFuzzer's
merge mode over the seeds (fuzz/corpus/TARGET/seed-*) and WORKDIR to learn which edges each
input covers, then keeps the seeds plus a greedy cover of the remaining edges (largest gain
first, smaller file on ties) of at most LIMIT files in all (default 195), and replaces
fuzz/corpus/TARGET with them. Prints how many of the edges the kept files cover.
"""
import collections
import os
import shutil
import subprocess
import sys
import tempfile

args = sys.argv[1:]
extra = []
if "--" in args:
    extra = args[args.index("--") + 1 :]
    args = args[: args.index("--")]
target, workdir = args[0], os.path.abspath(args[1])
limit = int(args[2]) if len(args) > 2 else 195
fuzz = os.path.dirname(os.path.abspath(__file__))
corpus = os.path.join(fuzz, "corpus", target)
binary = os.path.join(fuzz, "target", "x86_64-unknown-linux-gnu", "release", target)

with tempfile.TemporaryDirectory() as tmp:
    seeds, scratch, ctl = (os.path.join(tmp, x) for x in ("seeds", "scratch", "control"))
    os.makedirs(seeds)
    os.makedirs(scratch)
    for f in os.listdir(corpus):
        if f.startswith("seed-"):
            shutil.copy(os.path.join(corpus, f), seeds)
    subprocess.run(
        ["nice", "-n", "19", binary, "-merge=1", "-use_counters=0",
         f"-merge_control_file={ctl}", *extra, scratch, seeds, workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp, check=True,
    )
    lines = open(ctl).read().split("\n")
    n = int(lines[0])
    files = lines[2 : 2 + n]
    edges = collections.defaultdict(set)
    for line in lines[2 + n :]:
        p = line.split()
        if len(p) >= 2 and p[0] == "COV":
            edges[int(p[1])] |= set(p[2:])
    chosen = [i for i, f in enumerate(files) if f.startswith(seeds + os.sep)]
    covered = set().union(*(edges[i] for i in chosen))
    rest = [i for i in range(n) if i not in chosen]
    while len(chosen) < limit and rest:
        best = max(rest, key=lambda i: (len(edges[i] - covered), -os.path.getsize(files[i])))
        if not edges[best] - covered:
            break
        covered |= edges[best]
        chosen.append(best)
        rest.remove(best)
    every = set().union(*edges.values())
    kept = {os.path.basename(files[i]): open(files[i], "rb").read() for i in chosen}

for f in os.listdir(corpus):
    os.remove(os.path.join(corpus, f))
for name, data in kept.items():
    with open(os.path.join(corpus, name), "wb") as out:
        out.write(data)
size = sum(len(d) for d in kept.values())
print(f"{target}: kept {len(kept)} files, {size} bytes, {len(covered)} of {len(every)} edges")
