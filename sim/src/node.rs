//! The simulated world: two nodes, a witness, a network and a client, one event at a time.
//!
//! Each node is tandem's real `State`, metadata (`Meta` on a file), unflushed set and
//! decisions (`rules`, `decide`); the handlers below call them in the order the runtime does
//! (the file of the runtime each handler follows is named in its comment).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem::config::Fencing;
use tandem::meta::fault::{MetaFault, MetaFaults, MetaPoint};
use tandem::meta::{Generations, Meta, EXTENT_SIZE};
use tandem::mutation::{self, Mutation};
use tandem::node::core::{Conn, State};
use tandem::node::decide::{self, EpochCheck, LinkPlan, PeerClaim, Side};
use tandem::node::duty::{self, Duty, Effect};
use tandem::node::records;
use tandem::node::rules::{self, hold_decision, Fence, HoldDecision, OnLinkLost};
use tandem::node::{DiskState, Role};
use tandem::policy::SplitBrainPolicy;
use tandem::repl::proto::PeerState;
use tandem::repl::unflushed::Unflushed;
use tandem::witness::proto::{Reply, Request};
use tandem::witness::state::{Persisted, ResourceState};

use crate::check::{Expect, Outcome, Writers};
use crate::world::{Micros, Queue, Rng, MS, SEC};

const NAMES: [&str; 2] = ["alpha", "beta"];
const RESOURCE: &str = "sim";
/// Tracked 4 KiB blocks, one per extent, over more extents than the activity log holds, so
/// extents are evicted from it.
const NBLK: usize = 80;
const EXTENTS: u64 = 96;
const SIZE: u64 = EXTENTS * EXTENT_SIZE;
const AL_EXTENTS: u32 = 67;
const BLOCK: u64 = 4096;
const LEASE: Duration = Duration::from_secs(2);
const PING_EVERY: Micros = 200 * MS;
const PING_TIMEOUT: Micros = SEC;
const WITNESS_TIMEOUT: Micros = 500 * MS;
const CONNECT_EVERY: Micros = 300 * MS;
const FENCE_RETRY: Micros = 250 * MS;
const RESYNC_CHUNK: u64 = 256 * 1024;
const RESYNC_WINDOW: usize = 8;
/// After the faults end, the pair must be identical and in sync within this much.
const HEAL_LIMIT: Micros = 90 * SEC;
const TRACE_KEEP: usize = 400;

fn block_offset(b: usize) -> u64 {
    ((b as u64 * 7) % EXTENTS) * EXTENT_SIZE + (b as u64 % 5) * 3 * BLOCK
}

/// Tracked blocks inside `[off, off+len)`.
fn blocks_in(off: u64, len: u64) -> impl Iterator<Item = usize> {
    (0..NBLK).filter(move |&b| {
        let o = block_offset(b);
        o >= off && o < off + len
    })
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Faults injected per run.
    pub faults: u64,
    pub mutation: Option<Mutation>,
    /// Keep the whole trace, not only the end before a violation.
    pub full_trace: bool,
    /// Where the metadata files live (a tmpfs is fastest).
    pub dir: PathBuf,
    /// Trace every write, copy and loss of this block.
    pub watch: Option<usize>,
    /// Simulate power losses (a node's page cache lost in part).
    pub power_loss: bool,
    /// Only a node that is secondary when the fault starts loses power.
    pub secondary_power_loss_only: bool,
    /// Metadata writes failing with EIO (off by default: see the README's open findings).
    pub meta_eio: bool,
}

/// A data disk: what is on stable storage and what is only in the page cache.
#[derive(Default, Clone)]
struct Disk {
    durable: BTreeMap<usize, u64>,
    cache: BTreeMap<usize, u64>,
}

impl Disk {
    fn read(&self, b: usize) -> u64 {
        self.cache
            .get(&b)
            .or_else(|| self.durable.get(&b))
            .copied()
            .unwrap_or(0)
    }
    fn write(&mut self, b: usize, v: u64) {
        self.cache.insert(b, v);
    }
    fn flush(&mut self) {
        let c = std::mem::take(&mut self.cache);
        self.durable.extend(c);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerRes {
    Waiting,
    Acked,
    Lost,
}

/// A client write in progress on the primary (`replicated.rs`, `both`).
struct PendingWrite {
    op: u64,
    b: usize,
    v: u64,
    conn: Option<u64>,
    peer: PeerRes,
}

struct Link {
    conn: u64,
    peer: PeerState,
    last_rx: Micros,
}

/// A handshake this node has sent its state for.
struct Hs {
    conn: u64,
    mine: PeerState,
}

enum Stage {
    Pushing,
    Flushing,
}

/// A resync this node is the source of (`resync.rs`).
struct Resync {
    conn: u64,
    cursor: u64,
    inflight: BTreeMap<u64, (u64, u64)>,
    stage: Stage,
}

#[derive(Debug, Clone)]
enum Purpose {
    /// A question of the node's witness duty (`tandem::node::duty`).
    Duty { ask: duty::Ask, sent: Instant },
}

#[derive(Debug, Clone)]
enum Msg {
    Hello { state: PeerState, words: Vec<u64> },
    Write { seq: u64, b: usize, v: u64 },
    WriteAck { seq: u64 },
    Flush { seq: u64 },
    FlushAck { seq: u64 },
    Resync { seq: u64, vals: Vec<(usize, u64)> },
    ResyncAck { seq: u64 },
    ResyncDone { gens: Generations },
    State(PeerState),
    Ping,
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    Dial,
    Ping,
    /// A timer of the node's witness duty.
    Duty(duty::Tick),
    /// The operator asks again for a forced promotion the witness refused for now.
    Force(u32),
    /// A resync whose end could not be recorded goes again.
    ResyncRetry,
}

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    /// Both directions between the nodes.
    CutPair,
    /// One direction between the nodes.
    CutOneWay(usize, usize),
    /// A node and the witness, both directions.
    CutWitness(usize),
    /// kill -9: the process dies, the page cache survives; the peer sees the close.
    Kill(usize),
    /// Power loss: the page cache is lost in part; nobody sees a close.
    Crash(usize),
    WitnessDown,
    /// The operator runs `primary --force` on a node that cannot see its primary (what the
    /// runbook says for a primary that is gone for good).
    Force,
    /// Every metadata write (or fdatasync) of one kind fails with EIO on a node, through the
    /// metadata's own fault hooks (`meta::fault`).
    MetaEio(usize, usize),
}

/// Where `MetaEio` strikes, by index.
const META_POINTS: [MetaPoint; 4] = [
    MetaPoint::Superblock,
    MetaPoint::ActivityLog,
    MetaPoint::Bitmap,
    MetaPoint::Sync,
];
const EIO: i32 = 5;

enum Ev {
    Net {
        from: usize,
        to: usize,
        conn: u64,
        msg: Msg,
    },
    WitnessReq {
        from: usize,
        inc: u64,
        id: u64,
        req: Request,
    },
    WitnessRep {
        to: usize,
        inc: u64,
        id: u64,
        rep: Reply,
    },
    WitnessTimeout {
        node: usize,
        inc: u64,
        id: u64,
    },
    Timer {
        node: usize,
        inc: u64,
        t: Timer,
    },
    Client,
    FaultStart(FaultKind, Micros),
    FaultEnd(FaultKind),
    /// The operator resolves a split brain: `connect --discard-my-data` on one side.
    Resolve,
    Check,
}

struct Node {
    up: bool,
    /// The machine's boot count (a power loss boots it again).
    boot: u64,
    inc: u64,
    /// Clock rate against real time (drift).
    rate: f64,
    meta: Option<Meta>,
    path: PathBuf,
    disk: Disk,
    st: State,
    link: Option<Link>,
    hs: Option<Hs>,
    unflushed: Unflushed,
    writes: BTreeMap<u64, PendingWrite>,
    flushes: BTreeMap<u64, (u64, u64, u64)>,
    next_seq: u64,
    wwait: HashMap<u64, Purpose>,
    wqueue: std::collections::VecDeque<(Request, Purpose, Micros)>,
    /// The witness duty: the node's own state machine, as `failover::run_duty` drives it.
    duty: Duty,
    promoting: bool,
    /// The metadata fault rules in force (kept across restarts, like a failing device).
    meta_faults: Arc<MetaFaults>,
    meta_rules: Vec<MetaFault>,
    force_tries: u32,
    resync: Option<Resync>,
}

struct Witness {
    up: bool,
    state: ResourceState,
    persisted: Persisted,
}

#[derive(Default)]
struct Client {
    target: usize,
    next_op: u64,
    next_val: u64,
    /// op -> (block, index in its history)
    writes: BTreeMap<u64, (usize, usize)>,
    flushes: BTreeMap<u64, Vec<usize>>,
    busy: Vec<bool>,
}

pub struct Sim {
    now: Micros,
    base: Instant,
    rng: Rng,
    q: Queue<Ev>,
    nodes: [Node; 2],
    w: Witness,
    /// `cut[from][to]`; index 2 is the witness.
    cut: [[u32; 3]; 3],
    /// Per connection and direction: a message was lost, so nothing more arrives that way.
    broken: HashMap<(u64, usize), bool>,
    /// Last delivery time per connection and direction (links are FIFO).
    fifo: HashMap<(u64, usize), Micros>,
    next_conn: u64,
    next_wid: u64,
    client: Client,
    expect: Expect,
    writers: Writers,
    out: Outcome,
    trace: Vec<String>,
    full_trace: bool,
    watch: Option<usize>,
    power_loss: bool,
    secondary_power_loss_only: bool,
    meta_eio: bool,
    faults_left: u64,
    faults_end: Option<Micros>,
    active_faults: u32,
    healed_at: Option<Micros>,
    operator_at: Option<Micros>,
    /// The operator's requests waiting for an answer: id -> (node, forced).
    requests: HashMap<u64, (usize, bool)>,
    next_request: u64,
    operator_turn: usize,
    /// Forced promotions so far: only after one may the copies split.
    /// What the client had acknowledged when the copies were last in sync.
    sync_snap: Vec<usize>,
    done: bool,
}

/// Run one seed.
pub fn run(seed: u64, opts: &Options) -> Outcome {
    mutation::set(opts.mutation);
    tandem::meta::gen::seed_this_thread(Some(seed.wrapping_mul(0x2545_F491_4F6C_DD1D)));
    let out = Sim::new(seed, opts).run();
    tandem::meta::gen::seed_this_thread(None);
    mutation::set(None);
    out
}

/// A simulated machine's boot id: its boot count, never zero.
fn boot_id(boot: u64) -> [u8; 16] {
    (u128::from(boot) + 1).to_le_bytes()
}

fn new_duty(i: usize) -> Duty {
    let retry = Duration::from_micros(FENCE_RETRY);
    Duty::new(NAMES[i], NAMES[1 - i], Fencing::Witness, LEASE, retry)
}

fn meta_path(dir: &Path, seed: u64, i: usize) -> PathBuf {
    let tid = format!("{:?}", std::thread::current().id());
    let tid: String = tid.chars().filter(|c| c.is_ascii_digit()).collect();
    dir.join(format!(
        "sim-{}-{tid}-{seed}-{}.md",
        std::process::id(),
        NAMES[i]
    ))
}

impl Node {
    fn new(i: usize, path: PathBuf, rate: f64) -> Node {
        Meta::create_with(&path, RESOURCE, NAMES[i], SIZE, AL_EXTENTS, true)
            .expect("creating the simulated metadata");
        // Both copies start identical and UpToDate, as after `create-md` and a first sync.
        let mut meta = Meta::open_booted(&path, RESOURCE, NAMES[i], SIZE, boot_id(1))
            .expect("opening metadata");
        meta.update(|sb| {
            sb.flags.consistent = true;
            sb.gens = Generations {
                current: 0x1000,
                bitmap: 0,
                history: [0, 0],
            };
        })
        .expect("initial metadata");
        let meta_faults = Arc::new(MetaFaults::new(Vec::new()));
        meta.set_faults(meta_faults.clone());
        Node {
            up: true,
            boot: 1,
            inc: 1,
            rate,
            meta: Some(meta),
            path,
            disk: Disk::default(),
            st: State::new(DiskState::UpToDate),
            link: None,
            hs: None,
            unflushed: Unflushed::default(),
            writes: BTreeMap::new(),
            flushes: BTreeMap::new(),
            next_seq: 1,
            wwait: HashMap::new(),
            wqueue: Default::default(),
            duty: new_duty(i),
            promoting: false,
            meta_faults,
            meta_rules: Vec::new(),
            force_tries: 0,
            resync: None,
        }
    }

