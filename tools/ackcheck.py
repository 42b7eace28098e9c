#!/usr/bin/python3
"""ackcheck: prove that no acknowledged write is lost across failovers.

Writes uniquely versioned blocks through NBD, remembers which versions each block was
acknowledged at, survives connection failures by reconnecting to whichever URI accepts the
handshake, and at the end reads every written block back and checks it holds the last
acknowledged version or a later one that was issued but never acknowledged.

    ackcheck.py --uri nbd://node-a:10809/ --uri nbd://node-b:10809/ --blocks 4096 \
                --duration 60 --json result.json

Each block is a 32-byte record repeated: magic b"ACKCHK01", block (u64 LE), version (u64 LE),
check (u64 LE; blake2b of the first 24 bytes keyed with a per-run key, so records left by an
earlier run on the same disk cannot pass for this run's).  The region written should start
zeroed (a fresh sparse file): a never-acknowledged block may hold zeroes or an issued version,
anything else is reported.

Exit status: 0 ok, 1 lost or corrupt blocks, 2 usage or infrastructure error.
"""

import argparse
import errno
import hashlib
import json
import os
import random
import signal
import struct
import sys
import time

import nbd

MAGIC = b"ACKCHK01"
RECORD = struct.Struct("<8sQQQ")  # magic, block, version, check
CONNECT_ATTEMPT_S = 3.0  # one handshake attempt; a blackholed node must not stall the cycle
RETRY_PAUSE_S = 0.05  # between rounds over the URIs while no node accepts
FLUSH_EVERY = 100  # writes between flushes
FUA_ONE_IN = 8
READ_CHUNK_BLOCKS = 256  # blocks per read while verifying
MAX_REPORTED = 20


class InfraError(Exception):
    """Cannot do the test (connect, reconnect timeout, bad geometry): exit 2, not a verdict."""


# ---------------------------------------------------------------------------------------------
# Records


def record(key, block, version):
    head = struct.pack("<8sQQ", MAGIC, block, version)
    return head + hashlib.blake2b(head, digest_size=8, key=key).digest()


