#!/usr/bin/python3
"""nfq_delay: hold packets from an iptables NFQUEUE and let them go after a delay.

The stand-in for netem's `delay` (this kernel has no sch_netem): an iptables rule such as

    iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num 7 --queue-bypass

hands every matching packet to this process, which gives each one a delay drawn uniformly from
[delay - jitter, delay + jitter] and then accepts it (NF_ACCEPT: the kernel sends the original
packet on).  Packets are released in order of their release times, so jitter reorders them;
with --fifo a packet never leaves before one that arrived earlier (jitter without reordering).

It speaks nfnetlink_queue directly over an AF_NETLINK socket (stdlib only; no
libnetfilter_queue).  Only packet metadata is copied to user space (NFQNL_COPY_META); payloads
never leave the kernel.  Run it in the network namespace whose rule feeds it (queues are per
namespace).  It prints "ready" on stdout once bound, so the caller adds the rule only then.
On SIGTERM/SIGINT it accepts everything it still holds and exits.

    nfq_delay.py --queue 7 --delay-ms 200 --jitter-ms 50 [--fifo] [--seed 1]
"""

import argparse
import heapq
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLMSG_DONE = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NF_ACCEPT = 1
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
STEP = 0.0001  # seconds between polls while packets are held
NLMSGHDR = struct.Struct("=IHHII")
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian, packed separately)
ATTR = struct.Struct("=HH")


def attr(kind, payload):
    pad = (4 - len(payload) % 4) % 4
    return ATTR.pack(ATTR.size + len(payload), kind) + payload + b"\0" * pad


def message(kind, queue, attrs, seq, flags=NLM_F_REQUEST, family=socket.AF_INET):
    body = struct.pack("=BB", family, 0) + struct.pack(">H", queue) + b"".join(attrs)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags,
                         seq, 0) + body


def parse_attrs(data):
    out, i = {}, 0
    while i + ATTR.size <= len(data):
        length, kind = ATTR.unpack_from(data, i)
        if length < ATTR.size:
            break
        out[kind & 0x7FFF] = data[i + ATTR.size:i + length]
        i += (length + 3) & ~3
    return out


class Queue:
    def __init__(self, num, maxlen):
        self.num = num
        self.seq = 0
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, opt, 16 << 20)
                break
            except OSError:
                continue
        try:  # a full receive buffer then drops packets silently instead of failing recv
            self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        except OSError:
            pass
        self.sock.bind((0, 0))
        self.config([attr(NFQA_CFG_CMD, struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0,
                                                   socket.htons(socket.AF_INET)))])
        self.config([attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META)),
                     attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", maxlen))])
        try:  # GSO packets whole (no segmentation just to queue them); older kernels lack it
            self.config([attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_GSO)),
                         attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_GSO))])
        except OSError:
            pass

    def config(self, attrs):
        """Send one config message and wait for its acknowledgement (raises on an error)."""
        self.seq += 1
        self.sock.send(message(NFQNL_MSG_CONFIG, self.num, attrs, self.seq,
                               NLM_F_REQUEST | NLM_F_ACK, family=socket.AF_UNSPEC))
        while True:
            data = self.sock.recv(65536)
            i = 0
            while i + NLMSGHDR.size <= len(data):
                length, kind, _, seq, _ = NLMSGHDR.unpack_from(data, i)
                if kind == NLMSG_ERROR and seq == self.seq:
                    (err,) = struct.unpack_from("=i", data, i + NLMSGHDR.size)
                    if err:
                        raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")
                    return
                i += (length + 3) & ~3

    def verdict(self, packet_id):
        self.seq += 1
        self.sock.send(message(NFQNL_MSG_VERDICT, self.num,
                               [attr(NFQA_VERDICT_HDR, struct.pack(">II", NF_ACCEPT,
                                                                  packet_id))],
                               self.seq, family=socket.AF_UNSPEC))

    def packets(self, data):
        """Packet ids in one datagram of queued-packet messages."""
        i = 0
        while i + NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = NLMSGHDR.unpack_from(data, i)
            if length < NLMSGHDR.size:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                attrs = parse_attrs(data[i + NLMSGHDR.size + NFGENMSG.size:i + length])
                hdr = attrs.get(NFQA_PACKET_HDR)
                if hdr and len(hdr) >= 4:
                    yield struct.unpack_from(">I", hdr)[0]
            i += (length + 3) & ~3


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--maxlen", type=int, default=65536, help="kernel queue length")
    p.add_argument("--fifo", action="store_true", help="keep arrival order (no reordering)")
    p.add_argument("--seed", type=int)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    q = Queue(args.queue, args.maxlen)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    print("ready", flush=True)
    held = []  # heap of (release time, arrival number, packet id)
    arrivals = 0
    last_release = 0.0
    lo = max(0.0, args.delay_ms - args.jitter_ms) / 1000
    hi = max(0.0, args.delay_ms + args.jitter_ms) / 1000
    # Socket timeouts (poll) round up to whole milliseconds, which would add up to 1 ms to
    # every packet; while packets are held, poll without blocking and sleep in short steps
    # (nanosleep) instead, so a release is late by about STEP at most.
    q.sock.setblocking(False)
    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            q.verdict(heapq.heappop(held)[2])
        if not held:
            ready, _, _ = select.select([q.sock], [], [], 0.5)
            if not ready:
                continue
        try:
            data = q.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            time.sleep(max(0.0, min(held[0][0] - time.monotonic(), STEP)))
            continue
        except OSError as e:  # ENOBUFS: the kernel dropped some; go on
            print(f"nfq_delay: {e}", file=sys.stderr)
            continue
        now = time.monotonic()
        for pid in q.packets(data):
            arrivals += 1
            release = now + rng.uniform(lo, hi)
            if args.fifo:
                release = last_release = max(release, last_release)
            heapq.heappush(held, (release, arrivals, pid))
    for _, _, pid in sorted(held):
        try:
            q.verdict(pid)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