    fn meta(&mut self) -> &mut Meta {
        self.meta.as_mut().expect("a running node has its metadata")
    }

    /// The metadata and the state together, for `records`.
    fn both(&mut self) -> (&mut Meta, &mut State) {
        (
            self.meta.as_mut().expect("a running node has its metadata"),
            &mut self.st,
        )
    }

    fn epoch(&self) -> u64 {
        self.meta.as_ref().map_or(0, |m| m.superblock().epoch)
    }

    fn peer_state(&self) -> PeerState {
        records::peer_state(self.meta.as_ref().expect("running"), &self.st)
    }
}

impl Sim {
    fn new(seed: u64, opts: &Options) -> Sim {
        let mut rng = Rng::new(seed);
        // Each node's clock runs up to 2% fast or slow: within the lease margin (10%).
        let mut rate = || 1.0 + (rng.range(0, 4001) as f64 - 2000.0) / 100_000.0;
        let (ra, rb) = (rate(), rate());
        let nodes = [
            Node::new(0, meta_path(&opts.dir, seed, 0), ra),
            Node::new(1, meta_path(&opts.dir, seed, 1), rb),
        ];
        let base = Instant::now();
        let mut sim = Sim {
            now: 0,
            base,
            rng,
            q: Queue::default(),
            nodes,
            w: Witness {
                up: true,
                state: ResourceState::default(),
                persisted: ResourceState::default().persisted(),
            },
            cut: [[0; 3]; 3],
            broken: HashMap::new(),
            fifo: HashMap::new(),
            next_conn: 1,
            next_wid: 1,
            client: Client {
                busy: vec![false; NBLK],
                ..Client::default()
            },
            expect: Expect::new(NBLK),
            writers: Writers::default(),
            out: Outcome {
                seed,
                ..Outcome::default()
            },
            trace: Vec::new(),
            full_trace: opts.full_trace,
            watch: opts.watch,
            power_loss: opts.power_loss,
            secondary_power_loss_only: opts.secondary_power_loss_only,
            meta_eio: opts.meta_eio,
            faults_left: opts.faults,
            faults_end: None,
            active_faults: 0,
            healed_at: None,
            operator_at: None,
            requests: HashMap::new(),
            next_request: 0,
            operator_turn: 1,
            sync_snap: vec![0; NBLK],
            done: false,
        };
        sim.log(format!("clocks: alpha x{ra:.4}, beta x{rb:.4}"));
        for i in 0..2 {
            sim.timer(i, Timer::Ping, PING_EVERY);
        }
        sim.timer(0, Timer::Dial, 10 * MS);
        sim.q.at(50 * MS, Ev::Client);
        sim.q.at(SEC, Ev::Check);
        sim.schedule_fault();
        // The operator makes alpha primary once the pair is up.
        sim.operator_at = Some(500 * MS);
        sim
    }

    fn log(&mut self, s: String) {
        let line = format!("{:>10.3} {s}", self.now as f64 / 1e6);
        self.trace.push(line);
        if !self.full_trace && self.trace.len() > 2 * TRACE_KEEP {
            self.trace.drain(..TRACE_KEEP);
        }
    }

    fn watch(&mut self, b: usize, what: impl FnOnce() -> String) {
        if self.watch == Some(b) {
            let w = what();
            self.log(format!("block {b}: {w}"));
        }
    }

    fn violation(&mut self, s: String) {
        if self.out.violations.len() < 20 {
            self.log(format!("VIOLATION: {s}"));
            self.out.violations.push(s);
        }
        self.done = true;
    }

    /// This node's clock now.
    fn clock(&self, i: usize) -> Instant {
        self.base + Duration::from_micros((self.now as f64 * self.nodes[i].rate) as u64)
    }

    /// Schedule a node timer `d` of that node's time from now.
    fn timer(&mut self, i: usize, t: Timer, d: Micros) {
        let real = (d as f64 / self.nodes[i].rate) as Micros;
        let inc = self.nodes[i].inc;
        self.q
            .at(self.now + real.max(1), Ev::Timer { node: i, inc, t });
    }

    fn delay(&mut self) -> Micros {
        if self.rng.chance(1, 50) {
            self.rng.range(5 * MS, 80 * MS)
        } else {
            self.rng.range(50, 2 * MS)
        }
    }

    // ---- the network ------------------------------------------------------------------

    fn send(&mut self, from: usize, conn: u64, msg: Msg) {
        let to = 1 - from;
        if self.broken.contains_key(&(conn, from)) {
            return;
        }
        if self.cut[from][to] > 0 {
            // A stream that loses a message delivers nothing after it: TCP retransmits until
            // one side gives up on the link.
            self.broken.insert((conn, from), true);
            return;
        }
        let d = self.delay();
        let last = self.fifo.get(&(conn, from)).copied().unwrap_or(0);
        let at = (self.now + d).max(last);
        self.fifo.insert((conn, from), at);
        self.q.at(
            at,
            Ev::Net {
                from,
                to,
                conn,
                msg,
            },
        );
    }

    /// A request to the witness. Like the node's witness client, one at a time on one
    /// connection: a request waits for the one before it to be answered or to time out.
    fn witness_call(&mut self, i: usize, req: Request, p: Purpose, limit: Micros) {
        self.nodes[i].wqueue.push_back((req, p, limit));
        if self.nodes[i].wwait.is_empty() {
            self.witness_next(i);
        }
    }

    fn witness_next(&mut self, i: usize) {
        let Some((req, p, limit)) = self.nodes[i].wqueue.pop_front() else {
            return;
        };
        let id = self.next_wid;
        self.next_wid += 1;
        let inc = self.nodes[i].inc;
        self.nodes[i].wwait.insert(id, p);
        if self.cut[i][2] == 0 {
            let d = self.delay();
            self.q.at(
                self.now + d,
                Ev::WitnessReq {
                    from: i,
                    inc,
                    id,
                    req,
                },
            );
        }
        self.q
            .at(self.now + limit, Ev::WitnessTimeout { node: i, inc, id });
    }

