"""cluster: a tandem pair, its witness and a client on separate network namespaces.

    from cluster import Cluster
    c = Cluster("/tmp/run", "target/release/tandem", seed=1)
    try:
        c.witness_up(); c.up("alpha"); c.up("beta"); c.ctl("alpha", "primary", "--force")
        f = c.cut("alpha", "beta")      # a fault handle
        ...
        c.heal(f)                        # or c.heal_all()
    finally:
        c.close()

What it builds (all names start with a per-run tag, `tdm<pid>` plus a counter when one process
makes several clusters, so parallel runs and a user's own namespaces never collide):

    <tag>-alpha    10.77.0.1   `tandem up -n alpha`        (NBD :10809, replication :7789)
    <tag>-beta     10.77.0.2   `tandem up -n beta`
    <tag>-witness  10.77.0.3   `tandem witness` (:7790)
    <tag>-client   10.77.0.4   `tandem attach` (:10810) and the load
    <tag>-hub      bridge br0 with one veth port per host (v-alpha, v-beta, ...): the switch

Every host has loopback up and `eth0`, the other end of its veth, in the hub's bridge. The
same addresses are used by every run: each run's hosts only see their own hub.

Network faults are iptables rules in the hub namespace, where packets cross the switch
(br_netfilter passes bridged IPv4 through iptables there): drops and random loss in `raw
PREROUTING`, delays by NFQUEUE to `nfq_delay.py` (a stand-in for netem's delay; this kernel has
no sch_netem). Faults sit at the switch rather than in a sender's OUTPUT chain because a DROP
there is a local send error (EPERM) that TCP sees at once, not a lost packet, and packets held
in the sender's own stack count against TCP small queues, which throttles a delayed flow to a
few packets per delay. Duplication is the TEE target in the sender's namespace (`mangle
POSTROUTING`, one rule per destination, `--gateway` the destination itself).

Disk faults: each node runs with `tandem up --fault-file <dir>/<node>.faults` (hidden flag);
`disk_fault(node, rules)` rewrites the file and sends SIGHUP, which replaces the node's rules
atomically. Rules are `OP:START-END:ACTION` (src/store/fault.rs), e.g. `write:0-4K:eio`,
`any:0-1G:delay=200ms`.

Every process, rule, namespace and helper is tracked; `close()` (also run by atexit and on
SIGINT/SIGTERM) kills the processes it started and deletes the namespaces it made, which
takes their veths, bridge and rules with them. Nothing else is touched.
"""

import atexit
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NFQ_DELAY = os.path.join(HERE, "nfq_delay.py")
PYTHON = "/usr/bin/python3"
NODES = ("alpha", "beta")
HOSTS = ("alpha", "beta", "witness", "client")
ADDR = {"alpha": "10.77.0.1", "beta": "10.77.0.2", "witness": "10.77.0.3",
        "client": "10.77.0.4"}
NBD_PORT, REPL_PORT, WITNESS_PORT, ATTACH_PORT = 10809, 7789, 7790, 10810
RESOURCE = "r0"
# The hooks a bridged packet crosses in the hub after raw PREROUTING (where drops are), in
# order. Each holds at most one delay, so delays of two hosts add up on a packet between them
# (an NF_ACCEPT from a queue skips the rest of that chain, not the later hooks).
DELAY_SLOTS = (("mangle", "PREROUTING"), ("mangle", "FORWARD"), ("filter", "FORWARD"),
               ("mangle", "POSTROUTING"))
DROP_HOOK = ("raw", "PREROUTING")

_counter = itertools.count()
_live = []  # clusters not closed yet, for the signal handlers and atexit
_handlers_installed = False


def _close_all(*_):
    for c in list(_live):
        try:
            c.close()
        except Exception as e:  # keep closing the others
            print(f"cluster: close failed: {e}", flush=True)


def _on_signal(signum, frame):
    _close_all()
    # Re-raise with the default action so the exit status says which signal it was.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers():
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(_close_all)
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _on_signal)