def parse_block(key, data):
    """Classify a block read back: ("zero", None), ("ok", (block, version)) or (problem, None)."""
    if data.count(0) == len(data):
        return "zero", None
    first = data[: RECORD.size]
    if first * (len(data) // RECORD.size) != data:
        return "torn", None
    magic, block, version, _ = RECORD.unpack(first)
    if magic != MAGIC:
        return "garbage", None
    if record(key, block, version) != first:
        return "bad checksum", None
    return "ok", (block, version)


# ---------------------------------------------------------------------------------------------
# Connections


def connect(uri, timeout):
    """One handshake attempt with a deadline; returns a ready handle or raises nbd.Error."""
    h = nbd.NBD()
    h.set_handle_name("ackcheck")
    h.aio_connect_uri(uri)
    deadline = time.monotonic() + timeout
    while not h.aio_is_ready():
        left = deadline - time.monotonic()
        if left <= 0:
            raise nbd.Error("handshake timed out", errno.ETIMEDOUT)
        poll(h, int(left * 1000) + 1)
    return h


def disconnect(h):
    """Polite NBD_CMD_DISC, but never wait long on a node that stopped answering."""
    try:
        h.aio_disconnect()
        deadline = time.monotonic() + 1.0
        while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
            poll(h, 100)
    except nbd.Error:
        pass


def poll(h, timeout_ms):
    """h.poll, except that a signal interrupting it (SIGTERM asking us to stop) is no error.

    (libnbd 1.14 restarts an interrupted poll itself; this guards versions that do not.)"""
    try:
        h.poll(timeout_ms)
    except nbd.Error as e:
        if e.errnum != errno.EINTR or h.aio_is_dead():
            raise


def connect_any(uris, deadline, should_give_up=lambda: False):
    """Cycle over the URIs (a secondary refuses the handshake) until one accepts.

    Returns (handle, uri).  Makes at least one round; raises InfraError once `deadline`
    (monotonic) passes or should_give_up() says so."""
    errors = {}
    while True:
        for uri in uris:
            try:
                return connect(uri, CONNECT_ATTEMPT_S), uri
            except nbd.Error as e:
                errors[uri] = str(e)
        if time.monotonic() >= deadline or should_give_up():
            detail = "; ".join(f"{u}: {m}" for u, m in errors.items())
            raise InfraError(f"no URI accepted a connection ({detail})")
        time.sleep(RETRY_PAUSE_S)


# ---------------------------------------------------------------------------------------------
# The write phase


class Checker:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.key = os.urandom(16)  # per-run checksum key
        n = args.blocks
        self.last_acked = [0] * n  # version, 0 = never acknowledged
        self.unacked = {}  # block -> versions issued after last_acked[block], never acknowledged
        self.written = set()  # blocks with at least one write issued
        self.busy = set()  # blocks with a write in flight
        self.inflight = {}  # version -> (block, buffer); the buffer must outlive the command
        self.issued_at = {}  # version -> wall time the write was issued (--log-issue-times)
        self.flushes_inflight = 0
        self.completed = []  # (generation, kind, id, errno) filled by libnbd callbacks
        self.generation = 0  # bumped per connection so late callbacks of a dead one are ignored
        self.version = 0
        self.stats = dict(acked=0, unacked=0, fua_writes=0, flushes=0, flushes_failed=0,
                          reconnects=0)
        self.outages_ms = []
        self.failed_at = None  # wall time of the failure that started the current outage
        self.acks_by_uri, self.first_ack, self.last_ack = {}, {}, {}
        self.h = self.uri = None
        self.stop = False
        self.started = self.write_seconds = self.verified_on = None
        self.log = open(args.log, "a") if args.log else None

    # -- connection handling --

    def attach(self, h, uri):
        self.h, self.uri = h, uri
        self.generation += 1
        self.can_fua = h.can_fua()
        self.can_flush = h.can_flush()
        end = self.args.offset + self.args.blocks * self.args.block_size
        if end > h.get_size():
            raise InfraError(f"{self.uri}: export is {h.get_size()} bytes, test needs {end}")
        self.last_progress = time.monotonic()

    def fail_connection(self, why):
        """Everything in flight becomes unknown (it may or may not have landed)."""
        if self.failed_at is None:
            self.failed_at = time.time()
        print(f"ackcheck: connection to {self.uri} failed: {why}", file=sys.stderr)
        self.drain_completions()  # replies parsed before the failure are real acknowledgements
        for version, (block, _) in self.inflight.items():
            self.unacked.setdefault(block, []).append(version)
            self.stats["unacked"] += 1
        self.stats["flushes_failed"] += self.flushes_inflight
        self.inflight.clear()
        self.issued_at.clear()
        self.busy.clear()
        self.flushes_inflight = 0
        self.h = None  # dropping the last reference closes the handle

    def reconnect(self):
        deadline = time.monotonic() + self.args.reconnect_timeout
        try:
            h, uri = connect_any(self.args.uri, deadline, self.should_stop)
        except InfraError as e:
            if self.should_stop():
                return  # stopping anyway; verification makes its own connection
            raise InfraError(f"reconnect timed out after {self.args.reconnect_timeout}s: {e}")
        self.stats["reconnects"] += 1
        self.attach(h, uri)
        print(f"ackcheck: reconnected to {self.uri}", file=sys.stderr)

    # -- commands --

    def callback(self, kind, ident):
        gen = self.generation

        def done(err):
            self.completed.append((gen, kind, ident, err.value))
            return 1  # retire the command

        return done

    def issue_write(self):
        block = self.rng.randrange(self.args.blocks)
        while block in self.busy:
            block = self.rng.randrange(self.args.blocks)
        self.version += 1
        v = self.version
        buf = record(self.key, block, v) * (self.args.block_size // RECORD.size)
        flags = 0
        if self.can_fua and self.rng.randrange(FUA_ONE_IN) == 0:
            flags = nbd.CMD_FLAG_FUA
            self.stats["fua_writes"] += 1
        # Book-keeping first: if aio_pwrite raises, the write counts as in flight and unknown.
        self.inflight[v] = (block, buf)
        if self.log and self.args.log_issue_times:
            self.issued_at[v] = time.time()
        self.busy.add(block)
        self.written.add(block)
        self.h.aio_pwrite(buf, self.args.offset + block * self.args.block_size,
                          completion=self.callback("write", v), flags=flags)
        if self.can_flush and v % FLUSH_EVERY == 0:
            self.flushes_inflight += 1
            self.h.aio_flush(completion=self.callback("flush", None))

    def drain_completions(self):
        """Apply completions reported by callbacks; returns the first error seen, if any."""
        error = None
        done, self.completed = self.completed, []
        for gen, kind, ident, err in done:
            if gen != self.generation:
                continue
            self.last_progress = time.monotonic()
            if kind == "flush":
                self.flushes_inflight -= 1
                self.stats["flushes" if err == 0 else "flushes_failed"] += 1
            elif err == 0:
                self.acknowledge(ident)
            # A failed write stays in self.inflight: fail_connection marks it unknown.
            if err and error is None:
                error = f"{kind} failed: {errno.errorcode.get(err, err)}"
        return error

    def acknowledge(self, v):
        block, _ = self.inflight.pop(v)
        self.busy.discard(block)
        self.last_acked[block] = v
        self.unacked.pop(block, None)  # all earlier versions: one write in flight per block
        self.stats["acked"] += 1
        now = time.time()
        self.acks_by_uri[self.uri] = self.acks_by_uri.get(self.uri, 0) + 1
        self.first_ack.setdefault(self.uri, now)
        self.last_ack[self.uri] = now
        if self.failed_at is not None:
            self.outages_ms.append(round((now - self.failed_at) * 1000, 1))
            self.failed_at = None
        if self.log:
            if self.args.log_issue_times:
                issued = self.issued_at.pop(v, None)
                self.log.write(f"{now:.6f} {self.uri} {block} {v} "
                               f"{issued if issued is None else format(issued, '.6f')}\n")
            else:
                self.log.write(f"{now:.6f} {self.uri} {block} {v}\n")

    def step(self, fill):
        """Top up the queue (if fill), wait a little, apply completions; raises on failure."""
        qd = min(self.args.qd, self.args.blocks)
        while fill and len(self.inflight) < qd:
            self.issue_write()
        if self.inflight or self.flushes_inflight:
            poll(self.h, 100)
        error = self.drain_completions()
        if error:
            raise nbd.Error(error, 0)
        if self.h.aio_is_dead():
            raise nbd.Error("connection is dead", 0)
        stalled = time.monotonic() - self.last_progress
        if (self.inflight or self.flushes_inflight) and stalled > self.args.io_timeout:
            raise nbd.Error(f"no reply for {stalled:.1f}s", errno.ETIMEDOUT)

    # -- phases --

    def should_stop(self):
        if self.args.duration is not None and time.monotonic() >= self.end_at:
            return True
        if self.args.stop_file and os.path.exists(self.args.stop_file):
            return True
        return self.stop

    def run_writes(self):
        self.started = time.monotonic()
        self.end_at = self.started + (self.args.duration or 0)
        # At start every URI gets one try: a wrong address should fail fast.
        self.attach(*connect_any(self.args.uri, time.monotonic()))
        while not self.should_stop():
            if self.h is None:
                self.reconnect()
                continue
            try:
                self.step(fill=True)
            except nbd.Error as e:
                self.fail_connection(e)
        self.stop = True
        self.finish_inflight()
        self.write_seconds = time.monotonic() - self.started

    def finish_inflight(self):
        """Wait for what is in flight; a failure now leaves it unknown, no reconnect."""
        try:
            while self.h is not None and (self.inflight or self.flushes_inflight):
                self.step(fill=False)
        except nbd.Error as e:
            self.fail_connection(e)
        if self.h is not None:
            disconnect(self.h)
            self.h = None

    # -- verification --

    def verify(self):
        """Read back every written block; returns a list of (kind, block, expected, found)."""
        if self.args.verify_uri:
            uris = [self.args.verify_uri]
            deadline = time.monotonic()
        else:
            uris = self.args.uri
            deadline = time.monotonic() + self.args.reconnect_timeout
        h, self.verified_on = connect_any(uris, deadline)
        bs, n = self.args.block_size, self.args.blocks
        end = self.args.offset + n * bs
        if end > h.get_size():
            raise InfraError(f"{self.verified_on}: export is {h.get_size()} bytes, "
                             f"test needs {end}")
        problems = []
        for chunk in sorted({b // READ_CHUNK_BLOCKS for b in self.written}):
            first = chunk * READ_CHUNK_BLOCKS
            count = min(READ_CHUNK_BLOCKS, n - first)
            try:
                data = h.pread(count * bs, self.args.offset + first * bs)
            except nbd.Error as e:
                raise InfraError(f"verify read failed on {self.verified_on}: {e}")
            for b in range(first, first + count):
                if b in self.written:
                    problem = self.check_block(b, data[(b - first) * bs:(b - first + 1) * bs])
                    if problem:
                        problems.append(problem)
        disconnect(h)
        return problems

    def check_block(self, b, data):
        acked, later = self.last_acked[b], self.unacked.get(b, [])
        expected = f">= {acked}" if acked else f"0 or one of {later}"
        kind, rec = parse_block(self.key, data)
        if kind == "zero":
            return ("LOST", b, expected, "zeroes") if acked else None
        if kind != "ok":
            return ("CORRUPT", b, expected, kind)
        block, version = rec
        if block != b:
            return ("CORRUPT", b, expected, f"record of block {block} version {version}")
        if version == acked or version in later:
            return None
        if version < acked:
            return ("LOST", b, expected, f"stale version {version}")
        return ("CORRUPT", b, expected, f"version {version} never issued for this block")

    # -- output --

    def elapsed(self):
        if self.write_seconds is not None:
            return self.write_seconds
        return time.monotonic() - self.started if self.started is not None else 0.0

    def summary(self, problems, error=None):
        lost = sum(1 for p in problems if p[0] == "LOST")
        corrupt = len(problems) - lost
        return {
            "ok": error is None and not problems,
            "acked": self.stats["acked"],
            "unacked": self.stats["unacked"],
            "fua_writes": self.stats["fua_writes"],
            "flushes": self.stats["flushes"],
            "flushes_failed": self.stats["flushes_failed"],
            "reconnects": self.stats["reconnects"],
            "outages_ms": self.outages_ms,
            "max_outage_ms": max(self.outages_ms, default=0),
            "outage_unfinished": self.failed_at is not None,
            "lost": lost,
            "corrupt": corrupt,
            "problems": [dict(kind=k, block=b, expected=e, found=f)
                         for k, b, e, f in problems[:MAX_REPORTED]],
            "blocks_written": len(self.written),
            "acks_by_uri": self.acks_by_uri,
            "first_ack_by_uri": self.first_ack,
            "last_ack_by_uri": self.last_ack,
            "verified_on": self.verified_on,
            "duration_s": round(self.elapsed(), 3),
            "error": error,
        }


# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", action="append", required=True,
                   help="NBD URI of a node; repeat for each node, tried in turn")
    p.add_argument("--blocks", type=int, required=True, help="number of blocks in the test area")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--offset", type=int, default=0, help="byte offset of the test area")
    p.add_argument("--qd", type=int, default=16, help="writes in flight")
    stop = p.add_mutually_exclusive_group(required=True)
    stop.add_argument("--duration", type=float, help="seconds of writing")
    stop.add_argument("--stop-file", help="write until this file exists")
    p.add_argument("--reconnect-timeout", type=float, default=60.0)
    p.add_argument("--io-timeout", type=float, default=30.0,
                   help="seconds without any reply before the connection counts as failed")
    p.add_argument("--log", help="append 'time uri block version' per acknowledgement")
    p.add_argument("--log-issue-times", action="store_true",
                   help="with --log, add a fifth field: the wall time the write was issued "
                        "(its acknowledgement cannot have been sent before it)")
    p.add_argument("--json", help="write the JSON summary here")
    p.add_argument("--verify-uri", help="verify on this node (default: whichever URI serves)")
    p.add_argument("--seed", type=int, help="seed for the choice of blocks")
    args = p.parse_args(argv)
    if args.block_size < RECORD.size or args.block_size % RECORD.size:
        p.error(f"--block-size must be a positive multiple of {RECORD.size}")
    if args.blocks < 1 or args.qd < 1 or args.offset < 0:
        p.error("--blocks and --qd must be positive, --offset not negative")
    return args


def report(checker, problems, error):
    result = checker.summary(problems, error)
    for kind, block, expected, found in problems[:MAX_REPORTED]:
        print(f"ackcheck: {kind} block {block}: expected {expected}, found {found}",
              file=sys.stderr)
    verdict = "OK" if result["ok"] else ("ERROR" if error else "FAILED")
    print(f"ackcheck: {verdict} acked={result['acked']} unacked={result['unacked']} "
          f"flushes={result['flushes']} reconnects={result['reconnects']} "
          f"max_outage={result['max_outage_ms']}ms blocks={result['blocks_written']} "
          f"lost={result['lost']} corrupt={result['corrupt']} in {result['duration_s']}s"
          + (f": {error}" if error else ""), file=sys.stderr)
    if checker.args.json:
        with open(checker.args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return result


def main(argv):
    args = parse_args(argv)
    checker = Checker(args)

    def request_stop(signum, frame):
        checker.stop = True  # same as the stop file: finish, then verify

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        checker.run_writes()
        problems = checker.verify()
    except InfraError as e:
        report(checker, [], str(e))
        return 2
    finally:
        if checker.log:
            checker.log.close()
    return 0 if report(checker, problems, None)["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