    fn witness_now(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    // ---- the main loop ----------------------------------------------------------------

    fn run(mut self) -> Outcome {
        while let Some((at, ev)) = self.q.pop() {
            self.now = at;
            self.out.events += 1;
            self.handle(ev);
            for i in 0..2 {
                self.settle_holds(i);
            }
            if self.done {
                break;
            }
        }
        self.out.sim_micros = self.now;
        for n in &self.nodes {
            let _ = std::fs::remove_file(&n.path);
        }
        self.out.trace = std::mem::take(&mut self.trace);
        if !self.full_trace && !self.out.violations.is_empty() {
            let keep = self.out.trace.len().saturating_sub(TRACE_KEEP);
            self.out.trace.drain(..keep);
        }
        self.out
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Net {
                from,
                to,
                conn,
                msg,
            } => {
                if self.broken.contains_key(&(conn, from)) || !self.nodes[to].up {
                    return;
                }
                self.on_msg(to, conn, msg);
            }
            Ev::WitnessReq { from, inc, id, req } => {
                if !self.w.up {
                    return;
                }
                let now = self.witness_now();
                let (rep, changed) = self.w.state.apply(NAMES[from], req.clone(), now);
                if changed {
                    self.w.persisted = self.w.state.persisted();
                }
                self.log(format!("witness: {} {req:?} -> {rep:?}", NAMES[from]));
                if self.cut[2][from] == 0 {
                    let d = self.delay();
                    self.q.at(
                        self.now + d,
                        Ev::WitnessRep {
                            to: from,
                            inc,
                            id,
                            rep,
                        },
                    );
                }
            }
            Ev::WitnessRep { to, inc, id, rep } => {
                let n = &mut self.nodes[to];
                if !n.up || n.inc != inc {
                    return;
                }
                if let Some(p) = n.wwait.remove(&id) {
                    self.on_witness(to, p, Ok(rep));
                    self.witness_next(to);
                }
            }
            Ev::WitnessTimeout { node, inc, id } => {
                let n = &mut self.nodes[node];
                if !n.up || n.inc != inc {
                    return;
                }
                if let Some(p) = n.wwait.remove(&id) {
                    self.on_witness(node, p, Err(()));
                    self.witness_next(node);
                }
            }
            Ev::Timer { node, inc, t } => {
                if self.nodes[node].up && self.nodes[node].inc == inc {
                    self.on_timer(node, t);
                }
            }
            Ev::Client => self.client_tick(),
            Ev::FaultStart(f, dur) => self.fault_start(f, dur),
            Ev::FaultEnd(f) => self.fault_end(f),
            Ev::Resolve => self.resolve_split_brain(),
            Ev::Check => self.periodic_check(),
        }
    }

    // ---- faults -----------------------------------------------------------------------

    fn schedule_fault(&mut self) {
        if self.faults_left == 0 {
            return;
        }
        self.faults_left -= 1;
        let kinds = [
            FaultKind::CutPair,
            FaultKind::CutOneWay(0, 1),
            FaultKind::CutOneWay(1, 0),
            FaultKind::CutWitness(0),
            FaultKind::CutWitness(1),
            FaultKind::Kill(0),
            FaultKind::Kill(1),
            FaultKind::Crash(0),
            FaultKind::Crash(1),
            FaultKind::WitnessDown,
            FaultKind::Force,
            FaultKind::MetaEio(0, 0),
            FaultKind::MetaEio(1, 0),
        ];
        let n = kinds.len() - if self.meta_eio { 0 } else { 2 };
        let mut f = kinds[self.rng.range(0, n as u64) as usize];
        if let FaultKind::MetaEio(i, _) = f {
            f = FaultKind::MetaEio(i, self.rng.range(0, META_POINTS.len() as u64) as usize);
        }
        if let (FaultKind::Crash(i), false) = (f, self.power_loss) {
            f = FaultKind::Kill(i);
        }
        let gap = self.rng.range(200 * MS, 3 * SEC);
        let dur = if self.rng.chance(1, 3) {
            self.rng.range(100 * MS, 1500 * MS)
        } else {
            self.rng.range(1500 * MS, 8 * SEC)
        };
        self.q.at(self.now + gap, Ev::FaultStart(f, dur));
    }

    fn fault_start(&mut self, f: FaultKind, dur: Micros) {
        self.out.faults += 1;
        self.active_faults += 1;
        self.log(format!("FAULT {f:?} for {} ms", dur / MS));
        match f {
            FaultKind::CutPair => {
                self.cut[0][1] += 1;
                self.cut[1][0] += 1;
            }
            FaultKind::CutOneWay(a, b) => self.cut[a][b] += 1,
            FaultKind::CutWitness(i) => {
                self.cut[i][2] += 1;
                self.cut[2][i] += 1;
            }
            FaultKind::Kill(i) => self.stop(i, false),
            // With power losses limited to secondaries, a primary's power loss is a kill.
            FaultKind::Crash(i) => {
                let power =
                    !self.secondary_power_loss_only || self.nodes[i].st.role() == Role::Secondary;
                self.stop(i, power)
            }
            FaultKind::WitnessDown => self.w.up = false,
            FaultKind::Force => self.force_promote(0),
            FaultKind::MetaEio(i, p) => {
                let n = &mut self.nodes[i];
                n.meta_rules.push(MetaFault {
                    point: META_POINTS[p],
                    errno: EIO,
                });
                n.meta_faults.set(n.meta_rules.clone());
            }
        }
        // Faults overlap: the next may start before this one ends.
        self.q.at(self.now + dur, Ev::FaultEnd(f));
        self.schedule_fault();
        if self.faults_left == 0 && self.faults_end.is_none() {
            self.faults_end = Some(self.now + dur);
        }
    }

    fn fault_end(&mut self, f: FaultKind) {
        self.active_faults -= 1;
        self.log(format!("heal {f:?}"));
        match f {
            FaultKind::CutPair => {
                self.cut[0][1] -= 1;
                self.cut[1][0] -= 1;
            }
            FaultKind::CutOneWay(a, b) => self.cut[a][b] -= 1,
            FaultKind::CutWitness(i) => {
                self.cut[i][2] -= 1;
                self.cut[2][i] -= 1;
            }
            FaultKind::Kill(i) | FaultKind::Crash(i) => self.restart(i),
            FaultKind::Force => {}
            FaultKind::MetaEio(i, p) => {
                let n = &mut self.nodes[i];
                if let Some(k) = n.meta_rules.iter().position(|r| r.point == META_POINTS[p]) {
                    n.meta_rules.remove(k);
                }
                n.meta_faults.set(n.meta_rules.clone());
            }
            FaultKind::WitnessDown => {
                // Its state is what it persisted; leases restart at its restart.
                let now = self.witness_now();
                self.w.state = ResourceState::restore(self.w.persisted.clone(), now);
                self.w.up = true;
            }
        }
        if self.faults_left == 0 && self.active_faults == 0 && self.healed_at.is_none() {
            self.healed_at = Some(self.now);
            self.log("all faults healed".into());
            self.operator_at = Some(self.now + 3 * SEC);
        }
    }

    /// The node's process stops. `power`: the machine lost power, and with it part of the
    /// page cache; otherwise (kill -9) the cache survives and the peer sees the close.
    fn stop(&mut self, i: usize, power: bool) {
        if !self.nodes[i].up {
            return;
        }
        self.out.crashes += 1;
        if power {
            // Every copy of an acknowledged, unflushed write that this crash loses, with no
            // other copy holding it: those writes are legitimately gone.
            let lost: Vec<(usize, u64)> = self.nodes[i]
                .disk
                .cache
                .iter()
                .map(|(&b, &v)| (b, v))
                .collect();
            for (b, v) in lost {
                let keep = self.rng.chance(1, 2);
                self.watch(b, || {
                    format!(
                        "{} cache {v} {}",
                        NAMES[i],
                        if keep { "kept" } else { "lost" }
                    )
                });
                if keep {
                    self.nodes[i].disk.durable.insert(b, v);
                } else {
                    // The peer's copy holds it only if it is not a resync target's copy
                    // in the making (that is overwritten from the source).
                    let o = &self.nodes[1 - i];
                    let held = self.expect.blocks[b].current(o.disk.read(b))
                        && o.st.disk() != DiskState::Inconsistent;
                    if !held && self.expect.blocks[b].current(v) {
                        self.expect.blocks[b].widened = true;
                    }
                }
            }
            self.nodes[i].disk.cache.clear();
            // With no other UpToDate copy running, the volume as a whole lost power: like a
            // disk's volatile cache, anything since the last acknowledged flush may be gone,
            // whichever copy happens to hold it.
            let o = &self.nodes[1 - i];
            if !o.up || o.st.disk() != DiskState::UpToDate {
                for h in &mut self.expect.blocks {
                    h.widened = true;
                }
            }
            // The machine boots again: a new boot id.
            self.nodes[i].boot += 1;
        } else {
            // The peer sees the connection close.
            if let Some(l) = &self.nodes[i].link {
                let conn = l.conn;
                self.send(i, conn, Msg::Close);
            }
        }
        let n = &mut self.nodes[i];
        n.up = false;
        // A crash: the metadata file is dropped without a clean close.
        n.meta = None;
        n.link = None;
        n.hs = None;
        n.writes.clear();
        n.flushes.clear();
        n.wwait.clear();
        n.wqueue.clear();
        n.resync = None;
        self.log(format!(
            "{} {}",
            NAMES[i],
            if power { "lost power" } else { "killed" }
        ));
        // The client's requests to it fail.
        self.client_node_gone(i);
    }