def run(argv, check=True, timeout=30, **kw):
    """Run a command; raises on failure when `check`. Returns CompletedProcess (text)."""
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {r.returncode}: {r.stdout.strip()}")
    return r


class Proc:
    """A process started inside a namespace, with its life recorded for the checks.

    `state` is one of starting, running, stopped (SIGSTOP), stopping (SIGTERM sent),
    killing (SIGKILL sent), dead.
    `gen` counts state changes: a status poll is only judged if the state did not change
    while it ran."""

    def __init__(self, name, popen, log, kind):
        self.name, self.popen, self.log, self.kind = name, popen, log, kind
        self.state = "running"
        self.gen = 0
        self.expected_exit = False  # we killed or stopped it on purpose
        self.started = time.time()

    @property
    def pid(self):
        return self.popen.pid

    def set(self, state):
        self.state = state
        self.gen += 1


class Fault:
    """A handle for one applied network fault: its rules and helper processes."""

    def __init__(self, what):
        self.what = what
        self.rules = []  # (namespace, table, chain, spec list)
        self.helpers = []  # Popen
        self.slot = None

    def __repr__(self):
        return f"<fault {self.what}>"


class Cluster:
    def __init__(self, workdir, tandem_bin, seed=0, size=64 << 20, log=None):
        _install_handlers()
        self.dir = os.path.abspath(workdir)
        os.makedirs(self.dir, exist_ok=True)
        self.bin = os.path.abspath(tandem_bin)
        self.seed = seed
        self.size = size
        self.say = log or (lambda m: print(m, flush=True))
        n = next(_counter)
        self.tag = f"tdm{os.getpid()}" + (f"c{n}" if n else "")
        self.ns = {h: f"{self.tag}-{h}" for h in HOSTS}
        self.hub = f"{self.tag}-hub"
        self.made_ns = []  # namespaces this cluster created (and only these are deleted)
        self.procs = {}  # name -> Proc (alpha, beta, witness, attach, and load processes)
        self.faults = []  # live network faults
        self.slots = {}  # delay slot index -> Fault
        self.queue_nums = itertools.count(1)
        self.lock = threading.RLock()
        self.closed = False
        self.config = os.path.join(self.dir, f"{RESOURCE}.toml")
        self.secret = os.path.join(self.dir, "secret")
        self.witness_data = os.path.join(self.dir, "witness")
        _live.append(self)
        try:
            self._build_network()
            self._write_config()
            for node in NODES:
                self.fault_file(node, [], signal_node=False)
                out = self.tandem("create-md", "-c", self.config, "-n", node, "--size",
                                  str(size))
                self.say(f"cluster: {out.strip()}")
        except BaseException:
            self.close()
            raise

    # -- building --

    def _ns_add(self, name):
        run(["ip", "netns", "add", name])
        self.made_ns.append(name)

    def _build_network(self):
        self._ns_add(self.hub)
        hub = ["ip", "-n", self.hub]
        run(hub + ["link", "set", "lo", "up"])
        run(hub + ["link", "add", "br0", "type", "bridge"])
        run(hub + ["link", "set", "br0", "up"])
        # Bridged IPv4 through the hub's iptables (per-namespace since br_netfilter went
        # netns-aware; 1 is also the default).
        self.hub_exec(["sh", "-c", "echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables"],
                      check=False)
        for h in HOSTS:
            ns = self.ns[h]
            self._ns_add(ns)
            run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
                 f"v-{h}", "netns", self.hub])
            run(hub + ["link", "set", f"v-{h}", "master", "br0", "up"])
            run(["ip", "-n", ns, "addr", "add", f"{ADDR[h]}/24", "dev", "eth0"])
            run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.say(f"cluster: namespaces {', '.join(self.made_ns)} (hub bridge br0)")

    def _write_config(self):
        with open(self.secret, "w") as f:
            f.write(f"nemesis-secret-{self.tag}\n")
        os.chmod(self.secret, 0o600)
        os.makedirs(self.witness_data, exist_ok=True)
        with open(os.path.join(self.witness_data, f"{RESOURCE}.secret"), "w") as f:
            f.write(open(self.secret).read())
        os.chmod(os.path.join(self.witness_data, f"{RESOURCE}.secret"), 0o600)
        nodes = ""
        for n in NODES:
            nodes += (f'[[node]]\nname = "{n}"\ndisk = "{self.disk(n)}"\n'
                      f'meta = "{self.dir}/{n}.meta"\n'
                      f'replication = "{ADDR[n]}:{REPL_PORT}"\nnbd = "{ADDR[n]}:{NBD_PORT}"\n'
                      f'control = "{self.control(n)}"\n\n')
        # The product defaults (ping_interval 200ms, connect_interval 500ms), spelled out
        # where the brief fixes them.
        text = (f'[resource]\nname = "{RESOURCE}"\n\n{nodes}'
                f'[net]\nsecret_file = "{self.secret}"\nping_timeout = "1s"\n\n'
                f'[failover]\nfencing = "witness"\nwitness = "{ADDR["witness"]}:{WITNESS_PORT}"\n'
                f'lease = "2s"\n')
        with open(self.config, "w") as f:
            f.write(text)

    # -- paths and helpers --

    def disk(self, node):
        return os.path.join(self.dir, f"{node}.img")

    def control(self, node):
        return os.path.join(self.dir, f"{node}.sock")

    def logfile(self, name):
        return os.path.join(self.dir, f"{name}.log")

    def fault_path(self, node):
        return os.path.join(self.dir, f"{node}.faults")

    def nbd_uri(self, node):
        return f"nbd://{ADDR[node]}:{NBD_PORT}/{RESOURCE}"

    def attach_uri(self):
        return f"nbd://{ADDR['client']}:{ATTACH_PORT}/{RESOURCE}"

    def tandem(self, *args, timeout=60):
        """Run the tandem binary in the root namespace (control sockets are files)."""
        return run([self.bin, *args], timeout=timeout).stdout

    def hub_exec(self, argv, check=True, timeout=30):
        return run(["ip", "netns", "exec", self.hub, *argv], check=check, timeout=timeout)

    def spawn(self, name, host, argv, kind, env=None, stdout=None):
        """Start `argv` in `host`'s namespace, stderr (and stdout unless given) to NAME.log."""
        log = open(self.logfile(name), "a")
        log.write(f"==== {time.strftime('%H:%M:%S')} start: {shlex.join(argv)}\n")
        log.flush()
        e = dict(os.environ)
        e.update({"RUST_LOG": "info", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        e.update(env or {})
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[host], *argv],
                             stdin=subprocess.DEVNULL, stdout=stdout or log, stderr=log,
                             env=e, start_new_session=True)
        log.close()
        proc = Proc(name, p, self.logfile(name), kind)
        if kind != "load":
            proc.state = "starting"  # "running" once it listens
        with self.lock:
            self.procs[name] = proc
        return proc

    def running(self, name):
        p = self.procs.get(name)
        return p is not None and p.state != "dead" and p.popen.poll() is None

    def pid(self, name):
        return self.procs[name].pid

    def wait_listening(self, host, port, proc, timeout=20):
        """Wait until something listens on TCP `port` inside `host`'s namespace."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = run(["ip", "netns", "exec", self.ns[host], "ss", "-Hltn", f"sport = :{port}"],
                    check=False)
            if r.stdout.strip():
                return True
            if proc.popen.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    # -- nodes --

    def up(self, node, timeout=20):
        """Start `tandem up` for `node`; waits until its control socket answers."""
        if self.running(node):
            raise RuntimeError(f"{node} is already running")
        p = self.spawn(node, node, [self.bin, "up", "-c", self.config, "-n", node,
                                    "--fault-file", self.fault_path(node)], "node")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if p.popen.poll() is not None:
                p.set("dead")
                raise RuntimeError(f"{node} exited with {p.popen.returncode} while starting; "
                                   f"see {p.log}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(1)
                s.connect(self.control(node))
                s.close()
                p.set("running")
                return p
            except OSError:
                time.sleep(0.02)
        self.kill9(node)
        raise RuntimeError(f"{node} did not open its control socket in {timeout}s; see {p.log}")

    def _signal(self, name, sig):
        p = self.procs.get(name)
        if p is None or p.popen.poll() is not None:
            return False
        try:
            os.kill(p.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def kill9(self, name):
        """SIGKILL and reap (a stopped process dies too)."""
        p = self.procs.get(name)
        if p is None:
            return None
        p.expected_exit = True
        p.set("killing")  # before the signal: a status poll racing with it is not judged
        self._signal(name, signal.SIGKILL)
        rc = p.popen.wait()
        p.set("dead")
        return rc

    def term(self, name, timeout=30):
        """SIGTERM (after SIGCONT if stopped) and wait; returns the exit code, or None if it
        had to be killed after `timeout` seconds."""
        p = self.procs.get(name)
        if p is None or p.popen.poll() is not None:
            if p:
                p.set("dead")
            return p.popen.returncode if p else None
        p.expected_exit = True
        p.set("stopping")
        self._signal(name, signal.SIGCONT)
        self._signal(name, signal.SIGTERM)
        try:
            rc = p.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.say(f"cluster: {name} did not exit within {timeout}s of SIGTERM; SIGKILL")
            self._signal(name, signal.SIGKILL)
            p.popen.wait()
            rc = None
        p.set("dead")
        return rc

    def stop(self, name):
        """SIGSTOP."""
        p = self.procs.get(name)
        if p is None or p.popen.poll() is not None:
            return False
        p.set("stopped")  # before the signal, as for kill9
        return self._signal(name, signal.SIGSTOP)

    def cont(self, name):
        """SIGCONT."""
        p = self.procs.get(name)
        if p and self._signal(name, signal.SIGCONT):
            if p.state == "stopped":
                p.set("running")
            return True
        return False

    def status(self, node, timeout=5.0):
        """The node's `status` JSON (dict) through its control socket, or None."""
        result, _, _ = self.status_timed(node, timeout)
        return result

    def status_cli(self, node, timeout=5.0):
        """The same through `tandem status --json` (a process per call; `status` asks the
        socket directly with the request that command sends, `{"cmd":"status"}`)."""
        try:
            r = run([self.bin, "status", "--json", "-c", self.config, "-n", node], check=False,
                    timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def status_timed(self, node, timeout=5.0):
        """(status dict or None, error string or None, seconds taken)."""
        t0 = time.monotonic()
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        try:
            s.connect(self.control(node))
            s.sendall(b'{"cmd":"status"}\n')
            buf = b""
            while not buf.endswith(b"\n"):
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    raise socket.timeout("timed out")
                s.settimeout(left)
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise OSError("connection closed")
                buf += chunk
            reply = json.loads(buf)
            if not reply.get("ok"):
                return None, f"refused: {reply.get('error')}", time.monotonic() - t0
            return reply["result"], None, time.monotonic() - t0
        except (OSError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}", time.monotonic() - t0
        finally:
            s.close()

    def ctl(self, node, *args, timeout=60):
        """An operator command on `node`: `ctl("alpha", "switchover", "--to", "beta")`,
        `ctl(n, "disconnect")`, `connect`, `verify`, `invalidate`, `primary`, ...
        Returns (exit code, output); a timeout is exit code None."""
        cmd, rest = args[0], list(args[1:])
        argv = [self.bin, cmd, "-c", self.config, "-n", node, *rest]
        try:
            r = run(argv, check=False, timeout=timeout)
            return r.returncode, r.stdout.strip()
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout}s"

    def fault_file(self, node, rules, signal_node=True):
        """Write `node`'s fault rules (atomically) and, if it runs, SIGHUP it to reload."""
        path = self.fault_path(node)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(r + "\n" for r in rules))
        os.rename(tmp, path)
        if signal_node and self.running(node) and self.procs[node].kind == "node":
            self._signal(node, signal.SIGHUP)

    def disk_fault(self, node, rules):
        self.fault_file(node, list(rules))

    def disk_heal(self, node):
        self.fault_file(node, [])

    # -- witness --

    def witness_up(self, timeout=10):
        if self.running("witness"):
            raise RuntimeError("witness is already running")
        p = self.spawn("witness", "witness",
                       [self.bin, "witness", "--listen", f"{ADDR['witness']}:{WITNESS_PORT}",
                        "--data", self.witness_data], "witness")
        if not self.wait_listening("witness", WITNESS_PORT, p, timeout):
            self.kill9("witness")
            raise RuntimeError(f"witness did not start; see {p.log}")
        p.set("running")
        return p

    def witness_kill9(self):
        return self.kill9("witness")

    def witness_stop(self):
        return self.stop("witness")

    def witness_cont(self):
        return self.cont("witness")

    # -- the client host --

    def attach_up(self, timeout=20):
        """`tandem attach --listen <client>:10810` in the client namespace."""
        p = self.spawn("attach", "client",
                       [self.bin, "attach", "-c", self.config, "--listen",
                        f"{ADDR['client']}:{ATTACH_PORT}"], "attach")
        if not self.wait_listening("client", ATTACH_PORT, p, timeout):
            self.kill9("attach")
            raise RuntimeError(f"attach did not start; see {p.log}")
        p.set("running")
        return p

    def client_spawn(self, name, argv, env=None):
        """Any process (a load generator) in the client namespace."""
        return self.spawn(name, "client", argv, "load", env=env)

    # -- network faults (rules in the hub, where packets cross the switch) --

    def _add_rule(self, fault, ns, table, chain, spec, first=False):
        argv = ["ip", "netns", "exec", ns, "iptables", "-w", "-t", table,
                "-I" if first else "-A", chain, *spec]
        run(argv)
        fault.rules.append((ns, table, chain, spec))

    def _new_fault(self, what):
        f = Fault(what)
        with self.lock:
            self.faults.append(f)
        return f

    def _drops(self, what, pairs, extra=()):
        """DROP rules for (src, dst) address pairs; None matches any address."""
        f = self._new_fault(what)
        try:
            for src, dst in pairs:
                spec = []
                if src:
                    spec += ["-s", ADDR[src]]
                if dst:
                    spec += ["-d", ADDR[dst]]
                self._add_rule(f, self.hub, *DROP_HOOK, spec + list(extra) + ["-j", "DROP"],
                               first=True)
        except BaseException:
            self.heal(f)
            raise
        return f

    def cut(self, a, b):
        """Drop everything between hosts a and b, both ways."""
        return self._drops(f"cut {a}<->{b}", [(a, b), (b, a)])

    def cut_oneway(self, src, dst):
        """Drop packets from src to dst; dst's packets to src still arrive."""
        return self._drops(f"cut {src}->{dst}", [(src, dst)])

    def isolate(self, host):
        """Drop everything to and from `host`."""
        return self._drops(f"isolate {host}", [(host, None), (None, host)])

    def loss(self, host, pct):
        """Drop `pct` percent of the packets to and from `host`, at random."""
        return self._drops(f"loss {host} {pct}%", [(host, None), (None, host)],
                           ["-m", "statistic", "--mode", "random", "--probability",
                            f"{pct / 100:.4f}"])

    def dup(self, host, pct=100):
        """Duplicate `pct` percent of `host`'s outgoing packets (TEE to the destination)."""
        f = self._new_fault(f"dup {host} {pct}%")
        try:
            for other in HOSTS:
                if other == host:
                    continue
                spec = ["-o", "eth0", "-d", ADDR[other]]
                if pct < 100:
                    spec += ["-m", "statistic", "--mode", "random", "--probability",
                             f"{pct / 100:.4f}"]
                self._add_rule(f, self.ns[host], "mangle", "POSTROUTING",
                               spec + ["-j", "TEE", "--gateway", ADDR[other]])
        except BaseException:
            self.heal(f)
            raise
        return f

    def delay(self, host, ms, jitter_ms=0, reorder=True):
        """Delay every packet to and from `host` by ms +- jitter_ms (uniform); with
        `reorder`, jitter lets later packets overtake earlier ones."""
        with self.lock:
            free = [i for i in range(len(DELAY_SLOTS)) if i not in self.slots]
            if not free:
                raise RuntimeError("no free delay slot")
            slot = free[0]
            f = self._new_fault(f"delay {host} {ms}ms+-{jitter_ms}ms"
                                f"{'' if reorder else ' fifo'}")
            f.slot = slot
            self.slots[slot] = f
        try:
            q = next(self.queue_nums)
            argv = ["ip", "netns", "exec", self.hub, PYTHON, NFQ_DELAY, "--queue", str(q),
                    "--delay-ms", str(ms), "--jitter-ms", str(jitter_ms),
                    "--seed", str(self.seed * 1000 + q)]
            if not reorder:
                argv.append("--fifo")
            log = open(self.logfile("nfq_delay"), "a")
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=log, text=True, start_new_session=True)
            log.close()
            f.helpers.append(p)
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"nfq_delay did not start (said {line!r}); see "
                                   f"{self.logfile('nfq_delay')}")
            table, chain = DELAY_SLOTS[slot]
            for spec in (["-s", ADDR[host]], ["-d", ADDR[host]]):
                self._add_rule(f, self.hub, table, chain,
                               spec + ["-j", "NFQUEUE", "--queue-num", str(q),
                                       "--queue-bypass"])
        except BaseException:
            self.heal(f)
            raise
        return f

    def heal(self, fault):
        """Remove one fault's rules, then stop its helpers (which release held packets)."""
        for ns, table, chain, spec in reversed(fault.rules):
            run(["ip", "netns", "exec", ns, "iptables", "-w", "-t", table, "-D", chain, *spec],
                check=False)
        fault.rules = []
        for p in fault.helpers:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        fault.helpers = []
        with self.lock:
            if fault in self.faults:
                self.faults.remove(fault)
            if fault.slot is not None and self.slots.get(fault.slot) is fault:
                del self.slots[fault.slot]

    def heal_all(self):
        """Remove every network fault this cluster added; then make sure no rule is left
        in any of its namespaces (flushing what is)."""
        for f in list(self.faults):
            self.heal(f)
        for ns in self.made_ns:
            r = run(["ip", "netns", "exec", ns, "iptables-save"], check=False)
            rules = [l for l in r.stdout.splitlines() if l.startswith("-A")]
            if rules:
                self.say(f"cluster: {ns}: leftover rules {rules}; flushing")
                for table in ("raw", "mangle", "filter"):
                    run(["ip", "netns", "exec", ns, "iptables", "-w", "-t", table, "-F"],
                        check=False)

    # -- measurements --

    def rss_kib(self, name):
        """VmRSS of a running process in KiB, or None."""
        p = self.procs.get(name)
        if p is None or p.popen.poll() is not None:
            return None
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    # -- teardown --

    def close(self):
        """Kill every process this cluster started and delete its namespaces. Idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for f in list(self.faults):
            for p in f.helpers:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for name, p in list(self.procs.items()):
            if p.popen.poll() is None:
                p.expected_exit = True
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            p.set("dead")
        for ns in reversed(self.made_ns):
            # Anything still inside (it should be nothing) would keep the namespace alive.
            r = run(["ip", "netns", "pids", ns], check=False)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns], check=False)
        self.made_ns = []
        if self in _live:
            _live.remove(self)