    fn restart(&mut self, i: usize) {
        if self.nodes[i].up {
            return;
        }
        let path = self.nodes[i].path.clone();
        // `up.rs`: the data disk is flushed before the metadata is opened.
        self.nodes[i].disk.flush();
        let boot = boot_id(self.nodes[i].boot);
        let meta = match Meta::open_booted(&path, RESOURCE, NAMES[i], SIZE, boot) {
            Ok(m) => m,
            Err(e) => {
                self.violation(format!(
                    "{} cannot open its metadata after a crash: {e}",
                    NAMES[i]
                ));
                return;
            }
        };
        let sb = meta.superblock().clone();
        let disk = tandem::node::core::starting_disk(&sb.flags);
        let mut meta = meta;
        meta.set_faults(self.nodes[i].meta_faults.clone());
        let rec = meta.recovery().clone();
        let n = &mut self.nodes[i];
        n.inc += 1;
        n.up = true;
        n.meta = Some(meta);
        n.st = State::new(disk);
        n.unflushed = Unflushed::default();
        n.next_seq = 1;
        n.duty = new_duty(i);
        n.promoting = false;
        self.log(format!(
            "{} restarted: {} epoch {}, replayed {} extent(s), crashed primary {} ({:?})",
            NAMES[i],
            disk.as_str(),
            sb.epoch,
            rec.replayed_extents.len(),
            rec.crashed_primary,
            sb.flags
        ));
        self.timer(i, Timer::Ping, PING_EVERY);
        if i == 0 {
            self.timer(0, Timer::Dial, CONNECT_EVERY);
        }
    }

    // ---- timers -----------------------------------------------------------------------

    fn on_timer(&mut self, i: usize, t: Timer) {
        match t {
            Timer::Dial => {
                self.timer(i, Timer::Dial, CONNECT_EVERY);
                let n = &self.nodes[i];
                if n.st.want_connect && n.link.is_none() && n.hs.is_none() && !n.promoting {
                    let conn = self.next_conn;
                    self.next_conn += 1;
                    // `establish`: the data disk is flushed before the state is sent.
                    self.source_flush(i);
                    let mine = self.nodes[i].peer_state();
                    let words = self.nodes[i].meta().bitmap_words().to_vec();
                    self.nodes[i].hs = Some(Hs {
                        conn,
                        mine: mine.clone(),
                    });
                    // An unanswered dial is given up at the next one.
                    self.timer(i, Timer::Dial, CONNECT_EVERY);
                    self.send(i, conn, Msg::Hello { state: mine, words });
                }
            }
            Timer::Ping => {
                self.timer(i, Timer::Ping, PING_EVERY);
                if let Some(conn) = self.nodes[i].hs.as_ref().map(|h| h.conn) {
                    // A handshake that got no answer is abandoned.
                    if self.nodes[i].link.is_none() {
                        self.nodes[i].hs = None;
                        self.send(i, conn, Msg::Close);
                    }
                }
                if let Some(l) = &self.nodes[i].link {
                    let (conn, last) = (l.conn, l.last_rx);
                    if self.now.saturating_sub(last) > PING_TIMEOUT {
                        self.lose_link(i, "ping timeout");
                    } else {
                        self.send(i, conn, Msg::Ping);
                    }
                }
            }
            Timer::Duty(t) => self.duty(i, duty::Event::Tick(t)),
            Timer::Force(n) => self.force_promote(n),
            Timer::ResyncRetry => {
                if let Some(rs) = self.nodes[i].resync.as_mut() {
                    rs.stage = Stage::Pushing;
                    rs.cursor = 0;
                    // A new `resync_round`: flushed first.
                    self.source_flush(i);
                    self.resync_step(i);
                }
            }
        }
    }

    // ---- the peer link (`handshake.rs`, `dispatch.rs`) --------------------------------

    fn on_msg(&mut self, i: usize, conn: u64, msg: Msg) {
        let on_link = self.nodes[i].link.as_ref().is_some_and(|l| l.conn == conn);
        if on_link {
            let now = self.now;
            if let Some(l) = self.nodes[i].link.as_mut() {
                l.last_rx = now;
            }
        }
        match msg {
            Msg::Hello { state, words } => self.on_hello(i, conn, state, words),
            Msg::Close => {
                if on_link {
                    self.lose_link(i, "the peer closed the connection");
                } else if self.nodes[i].hs.as_ref().is_some_and(|h| h.conn == conn) {
                    self.nodes[i].hs = None;
                }
            }
            _ if !on_link => {}
            Msg::Write { seq, b, v } => {
                self.watch(b, || format!("{} writes {v} from the peer", NAMES[i]));
                self.nodes[i].disk.write(b, v);
                self.send(i, conn, Msg::WriteAck { seq });
            }
            Msg::WriteAck { seq } => {
                if let Some(w) = self.nodes[i].writes.get_mut(&seq) {
                    if w.conn == Some(conn) && w.peer == PeerRes::Waiting {
                        w.peer = PeerRes::Acked;
                        // Kept until the peer flushes.
                        self.nodes[i].unflushed.acked(block_offset(w.b), BLOCK);
                        self.complete_write(i, seq, false);
                    }
                }
            }
            Msg::Flush { seq } => {
                self.nodes[i].disk.flush();
                self.send(i, conn, Msg::FlushAck { seq });
            }
            Msg::FlushAck { seq } => {
                if let Some(&(op, token, c)) = self.nodes[i].flushes.get(&seq) {
                    if c == conn {
                        self.nodes[i].flushes.remove(&seq);
                        self.nodes[i].unflushed.flushed(token);
                        if op == u64::MAX {
                            self.resync_flushed(i);
                        } else {
                            self.client_flush_done(op);
                        }
                    }
                }
            }
            Msg::Resync { seq, vals } => {
                for (b, v) in vals {
                    self.watch(b, || format!("{} writes {v} by resync", NAMES[i]));
                    self.nodes[i].disk.write(b, v);
                }
                self.send(i, conn, Msg::ResyncAck { seq });
            }
            Msg::ResyncAck { seq } => self.resync_acked(i, seq),
            Msg::ResyncDone { gens } => self.resync_finished_as_target(i, gens),
            Msg::State(ps) => self.on_peer_state(i, ps),
            Msg::Ping => {}
        }
    }

    fn on_hello(&mut self, i: usize, conn: u64, peer: PeerState, peer_words: Vec<u64>) {
        let mine = match &self.nodes[i].hs {
            Some(h) if h.conn == conn => h.mine.clone(),
            // The dialer (alpha) never accepts: a state on a connection it gave up is late.
            Some(_) => {
                self.send(i, conn, Msg::Close);
                return;
            }
            None if i == 0 => {
                self.send(i, conn, Msg::Close);
                return;
            }
            None => {
                // The acceptor: refuses while linked or StandAlone, else answers with its state.
                let n = &self.nodes[i];
                if !n.st.want_connect || n.link.is_some() {
                    self.send(i, conn, Msg::Close);
                    return;
                }
                self.source_flush(i);
                let mine = self.nodes[i].peer_state();
                let words = self.nodes[i].meta().bitmap_words().to_vec();
                self.send(
                    i,
                    conn,
                    Msg::Hello {
                        state: mine.clone(),
                        words,
                    },
                );
                mine
            }
        };
        self.nodes[i].hs = None;
        self.establish(i, conn, mine, peer, peer_words);
    }

    /// `handshake.rs`, `establish`, from the exchanged states on.
    fn establish(
        &mut self,
        i: usize,
        conn: u64,
        mine: PeerState,
        peer: PeerState,
        words: Vec<u64>,
    ) {
        let me = NAMES[i];
        let peer_name = NAMES[1 - i];
        match decide::handshake_epochs(mine.role, mine.epoch, peer.role, peer.epoch) {
            EpochCheck::Proceed => {}
            EpochCheck::Superseded(why) => {
                self.lose_primary(i, format!("superseded by {peer_name}: {why}"));
                self.send(i, conn, Msg::Close);
                return;
            }
            EpochCheck::PeerStale(_) => {
                self.send(i, conn, Msg::Close);
                return;
            }
        }
        self.adopt_epoch(i, peer.epoch);
        let me_side = Side::of(me, &mine);
        let peer_side = Side::of(peer_name, &peer);
        let verdict = decide::handshake(&me_side, &peer_side, &SplitBrainPolicy::default());
        let explain = verdict.explain();
        self.log(format!("{me}: handshake: {explain}"));
        // Without a forced promotion both sides can only have written on their own if the
        // fencing failed. After one, a split brain the verdict resolves (a policy, the disk
        // states, --discard-my-data) gives up the target's writes since the copies split.
        if verdict.split_brain_detected() {
            // Only after a forced promotion may the copies split.
            if self.out.forced == 0 {
                self.violation(format!("split brain without a forced promotion: {explain}"));
                return;
            }
            if matches!(verdict, tandem::node::decide::Verdict::Sync { .. }) {
                let snap = self.sync_snap.clone();
                self.expect.discarded_since(&snap);
            }
        }
        let (c, full) = match decide::plan(&verdict, &me_side, &peer_side) {
            LinkPlan::InSync { proven_current } => {
                if proven_current {
                    let (m, st) = self.nodes[i].both();
                    let _ = records::proven_current(m, st);
                }
                (Conn::Connected, false)
            }
            LinkPlan::Resync { direction, full } => (Conn::resyncing(direction), full),
            LinkPlan::Retry(_) => {
                self.send(i, conn, Msg::Close);
                return;
            }
            LinkPlan::SplitBrain => {
                self.nodes[i].st.split_brain_found(explain.clone());
                self.send(i, conn, Msg::Close);
                self.log(format!(
                    "{me}: split brain after a forced promotion (detected)"
                ));
                self.out.split_brains += 1;
                self.q.at(self.now + SEC, Ev::Resolve);
                return;
            }
            LinkPlan::Refuse(reason) => {
                self.nodes[i].st.handshake_refused(explain.clone());
                self.log(format!("{me}: refused: {reason}"));
                self.send(i, conn, Msg::Close);
                return;
            }
        };
        {
            let m = self.nodes[i].meta();
            if full {
                m.set_all_out_of_sync();
            } else if m.merge_bitmap(&words).is_err() {
                self.send(i, conn, Msg::Close);
                return;
            }
            if m.flush_bitmap().is_err() {
                self.send(i, conn, Msg::Close);
                return;
            }
        }
        // `set_link`: refused while linked or while a promotion is under way.
        if self.nodes[i].link.is_some() || self.nodes[i].promoting {
            self.send(i, conn, Msg::Close);
            return;
        }
        let peer_up = peer.disk == DiskState::UpToDate;
        self.nodes[i].link = Some(Link {
            conn,
            peer,
            last_rx: self.now,
        });
        // A change while the states were in flight makes the decision stale.
        let now = self.nodes[i].peer_state();
        if now.gens != mine.gens || now.role != mine.role || now.disk != mine.disk {
            self.lose_link(i, "this node changed during the handshake");
            return;
        }
        if self.nodes[i].st.conn() != Conn::Connecting {
            self.lose_link(i, "disconnected during the handshake");
            return;
        }
        if c == Conn::SyncTarget && records::sync_target(self.nodes[i].meta()).is_err() {
            self.lose_link(i, "recording the resync failed");
            return;
        }
        self.set_fence(i, Fence::Clear);
        let oos = self.nodes[i].meta().out_of_sync_bytes();
        self.nodes[i].st.handshake_done(c, oos);
        if c == Conn::Connected && oos == 0 {
            self.sync_snap = self.expect.sync_snapshot();
        }
        self.log(format!("{me}: connected as {}", c.as_str()));
        if c == Conn::Connected && peer_up {
            self.peer_in_sync(i);
        }
        self.retake_lost_role(i);
        self.settle_identical_pair(i);
        if c == Conn::SyncSource {
            self.start_resync(i, conn);
        } else {
            self.resync_while_connected(i);
        }
    }

    /// `runtime.rs`, `link_lost`.
    fn lose_link(&mut self, i: usize, why: &str) {
        let Some(link) = self.nodes[i].link.take() else {
            return;
        };
        self.send(i, link.conn, Msg::Close);
        self.log(format!("{}: link lost: {why}", NAMES[i]));
        self.nodes[i].st.link_lost();
        self.nodes[i].resync = None;
        let unflushed = self.nodes[i].unflushed.take();
        if !unflushed.is_empty() {
            let _ = records::unflushed_lost(self.nodes[i].meta(), &unflushed);
        }
        // Writes waiting for this link's answer are held; flushes go on without the peer.
        for w in self.nodes[i].writes.values_mut() {
            if w.conn == Some(link.conn) && w.peer == PeerRes::Waiting {
                w.peer = PeerRes::Lost;
            }
        }
        let flushes: Vec<u64> = self.nodes[i].flushes.keys().copied().collect();
        for seq in flushes {
            let (op, _, _) = self.nodes[i].flushes.remove(&seq).expect("listed");
            if op != u64::MAX {
                self.client_flush_done(op);
            }
        }
        let peer_was_primary = link.peer.role == Role::Primary;
        let st = &self.nodes[i].st;
        match rules::on_link_lost(
            st.role(),
            Fencing::Witness,
            true,
            st.disk(),
            peer_was_primary,
            NAMES[1 - i],
        ) {
            OnLinkLost::GoOnAlone(f) => self.set_fence(i, f),
            OnLinkLost::FencePeer(f) => {
                self.set_fence(i, f);
                self.duty(i, duty::Event::FencePeer);
            }
            OnLinkLost::TakeOver => self.auto_promote(i),
            OnLinkLost::Note(n) => self.log(format!("{}: {n}", NAMES[i])),
            OnLinkLost::Nothing => {}
        }
    }

    fn on_peer_state(&mut self, i: usize, ps: PeerState) {
        let my_epoch = self.nodes[i].epoch();
        match decide::peer_claim(self.nodes[i].st.role(), my_epoch, ps.role, ps.epoch) {
            PeerClaim::Fine => {}
            PeerClaim::Superseded(why) => {
                self.lose_primary(i, why);
                return;
            }
            PeerClaim::TwoPrimaries(why) => {
                self.lose_link(i, &why);
                return;
            }
        }
        let lift = ps.disk == DiskState::UpToDate
            && self.nodes[i].st.role() == Role::Primary
            && self.nodes[i].meta().superblock().flags.peer_outdated;
        self.adopt_epoch(i, ps.epoch);
        if let Some(l) = self.nodes[i].link.as_mut() {
            l.peer = ps;
        }
        if lift {
            self.peer_in_sync(i);
        }
        self.settle_identical_pair(i);
    }

    fn announce(&mut self, i: usize) {
        if let Some(conn) = self.nodes[i].link.as_ref().map(|l| l.conn) {
            let ps = self.nodes[i].peer_state();
            self.send(i, conn, Msg::State(ps));
        }
    }

    fn adopt_epoch(&mut self, i: usize, epoch: u64) {
        if epoch > self.nodes[i].epoch() {
            let _ = self.nodes[i].meta().update(|sb| sb.epoch = epoch);
        }
    }

    // ---- resync (`resync.rs`) ---------------------------------------------------------

    fn resync_while_connected(&mut self, i: usize) {
        let Some(conn) = self.nodes[i].link.as_ref().map(|l| l.conn) else {
            return;
        };
        let total = self.nodes[i].meta().out_of_sync_bytes();
        if self.nodes[i].st.claim_online_resync(total) {
            self.start_resync(i, conn);
        }
    }

    /// The data flush before this copy may become another's source.
    fn source_flush(&mut self, i: usize) {
        if !mutation::active(Mutation::SourceFlush) {
            self.nodes[i].disk.flush();
        }
    }

    fn start_resync(&mut self, i: usize, conn: u64) {
        // `resync.rs`, `resync_round`: the source's copy is made durable first.
        self.source_flush(i);
        self.nodes[i].resync = Some(Resync {
            conn,
            cursor: 0,
            inflight: BTreeMap::new(),
            stage: Stage::Pushing,
        });
        self.resync_step(i);
    }

    fn resync_step(&mut self, i: usize) {
        loop {
            let Some(rs) = self.nodes[i].resync.as_ref() else {
                return;
            };
            if !matches!(rs.stage, Stage::Pushing) || rs.inflight.len() >= RESYNC_WINDOW {
                return;
            }
            let (conn, cursor) = (rs.conn, rs.cursor);
            let next = self.nodes[i].meta().next_out_of_sync(cursor);
            let Some((off, len)) = next else {
                if !self.nodes[i]
                    .resync
                    .as_ref()
                    .expect("on")
                    .inflight
                    .is_empty()
                {
                    return;
                }
                if self.nodes[i].meta().out_of_sync_bytes() > 0 {
                    // Bits set behind the cursor meanwhile: go again.
                    self.nodes[i].resync.as_mut().expect("on").cursor = 0;
                    continue;
                }
                // The target must not call itself UpToDate with the data in its cache.
                let token = self.nodes[i].unflushed.flush_sent();
                let seq = self.seq(i);
                self.nodes[i].flushes.insert(seq, (u64::MAX, token, conn));
                self.nodes[i].resync.as_mut().expect("on").stage = Stage::Flushing;
                self.send(i, conn, Msg::Flush { seq });
                return;
            };
            let len = len.min(RESYNC_CHUNK - off % RESYNC_CHUNK);
            let vals: Vec<(usize, u64)> = blocks_in(off, len)
                .map(|b| (b, self.nodes[i].disk.read(b)))
                .collect();
            let seq = self.seq(i);
            let rs = self.nodes[i].resync.as_mut().expect("on");
            rs.cursor = off + len;
            rs.inflight.insert(seq, (off, len));
            self.send(i, conn, Msg::Resync { seq, vals });
        }
    }

    fn resync_acked(&mut self, i: usize, seq: u64) {
        let Some(rs) = self.nodes[i].resync.as_mut() else {
            return;
        };
        let Some((off, len)) = rs.inflight.remove(&seq) else {
            return;
        };
        self.nodes[i].unflushed.resynced(off, len);
        self.nodes[i].meta().mark_in_sync(off, len);
        self.resync_step(i);
    }

    fn resync_flushed(&mut self, i: usize) {
        let Some(conn) = self.nodes[i].resync.as_ref().map(|r| r.conn) else {
            return;
        };
        if self.nodes[i].meta().out_of_sync_bytes() > 0 {
            // Marked during the flush: push those too.
            let rs = self.nodes[i].resync.as_mut().expect("on");
            rs.stage = Stage::Pushing;
            rs.cursor = 0;
            self.resync_step(i);
            return;
        }
        let Ok(gens) = records::resync_done_as_source(self.nodes[i].meta()) else {
            // `resync.rs`: the end could not be recorded; go again after a pause.
            self.timer(i, Timer::ResyncRetry, 200 * MS);
            return;
        };
        self.nodes[i].resync = None;
        self.send(i, conn, Msg::ResyncDone { gens });
        self.nodes[i].st.resync_done_as_source();
        self.log(format!("{}: resync finished as source", NAMES[i]));
        self.announce(i);
    }

    fn resync_finished_as_target(&mut self, i: usize, gens: Generations) {
        let source = match &self.nodes[i].link {
            Some(l) => l.peer.disk,
            None => return,
        };
        let (m, st) = self.nodes[i].both();
        let Ok(disk) = records::resync_done_as_target(m, st, gens, source) else {
            self.lose_link(i, "recording the finished resync failed");
            return;
        };
        self.sync_snap = self.expect.sync_snapshot();
        self.log(format!(
            "{}: resync finished as target: {}",
            NAMES[i],
            disk.as_str()
        ));
        self.announce(i);
        self.retake_lost_role(i);
        self.settle_identical_pair(i);
    }

    fn seq(&mut self, i: usize) -> u64 {
        let s = self.nodes[i].next_seq;
        self.nodes[i].next_seq += 1;
        s
    }

    // ---- failover (`failover.rs`) -----------------------------------------------------

    fn set_fence(&mut self, i: usize, f: Fence) {
        if *self.nodes[i].st.fence() != f {
            self.log(format!("{}: fence {:?}", NAMES[i], f));
            self.nodes[i].st.set_fence(f);
        }
    }

    fn lease_valid(&self, i: usize) -> bool {
        let now = self.clock(i);
        self.nodes[i].st.lease_valid(now)
    }

    fn record_peer_outdated(&mut self, i: usize) {
        let _ = self.nodes[i]
            .meta()
            .update(|sb| sb.flags.peer_outdated = true);
    }

    fn peer_connected_in_sync(&self, i: usize) -> bool {
        self.nodes[i]
            .link
            .as_ref()
            .is_some_and(|l| l.peer.disk == DiskState::UpToDate)
            && self.nodes[i].st.conn() == Conn::Connected
    }

    fn on_witness(&mut self, i: usize, p: Purpose, rep: Result<Reply, ()>) {
        match p {
            Purpose::Duty { ask, sent } => {
                let reply = rep.map_err(|()| "no answer in time".to_string());
                self.duty(i, duty::Event::Answer { ask, sent, reply });
            }
        }
    }

    fn auto_promote(&mut self, i: usize) {
        self.duty(i, duty::Event::TakeOver);
    }

    /// `tandem primary [--force]` on node `i`, through its duty like `runtime::promote`.
    fn promote(&mut self, i: usize, force: bool) {
        self.next_request += 1;
        let id = self.next_request;
        self.requests.insert(id, (i, force));
        self.duty(i, duty::Event::Promote { id, force });
    }

    /// The operator's request `id` was answered.
    fn answered(&mut self, id: u64, refused: Option<String>) {
        let Some((i, force)) = self.requests.remove(&id) else {
            return;
        };
        if let Some(why) = refused {
            self.log(format!("{}: refused: {why}", NAMES[i]));
            if force {
                // The operator tries again (the old lease may still run).
                let n = self.nodes[i].force_tries + 1;
                self.timer(i, Timer::Force(n), 500 * MS);
            }
        }
    }

    /// `primary --force` (the operator's, in a fault) on a node that cannot see a primary;
    /// asked again while the witness refuses, up to 20 times.
    fn force_promote(&mut self, tries: u32) {
        let cands: Vec<usize> = (0..2)
            .filter(|&i| {
                let n = &self.nodes[i];
                // Not a node an earlier resolution told to discard its data.
                n.up && n.st.role() == Role::Secondary
                    && n.link.is_none()
                    && !n.duty.promoting()
                    && n.st.want_connect
                    && !n.st.discard_my_data
            })
            .collect();
        let Some(&i) = cands.first() else {
            return;
        };
        if tries >= 20 {
            self.log(format!("operator: gives up forcing {}", NAMES[i]));
            return;
        }
        self.log(format!("operator: tandem primary --force on {}", NAMES[i]));
        self.nodes[i].force_tries = tries;
        self.promote(i, true);
    }

    /// `runtime.rs`, `promote` with force: a copy that is not UpToDate becomes the reference
    /// (a new generation, everything to be copied to the peer). False if that failed.
    fn forced_data(&mut self, i: usize) -> bool {
        if self.nodes[i].st.disk() == DiskState::UpToDate {
            return true;
        }
        self.source_flush(i);
        let (m, st) = self.nodes[i].both();
        if records::forced_reference(m, st, false).is_err() {
            return false;
        }
        true
    }

    /// The operator after a split brain: the side that is not primary (or, with neither
    /// primary, the one with the older epoch) discards its data; both reconnect.
    fn resolve_split_brain(&mut self) {
        let prim = (0..2).find(|&i| self.nodes[i].up && self.nodes[i].st.role() == Role::Primary);
        // An Inconsistent copy has nothing to keep (the refusal says so).
        let garbage = (0..2)
            .find(|&i| self.nodes[i].up && self.nodes[i].st.disk() == DiskState::Inconsistent);
        let victim = match (garbage, prim) {
            (Some(g), _) if self.nodes[1 - g].st.disk() != DiskState::Inconsistent => g,
            (_, Some(p)) => 1 - p,
            (_, None) if self.nodes[0].epoch() < self.nodes[1].epoch() => 0,
            (_, None) => 1,
        };
        self.log(format!(
            "operator: connect --discard-my-data on {}, connect on {}",
            NAMES[victim],
            NAMES[1 - victim]
        ));
        let snap = self.sync_snap.clone();
        self.expect.discarded_since(&snap);
        // Discarding the victim makes the survivor's copy the reference, as forcing it would:
        // a survivor forced earlier while rolled back holds less than the last in-sync state
        // (seed 1117493: the operator forced alpha, rolled back, then kept it over beta).
        for b in 0..NBLK {
            let v = self.nodes[1 - victim].disk.read(b);
            self.expect.forced(b, v);
        }
        // Two consistent copies with no generation in common: `--discard-my-data` takes only
        // an Inconsistent side, so the operator first runs `tandem invalidate` on the side
        // it discards (what the refusal says).
        let unrelated = (0..2).any(|i| {
            let n = &self.nodes[i];
            n.up && n
                .st
                .last_refusal
                .as_deref()
                .is_some_and(|r| r.contains("unrelated"))
        });
        let n = &self.nodes[victim];
        if unrelated
            && n.up
            && n.st.role() == Role::Secondary
            && n.st.disk() != DiskState::Inconsistent
        {
            self.log(format!("operator: tandem invalidate on {}", NAMES[victim]));
            let (m, st) = self.nodes[victim].both();
            if records::invalidated(m, st).is_err() {
                self.log("operator: invalidate failed; tries again later".into());
            }
        }
        if self.nodes[victim].up {
            self.nodes[victim].st.connect(true);
        }
        if self.nodes[1 - victim].up {
            self.nodes[1 - victim].st.connect(false);
        }
    }

    /// `failover.rs`, `become_primary`.
    fn become_primary(&mut self, i: usize, epoch: u64, peer_fenced: bool) {
        let (m, st) = self.nodes[i].both();
        if records::promotion(m, st, Some(epoch)).is_err() {
            return;
        }
        let linked = self.nodes[i].link.is_some();
        match rules::promotion_fence(linked, peer_fenced, NAMES[1 - i], "promoted") {
            OnLinkLost::FencePeer(f) => {
                self.set_fence(i, f);
                self.duty(i, duty::Event::FencePeer);
            }
            OnLinkLost::GoOnAlone(f) => self.set_fence(i, f),
            _ => {}
        }
        self.out.promotions += 1;
        self.writers.promoted(i, epoch, self.now);
        self.log(format!(
            "{}: promoted to primary in epoch {epoch}",
            NAMES[i]
        ));
        self.duty(i, duty::Event::Promoted { epoch });
        self.announce(i);
        if self.peer_connected_in_sync(i) {
            self.peer_in_sync(i);
        }
    }

    fn lose_primary(&mut self, i: usize, why: String) {
        self.step_down(i, why, true);
    }

    fn step_down(&mut self, i: usize, why: String, stale: bool) {
        self.nodes[i].st.lease_dropped();
        self.set_fence(i, Fence::Lost(why.clone()));
        self.record_step_down(i, why, stale);
    }

    /// `failover.rs`, `record_step_down`.
    fn record_step_down(&mut self, i: usize, why: String, stale: bool) {
        let (m, st) = self.nodes[i].both();
        if !records::stepped_down(m, st).0 {
            return;
        }
        if stale {
            self.outdate_myself(i);
        }
        self.log(format!("{}: stepped down: {why}", NAMES[i]));
        if self.nodes[i].link.is_some() {
            self.lose_link(i, &why);
        }
    }

    fn outdate_myself(&mut self, i: usize) {
        let (m, st) = self.nodes[i].both();
        records::outdated(m, st);
    }

    fn outdated_no_more(&mut self, i: usize) -> bool {
        let (m, st) = self.nodes[i].both();
        if matches!(records::proven_current(m, st), Ok(true)) {
            self.log(format!("{}: UpToDate again", NAMES[i]));
            return true;
        }
        false
    }

    fn peer_in_sync(&mut self, i: usize) {
        if let Some(conn) = self.nodes[i].link.as_ref().map(|l| l.conn) {
            self.duty(i, duty::Event::PeerInSync { link: conn });
        }
    }

    /// `failover.rs`, `run_duty`: apply one event to the node's duty and run its effects.
    fn duty(&mut self, i: usize, ev: duty::Event) {
        let n = &self.nodes[i];
        let v = duty::View {
            now: self.clock(i),
            epoch: n.epoch(),
            link: n.link.as_ref().map(|l| l.conn),
            peer_connected_in_sync: self.peer_connected_in_sync(i),
            peer_outdated: n
                .meta
                .as_ref()
                .is_some_and(|m| m.superblock().flags.peer_outdated),
            peer_primary: n
                .link
                .as_ref()
                .is_some_and(|l| l.peer.role == Role::Primary),
            pair: n
                .link
                .as_ref()
                .filter(|_| n.st.conn() == Conn::Connected)
                .map(|l| {
                    let me = Side::of(NAMES[i], &n.peer_state());
                    (me, Side::of(NAMES[1 - i], &l.peer))
                }),
        };
        let n = &mut self.nodes[i];
        let effects = n.duty.apply(&mut n.st, &v, ev);
        for e in effects {
            match e {
                // `hold_links`; here also refused while the operator's promotion is under way.
                Effect::HoldLinks => {
                    let n = &self.nodes[i];
                    if n.promoting || v.peer_primary {
                        self.duty(i, duty::Event::LinksNotHeld);
                        return;
                    }
                    self.nodes[i].promoting = true;
                }
                Effect::ReleaseLinks => self.nodes[i].promoting = false,
                Effect::BecomePrimary {
                    epoch,
                    peer_fenced,
                    forced,
                    new_data,
                    reply,
                    ..
                } => {
                    let epoch = epoch.expect("the simulated pair fences with the witness");
                    if forced {
                        self.out.forced += 1;
                        for b in 0..NBLK {
                            let v = self.nodes[i].disk.read(b);
                            self.expect.forced(b, v);
                        }
                    }
                    // `operator_become_primary`: the new reference is recorded first.
                    let recorded = !new_data || self.forced_data(i);
                    if recorded {
                        self.become_primary(i, epoch, peer_fenced);
                        // The peer becomes the sync target at once.
                        if new_data && self.nodes[i].link.is_some() {
                            self.lose_link(i, "re-handshaking after a forced promotion");
                        }
                    }
                    match reply {
                        Some(id) => {
                            let refused = (!recorded).then(|| "metadata write failed".into());
                            self.answered(id, refused);
                        }
                        None => self.nodes[i].promoting = false,
                    }
                    self.duty(i, duty::Event::PromotionEnded);
                }
                Effect::Reply { id, .. } => self.answered(id, None),
                Effect::Refuse { id, why } => self.answered(id, Some(why)),
                Effect::OutdateMyself(_) => self.outdate_myself(i),
                Effect::Reclaim { .. } => {
                    if self.outdated_no_more(i) {
                        self.nodes[i].st.lost_primary_role = true;
                        self.lose_link(i, "reconnecting: this copy is UpToDate again");
                    }
                }
                Effect::Note(note) => {
                    if let Some(note) = note {
                        self.log(format!("{}: {note}", NAMES[i]));
                    }
                }
                Effect::Ask { ask, sent, limit } => {
                    let req = ask.request(NAMES[1 - i]);
                    let limit = limit.map_or(WITNESS_TIMEOUT, |d| d.as_micros() as Micros);
                    self.witness_call(i, req, Purpose::Duty { ask, sent }, limit);
                }
                Effect::RunHandler { .. } => {
                    unreachable!("the simulated pair fences with the witness")
                }
                Effect::After(d, t) => self.timer(i, Timer::Duty(t), d.as_micros() as Micros),
                Effect::Fenced(f) => self.log(format!("{}: fence {f:?}", NAMES[i])),
                // Held writes look again after every event (`settle_holds`).
                Effect::Changed => {}
                Effect::RecordPeerOutdated => self.record_peer_outdated(i),
                Effect::PeerMarkLifted => {
                    let (m, st) = self.nodes[i].both();
                    let _ = records::peer_mark_lifted(m, st);
                }
                Effect::StepDown { why, stale, lapsed } => {
                    self.record_step_down(i, why, stale);
                    if lapsed.is_some() {
                        self.nodes[i].st.lapsed_in = lapsed;
                    }
                }
                Effect::UpToDateAgain { .. } => {
                    self.outdated_no_more(i);
                }
                Effect::Log(line) => self.log(format!("{}: {line}", NAMES[i])),
            }
        }
    }

    fn retake_lost_role(&mut self, i: usize) {
        let n = &self.nodes[i];
        let peer_secondary = n
            .link
            .as_ref()
            .is_some_and(|l| l.peer.role == Role::Secondary);
        if peer_secondary
            && rules::auto_promotion_blocked(true, Fencing::Witness, n.st.disk(), n.st.role(), true)
                .is_none()
            && n.st.lost_primary_role
        {
            self.log(format!(
                "{}: taking back the role nobody took over",
                NAMES[i]
            ));
            self.auto_promote(i);
        }
    }

    fn settle_identical_pair(&mut self, i: usize) {
        self.duty(i, duty::Event::Settle);
    }

    // ---- the write path (`replicated.rs`) ---------------------------------------------

    /// The link a write may go to: up, and not the one `failed` was lost on.
    fn usable_link(&self, i: usize, failed: Option<u64>) -> Option<u64> {
        self.nodes[i]
            .link
            .as_ref()
            .map(|l| l.conn)
            .filter(|&c| Some(c) != failed)
    }

    fn write(&mut self, i: usize, op: u64, b: usize) -> Result<(), ()> {
        if !self.nodes[i].up || self.nodes[i].st.role() != Role::Primary {
            return Err(());
        }
        let off = block_offset(b);
        if self.nodes[i].meta().activate_pinned(off, BLOCK).is_err() {
            return Err(());
        }
        let v = self.client.next_val;
        let seq = self.seq(i);
        self.watch(b, || format!("{} writes {v} for the client", NAMES[i]));
        self.nodes[i].disk.write(b, v);
        let conn = self.usable_link(i, None);
        self.nodes[i].writes.insert(
            seq,
            PendingWrite {
                op,
                b,
                v,
                conn,
                peer: if conn.is_some() {
                    PeerRes::Waiting
                } else {
                    PeerRes::Lost
                },
            },
        );
        if let Some(c) = conn {
            self.send(i, c, Msg::Write { seq, b, v });
        }
        Ok(())
    }

    /// Held writes look again (`hold_for_fencing`, woken by every change).
    fn settle_holds(&mut self, i: usize) {
        if !self.nodes[i].up {
            return;
        }
        let held: Vec<u64> = self.nodes[i]
            .writes
            .iter()
            .filter(|(_, w)| w.peer == PeerRes::Lost)
            .map(|(&s, _)| s)
            .collect();
        for seq in held {
            let failed = self.nodes[i].writes[&seq].conn;
            let usable = self.usable_link(i, failed);
            let d = hold_decision(
                self.nodes[i].st.role(),
                usable.is_some(),
                self.nodes[i].st.fence(),
                Fencing::Witness,
                self.lease_valid(i),
            );
            match d {
                HoldDecision::Retry => {
                    let c = usable.expect("retry has a link");
                    let w = self.nodes[i].writes.get_mut(&seq).expect("held");
                    w.conn = Some(c);
                    w.peer = PeerRes::Waiting;
                    let (b, v) = (w.b, w.v);
                    self.send(i, c, Msg::Write { seq, b, v });
                }
                HoldDecision::Degraded => {
                    if self.degraded(i, seq).is_ok() {
                        self.complete_write(i, seq, true);
                    } else {
                        self.fail_write(i, seq);
                    }
                }
                HoldDecision::Fail(_) => self.fail_write(i, seq),
                HoldDecision::Wait => {}
            }
        }
    }

    /// The peer does not have the write: a new generation on disk first, then the bit.
    fn degraded(&mut self, i: usize, seq: u64) -> Result<(), ()> {
        let b = self.nodes[i].writes[&seq].b;
        let was_primary = self.nodes[i].st.primary_when_peer_lost();
        // `replicated.rs`, `degraded`: the data disk is flushed before the generation starts.
        if rules::needs_split_generation(self.nodes[i].meta().superblock().gens.bitmap) {
            self.source_flush(i);
        }
        records::written_without_peer(self.nodes[i].meta(), was_primary, block_offset(b), BLOCK)
            .map_err(|_| ())?;
        Ok(())
    }

    fn complete_write(&mut self, i: usize, seq: u64, alone: bool) {
        let w = self.nodes[i].writes.remove(&seq).expect("pending");
        self.watch(w.b, || {
            format!("{} acknowledges {} (alone {alone})", NAMES[i], w.v)
        });
        self.nodes[i].meta().release(block_offset(w.b), BLOCK);
        let epoch = self.nodes[i].epoch();
        if let Some(v) = self.writers.acked(i, NAMES[i], epoch, alone, self.now) {
            self.violation(v);
        }
        self.client_write_done(w.op, true);
    }

    fn fail_write(&mut self, i: usize, seq: u64) {
        let w = self.nodes[i].writes.remove(&seq).expect("pending");
        self.watch(w.b, || format!("{} fails {}", NAMES[i], w.v));
        let off = block_offset(w.b);
        let m = self.nodes[i].meta();
        m.mark_out_of_sync(off, BLOCK);
        m.release(off, BLOCK);
        self.client_write_done(w.op, false);
        self.resync_while_connected(i);
    }

    fn flush(&mut self, i: usize, op: u64) -> Result<(), ()> {
        if !self.nodes[i].up || self.nodes[i].st.role() != Role::Primary {
            return Err(());
        }
        self.nodes[i].disk.flush();
        match self.usable_link(i, None) {
            Some(c) => {
                let token = self.nodes[i].unflushed.flush_sent();
                let seq = self.seq(i);
                self.nodes[i].flushes.insert(seq, (op, token, c));
                self.send(i, c, Msg::Flush { seq });
            }
            None => self.client_flush_done(op),
        }
        Ok(())
    }

    // ---- the client -------------------------------------------------------------------

    fn client_tick(&mut self) {
        let gap = self.rng.range(2 * MS, 30 * MS);
        self.q.at(self.now + gap, Ev::Client);
        if let Some(at) = self.operator_at {
            if self.now >= at {
                self.operator();
            }
        }
        let t = self.client.target;
        let inflight = self.client.writes.len() + self.client.flushes.len();
        if inflight >= 4 {
            return;
        }
        let roll = self.rng.range(0, 100);
        if roll < 8 {
            // A flush covers every write acknowledged before it was sent.
            let op = self.next_op();
            let snap = self.expect.flush_snapshot();
            self.client.flushes.insert(op, snap);
            if self.flush(t, op).is_err() {
                self.client.flushes.remove(&op);
                self.client_failover();
            }
        } else if roll < 20 {
            // A read from the primary must see every acknowledged write.
            let b = self.rng.range(0, NBLK as u64) as usize;
            let n = &self.nodes[t];
            if n.up && n.st.role() == Role::Primary && !self.client.busy[b] {
                let v = n.disk.read(b);
                self.out.reads_checked += 1;
                if let Some(v) = self.expect.check_read(b, v, NAMES[t], "client read") {
                    self.violation(v);
                }
            }
        } else {
            let b = self.rng.range(0, NBLK as u64) as usize;
            if self.client.busy[b] {
                return;
            }
            if !self.nodes[t].up || self.nodes[t].st.role() != Role::Primary {
                self.client_failover();
                return;
            }
            let op = self.next_op();
            self.client.next_val += 1;
            let v = self.client.next_val;
            let idx = self.expect.issue(b, v);
            self.client.writes.insert(op, (b, idx));
            self.client.busy[b] = true;
            if self.write(t, op, b).is_err() {
                self.client_write_done(op, false);
                self.client_failover();
            }
        }
    }

    fn next_op(&mut self) -> u64 {
        self.client.next_op += 1;
        self.client.next_op
    }

    /// Like `attach`: find the node that is primary now.
    fn client_failover(&mut self) {
        for i in 0..2 {
            if self.nodes[i].up && self.nodes[i].st.role() == Role::Primary {
                self.client.target = i;
            }
        }
    }

    fn client_write_done(&mut self, op: u64, ok: bool) {
        let Some((b, idx)) = self.client.writes.remove(&op) else {
            return;
        };
        self.client.busy[b] = false;
        if ok {
            self.out.acked_writes += 1;
            self.expect.acked(b, idx);
        } else {
            self.out.failed_writes += 1;
        }
    }

    fn client_flush_done(&mut self, op: u64) {
        if let Some(snap) = self.client.flushes.remove(&op) {
            if let Some(b) = self.watch {
                let v = self.expect.blocks[b].issued[snap[b]];
                self.watch(b, || format!("flush acknowledged, covering {v}"));
            }
            self.out.acked_flushes += 1;
            self.expect.flushed(&snap);
        }
    }

    fn client_node_gone(&mut self, i: usize) {
        if self.client.target != i {
            return;
        }
        // Its connection drops: what was in flight failed.
        let ops: Vec<u64> = self.client.writes.keys().copied().collect();
        for op in ops {
            self.client_write_done(op, false);
        }
        self.client.flushes.clear();
        self.client_failover();
    }

    /// The operator: makes a node primary when nobody is (at the start, and after the
    /// faults, as the nemesis does for the known gaps: a restarted node does not promote
    /// itself).
    fn operator(&mut self) {
        // A pair left StandAlone (a split brain, a refused handshake) is resolved first.
        if (0..2).any(|i| self.nodes[i].up && !self.nodes[i].st.want_connect) {
            self.resolve_split_brain();
        }
        let primary = (0..2).any(|i| self.nodes[i].up && self.nodes[i].st.role() == Role::Primary);
        // After the faults it keeps watching until the pair has converged.
        self.operator_at = (self.healed_at.is_some() || !primary).then_some(self.now + 2 * SEC);
        if primary {
            return;
        }
        // Each attempt starts with the other node: a refusal on one is no reason to stop.
        self.operator_turn += 1;
        for k in 0..2 {
            let i = (self.operator_turn + k) % 2;
            let n = &self.nodes[i];
            if n.up && n.st.disk() == DiskState::UpToDate && !n.duty.promoting() {
                self.log(format!("operator: tandem primary on {}", NAMES[i]));
                self.promote(i, false);
                return;
            }
        }
        // Connected, in sync, and no copy promotable (both machines lost power before anyone
        // held an epoch, so the witness cannot name a holder): status says to force one.
        let stuck = (0..2).all(|i| {
            let n = &self.nodes[i];
            n.up && n.link.is_some()
                && n.st.conn() == Conn::Connected
                && n.st.disk() == DiskState::Outdated
                && !n.duty.promoting()
        });
        if stuck {
            let i = self.operator_turn % 2;
            self.log(format!(
                "operator: no copy can take over; tandem primary --force on {}",
                NAMES[i]
            ));
            self.promote(i, true);
        }
    }

    // ---- checks -----------------------------------------------------------------------

    fn periodic_check(&mut self) {
        self.q.at(self.now + SEC, Ev::Check);
        for (i, name) in NAMES.iter().enumerate() {
            if self.nodes[i].st.illegal_transitions() > 0 {
                self.violation(format!("{name} took an illegal state transition"));
            }
        }
        let Some(healed) = self.healed_at else {
            return;
        };
        if self.converged() {
            self.out.converged_after = Some(self.now - healed);
            self.log("converged: identical copies, in sync".into());
            // Every acknowledged write is on the copies.
            for b in 0..NBLK {
                if self.client.busy[b] {
                    continue;
                }
                let v = self.nodes[0].disk.read(b);
                self.out.reads_checked += 1;
                if let Some(v) = self.expect.check_read(b, v, "both", "after healing") {
                    self.violation(v);
                    break;
                }
            }
            self.done = true;
        } else if self.now - healed > HEAL_LIMIT {
            let s = |i: usize| {
                let n = &self.nodes[i];
                format!(
                    "{} {}/{}/{} oos {}",
                    NAMES[i],
                    if n.st.role() == Role::Primary {
                        "Primary"
                    } else {
                        "Secondary"
                    },
                    n.st.disk().as_str(),
                    n.st.conn().as_str(),
                    n.meta.as_ref().map_or(0, |m| m.out_of_sync_bytes())
                )
            };
            let what = format!("{}; {}", s(0), s(1));
            self.violation(format!(
                "not converged {} s after the faults healed: {what}",
                HEAL_LIMIT / SEC
            ));
        }
    }

    fn converged(&self) -> bool {
        let ok = |n: &Node| {
            n.up && n.st.conn() == Conn::Connected
                && n.meta.as_ref().is_some_and(|m| m.out_of_sync_bytes() == 0)
                && n.writes.is_empty()
        };
        ok(&self.nodes[0])
            && ok(&self.nodes[1])
            && (0..NBLK).all(|b| self.nodes[0].disk.read(b) == self.nodes[1].disk.read(b))
            && (0..2).any(|i| self.nodes[i].st.role() == Role::Primary)
    }
}
