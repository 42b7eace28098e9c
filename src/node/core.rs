//! The node's state (role, disk and connection, and what goes with them) and the table of
//! every change it may make (issue 12, after Crucible's checked transitions). The fields that
//! make up the state machine are private: they change only through the named events of
//! `State` (plain code, no IO), which decide the new state and apply it through one private
//! `go` that names the cause and checks the edge against the table. An edge the table does
//! not have is a bug:
//! a debug build (every test's node) aborts on it, so the test that reached it fails; a
//! release build logs it, counts it in `status` (`illegal_transitions`) and carries on, and
//! the nemesis fails its run on such a log line.

use std::time::Instant;

use serde_json::{json, Value};

use super::rules::Fence;
use super::{DiskState, Role};

/// Connection states as status reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conn {
    StandAlone,
    Connecting,
    Connected,
    SyncSource,
    SyncTarget,
    VerifySource,
    VerifyTarget,
}

impl Conn {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StandAlone => "StandAlone",
            Self::Connecting => "Connecting",
            Self::Connected => "Connected",
            Self::SyncSource => "SyncSource",
            Self::SyncTarget => "SyncTarget",
            Self::VerifySource => "VerifySource",
            Self::VerifyTarget => "VerifyTarget",
        }
    }

    /// A link is up (whatever runs over it).
    pub fn is_linked(self) -> bool {
        !matches!(self, Self::StandAlone | Self::Connecting)
    }

    /// The connection state of a node that resyncs in `direction`.
    pub fn resyncing(direction: super::decide::Direction) -> Self {
        match direction {
            super::decide::Direction::Source => Self::SyncSource,
            super::decide::Direction::Target => Self::SyncTarget,
        }
    }
}

/// Progress of a resync or verify run.
#[derive(Debug, Clone)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub started: Instant,
    pub mismatched_bytes: u64,
    /// Resync: bytes actually sent (less than done_bytes with checksum-based resync).
    pub transferred_bytes: u64,
}

impl Progress {
    pub fn new(total_bytes: u64) -> Self {
        Self {
            done_bytes: 0,
            total_bytes,
            started: Instant::now(),
            mismatched_bytes: 0,
            transferred_bytes: 0,
        }
    }

    pub fn to_json(&self, verify: bool) -> Value {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let mut v = json!({
            "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes,
            "bytes_per_sec": (self.done_bytes as f64 / secs) as u64,
        });
        if verify {
            v["mismatched_bytes"] = json!(self.mismatched_bytes);
        } else {
            v["transferred_bytes"] = json!(self.transferred_bytes);
        }
        v
    }
}

/// What moves the state. Every transition names one, and the table allows each edge only for
/// the causes that may take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `primary` or an automatic takeover, with fencing done.
    Promote,
    /// `primary --force` of a copy that is not UpToDate: it becomes the reference.
    ForcePromote,
    /// `secondary`, or the old primary's half of a switchover.
    Demote,
    /// The lease ran out, or the peer holds a newer epoch.
    StepDown,
    /// `connect`.
    Connect,
    /// `disconnect`.
    Disconnect,
    /// The sync handshake decided (connected, or which side resyncs).
    Handshake,
    /// The handshake found a split brain or refused; only an operator goes on.
    HandshakeRefused,
    /// The link went away.
    LinkLost,
    /// Blocks marked while connected are pushed to the peer.
    ResyncStart,
    /// A resync finished (either side).
    ResyncEnd,
    /// This node runs an online verify.
    Verify,
    /// The peer runs an online verify against this node.
    PeerVerify,
    /// This copy lacks writes the other has (its apply failed, its lease ran out, the peer
    /// was promoted).
    Outdate,
    /// The witness, or an identical UpToDate peer, proved this copy current.
    ProvenCurrent,
    /// `invalidate`: a full resync from the peer follows.
    Invalidate,
}

use Cause as C;
use Conn::*;
use DiskState::{Inconsistent, Outdated, UpToDate};
use Role::{Primary, Secondary};

/// Every allowed role change. (A change to the same value is no change and always allowed.)
pub const ROLE_EDGES: &[(Role, Role, Cause)] = &[
    (Secondary, Primary, C::Promote),
    (Primary, Secondary, C::Demote),
    (Primary, Secondary, C::StepDown),
];

/// Every allowed disk-state change. A node starts UpToDate, Outdated or Inconsistent, as its
/// metadata flags say.
pub const DISK_EDGES: &[(DiskState, DiskState, Cause)] = &[
    (UpToDate, Outdated, C::Outdate),
    (Outdated, UpToDate, C::ProvenCurrent),
    (Outdated, UpToDate, C::ForcePromote),
    (Inconsistent, UpToDate, C::ForcePromote),
    // Becoming a sync target, or discarding the data on request.
    (UpToDate, Inconsistent, C::Handshake),
    (Outdated, Inconsistent, C::Handshake),
    (UpToDate, Inconsistent, C::Invalidate),
    (Outdated, Inconsistent, C::Invalidate),
    // A finished resync makes the copy as current as its source.
    (Inconsistent, UpToDate, C::ResyncEnd),
    (Inconsistent, Outdated, C::ResyncEnd),
    (Outdated, UpToDate, C::ResyncEnd),
    (UpToDate, Outdated, C::ResyncEnd),
];

/// Every allowed connection-state change.
pub const CONN_EDGES: &[(Conn, Conn, Cause)] = &[
    (StandAlone, Connecting, C::Connect),
    (Connecting, StandAlone, C::Disconnect),
    (Connected, StandAlone, C::Disconnect),
    (SyncSource, StandAlone, C::Disconnect),
    (SyncTarget, StandAlone, C::Disconnect),
    (VerifySource, StandAlone, C::Disconnect),
    (VerifyTarget, StandAlone, C::Disconnect),
    (Connecting, Connected, C::Handshake),
    (Connecting, SyncSource, C::Handshake),
    (Connecting, SyncTarget, C::Handshake),
    (Connecting, StandAlone, C::HandshakeRefused),
    (Connected, Connecting, C::LinkLost),
    (SyncSource, Connecting, C::LinkLost),
    (SyncTarget, Connecting, C::LinkLost),
    (VerifySource, Connecting, C::LinkLost),
    (VerifyTarget, Connecting, C::LinkLost),
    // The link is lost after `disconnect` said it should stay down (also during the
    // handshake, before the link's state was set).
    (Connecting, StandAlone, C::LinkLost),
    (Connected, StandAlone, C::LinkLost),
    (SyncSource, StandAlone, C::LinkLost),
    (SyncTarget, StandAlone, C::LinkLost),
    (VerifySource, StandAlone, C::LinkLost),
    (VerifyTarget, StandAlone, C::LinkLost),
    (Connected, SyncSource, C::ResyncStart),
    (SyncSource, Connected, C::ResyncEnd),
    (SyncTarget, Connected, C::ResyncEnd),
    (Connected, VerifySource, C::Verify),
    (VerifySource, Connected, C::Verify),
    (Connected, VerifyTarget, C::PeerVerify),
    (VerifyTarget, Connected, C::PeerVerify),
];

/// Whether the table allows `from` → `to` for `cause`.
pub fn allowed<T: PartialEq + Copy>(edges: &[(T, T, Cause)], from: T, to: T, cause: Cause) -> bool {
    from == to
        || edges
            .iter()
            .any(|&(f, t, c)| f == from && t == to && c == cause)
}

/// What a copy is once a resync from a source whose copy is `source` finished: as current as
/// the source (a copy of an Outdated copy may lack what it lacks).
pub fn synced_copy(source: DiskState) -> DiskState {
    if source == Outdated {
        Outdated
    } else {
        UpToDate
    }
}

/// The disk state a node starts with, as its metadata flags say.
pub fn starting_disk(flags: &crate::meta::MetaFlags) -> DiskState {
    if flags.consistent && flags.outdated {
        Outdated
    } else if flags.consistent {
        UpToDate
    } else {
        Inconsistent
    }
}

/// One change of the state machine's fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Change {
    pub role: Option<Role>,
    pub disk: Option<DiskState>,
    pub conn: Option<Conn>,
}

impl Change {
    pub fn role(role: Role) -> Self {
        Self {
            role: Some(role),
            ..Self::default()
        }
    }
    pub fn disk(disk: DiskState) -> Self {
        Self {
            disk: Some(disk),
            ..Self::default()
        }
    }
    pub fn conn(conn: Conn) -> Self {
        Self {
            conn: Some(conn),
            ..Self::default()
        }
    }
    pub fn and_disk(mut self, disk: DiskState) -> Self {
        self.disk = Some(disk);
        self
    }
}

/// The role and the switchover flag as the data path reads them: published by `State` in the
/// same step that changes them, read without the state lock (one atomic, so the two are read
/// together). A reader may see the value from just before a change, as a reader that took
/// the lock just before it would.
#[derive(Debug, Default)]
pub struct Published(std::sync::atomic::AtomicU8);

const PUBLISHED_PRIMARY: u8 = 1;
const PUBLISHED_SWITCHING: u8 = 2;

impl Published {
    /// The role, and whether a switchover is draining this primary.
    pub fn role_and_switching(&self) -> (Role, bool) {
        let v = self.0.load(std::sync::atomic::Ordering::Acquire);
        let role = if v & PUBLISHED_PRIMARY != 0 {
            Primary
        } else {
            Secondary
        };
        (role, v & PUBLISHED_SWITCHING != 0)
    }

    pub fn role(&self) -> Role {
        self.role_and_switching().0
    }

    fn publish(&self, role: Role, switching: bool) {
        let v = if role == Primary {
            PUBLISHED_PRIMARY
        } else {
            0
        } | if switching { PUBLISHED_SWITCHING } else { 0 };
        self.0.store(v, std::sync::atomic::Ordering::Release);
    }
}

/// Why `State::check` rejected a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Illegal(pub String);

pub struct State {
    role: Role,
    disk: DiskState,
    conn: Conn,
    /// Edges taken that the table does not allow (release builds only; debug builds abort).
    illegal: u64,
    /// The operator wants the link up (`connect`), as opposed to StandAlone (`disconnect`,
    /// or a split brain / refusal that needs the operator).
    pub want_connect: bool,
    pub discard_my_data: bool,
    /// Set when a split brain was detected; cleared by `connect`.
    pub split_brain: Option<String>,
    /// Why the last connection attempt was refused, for status.
    pub last_refusal: Option<String>,
    pub resync: Option<Progress>,
    pub verify: Option<Progress>,
    /// Result of the last finished verify.
    pub last_verify: Option<Progress>,
    /// This node lost the primary role without an operator asking (lease, supersession):
    /// if nobody took over, it takes the role back once it is connected and UpToDate.
    pub lost_primary_role: bool,
    /// The epoch whose lease ran out on this primary, while that is the only reason its copy
    /// is Outdated: the witness may still prove it UpToDate.
    pub lapsed_in: Option<u64>,
    /// Until when this primary's witness lease is valid, by its own monotonic clock. Kept
    /// with the role so that giving up the role gives up the lease in the same step.
    lease_until: Option<Instant>,
    /// Why the last lease renewal failed, for status.
    lease_problem: Option<String>,
    /// Why an automatic promotion is not happening (or is waiting), for status.
    failover_note: Option<String>,
    /// What a write the peer did not acknowledge may do: read with the role and the lease
    /// in one step by the writes held for fencing.
    fence: Fence,
    /// This node was primary when the peer was last lost (for discard-younger-primary).
    primary_when_peer_lost: bool,
    /// A switchover is draining this primary: new NBD clients are refused.
    switching: bool,
    /// Role and `switching` for the data path.
    published: std::sync::Arc<Published>,
}

impl State {
    /// A node as it starts: secondary, its disk as the metadata says, dialing its peer.
    pub fn new(disk: DiskState) -> Self {
        Self {
            role: Role::Secondary,
            disk,
            conn: Conn::Connecting,
            illegal: 0,
            want_connect: true,
            discard_my_data: false,
            split_brain: None,
            last_refusal: None,
            resync: None,
            verify: None,
            last_verify: None,
            lost_primary_role: false,
            lapsed_in: None,
            lease_until: None,
            lease_problem: None,
            failover_note: None,
            fence: Fence::Clear,
            primary_when_peer_lost: false,
            switching: false,
            published: Default::default(),
        }
    }

    pub fn role_and_switching(&self) -> (Role, bool) {
        (self.role, self.switching)
    }

    /// Where the role and `switching` are published for readers without the lock.
    pub fn published(&self) -> std::sync::Arc<Published> {
        self.published.clone()
    }

    /// A switchover starts (or stops) draining this primary.
    pub fn set_switching(&mut self, on: bool) {
        self.switching = on;
        self.published.publish(self.role, on);
    }

    pub fn primary_when_peer_lost(&self) -> bool {
        self.primary_when_peer_lost
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Set the fencing state; true if it changed.
    pub fn set_fence(&mut self, fence: Fence) -> bool {
        if self.fence == fence {
            return false;
        }
        self.fence = fence;
        true
    }

    /// The lease is valid at `now`.
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|t| now < t)
    }
    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }
    pub fn lease_problem(&self) -> Option<&str> {
        self.lease_problem.as_deref()
    }

    /// The witness granted or renewed the lease until `until`. True if it had lapsed (writes
    /// held for a valid lease look again).
    pub fn lease_renewed(&mut self, until: Instant, now: Instant) -> bool {
        let lapsed = !self.lease_valid(now);
        self.lease_until = Some(until);
        self.lease_problem = None;
        lapsed
    }

    /// A renewal failed for `why`. True if it is the first failure since the last renewal.
    pub fn lease_trouble(&mut self, why: String) -> bool {
        self.lease_problem.replace(why).is_none()
    }

    /// The lease is given up (released, or the role is gone).
    pub fn lease_dropped(&mut self) {
        self.lease_until = None;
    }

    pub fn failover_note(&self) -> Option<&str> {
        self.failover_note.as_deref()
    }

    /// Set why an automatic promotion is not happening; true if that changed.
    pub fn set_failover_note(&mut self, note: Option<String>) -> bool {
        if self.failover_note == note {
            return false;
        }
        self.failover_note = note;
        true
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn disk(&self) -> DiskState {
        self.disk
    }
    pub fn conn(&self) -> Conn {
        self.conn
    }
    pub fn illegal_transitions(&self) -> u64 {
        self.illegal
    }

    /// Whether the table allows `change` for `cause`, naming the first edge it does not.
    pub fn check(&self, change: Change, cause: Cause) -> Result<(), Illegal> {
        let edge = |what: &str, from: &dyn std::fmt::Debug, to: &dyn std::fmt::Debug| {
            Illegal(format!("{what} {from:?} -> {to:?} by {cause:?}"))
        };
        if let Some(to) = change.role {
            if !allowed(ROLE_EDGES, self.role, to, cause) {
                return Err(edge("role", &self.role, &to));
            }
        }
        if let Some(to) = change.disk {
            if !allowed(DISK_EDGES, self.disk, to, cause) {
                return Err(edge("disk", &self.disk, &to));
            }
        }
        if let Some(to) = change.conn {
            if !allowed(CONN_EDGES, self.conn, to, cause) {
                return Err(edge("connection", &self.conn, &to));
            }
        }
        Ok(())
    }

    /// Apply `change` for `cause`: the one place the role, disk and connection change, called
    /// only by the named events above.
    fn go(&mut self, change: Change, cause: Cause) {
        if let Err(Illegal(what)) = self.check(change, cause) {
            tracing::error!(
                "illegal state transition: {what} (from {}/{}/{}); this is a bug",
                super::runtime::role_str(self.role),
                self.disk.as_str(),
                self.conn.as_str()
            );
            if cfg!(debug_assertions) {
                // Every test runs a debug build: stop here so the test that got here fails.
                std::process::abort();
            }
            self.illegal += 1;
        }
        if let Some(r) = change.role {
            self.role = r;
            self.published.publish(r, self.switching);
        }
        if let Some(d) = change.disk {
            self.disk = d;
        }
        if let Some(c) = change.conn {
            self.conn = c;
        }
    }

    // ---- what happens to the state, one event at a time (plain code, no IO) ----

    /// Fencing done (the witness's epoch, the handler's proof, or a switchover's hand-over).
    pub fn promoted(&mut self) {
        self.go(Change::role(Primary), C::Promote);
        self.lost_primary_role = false;
    }

    /// `secondary`, or this primary's half of a switchover.
    pub fn demoted(&mut self) {
        self.go(Change::role(Secondary), C::Demote);
        self.lost_primary_role = false;
        self.lease_until = None;
    }

    /// The lease ran out or a newer epoch was seen. False if this node was not primary.
    pub fn stepped_down(&mut self) -> bool {
        if self.role != Primary {
            return false;
        }
        self.go(Change::role(Secondary), C::StepDown);
        self.lost_primary_role = true;
        self.lease_until = None;
        true
    }

    /// `primary --force` of a copy that is not UpToDate: it becomes the reference.
    pub fn forced_up_to_date(&mut self) {
        self.go(Change::disk(UpToDate), C::ForcePromote);
    }

    /// This copy lacks writes the other has. False if it was not UpToDate (an Inconsistent
    /// copy stays Inconsistent).
    pub fn outdated(&mut self) -> bool {
        // Whatever the reason was, it is not only a lapsed lease any more.
        self.lapsed_in = None;
        if self.disk != UpToDate {
            return false;
        }
        self.go(Change::disk(Outdated), C::Outdate);
        true
    }

    /// The witness, or an identical UpToDate peer, proved this copy current. False if it is
    /// not Outdated (e.g. it became a sync target meanwhile).
    pub fn proven_current(&mut self) -> bool {
        self.lapsed_in = None;
        if self.disk != Outdated {
            return false;
        }
        self.go(Change::disk(UpToDate), C::ProvenCurrent);
        true
    }

    /// `invalidate`: the data is discarded; a full resync from the peer follows.
    pub fn invalidated(&mut self) {
        self.go(Change::disk(Inconsistent), C::Invalidate);
    }

    /// The handshake found a split brain: StandAlone until an operator decides.
    pub fn split_brain_found(&mut self, detail: String) {
        self.split_brain = Some(detail);
        self.want_connect = false;
        self.go(Change::conn(StandAlone), C::HandshakeRefused);
    }

    /// The handshake refused to connect: StandAlone until an operator decides.
    pub fn handshake_refused(&mut self, detail: String) {
        self.last_refusal = Some(detail);
        self.want_connect = false;
        self.go(Change::conn(StandAlone), C::HandshakeRefused);
    }

    /// The handshake decided `conn` with `out_of_sync` bytes to resync. A sync target's copy
    /// is Inconsistent until the resync ends.
    pub fn handshake_done(&mut self, conn: Conn, out_of_sync: u64) {
        self.discard_my_data = false;
        self.last_refusal = None;
        let change = Change::conn(conn);
        if conn == SyncTarget {
            self.go(change.and_disk(Inconsistent), C::Handshake);
            // Whatever the copy was, it becomes the source's.
            self.lapsed_in = None;
        } else {
            self.go(change, C::Handshake);
        }
        if matches!(conn, SyncSource | SyncTarget) {
            self.resync = Some(Progress::new(out_of_sync));
        }
    }

    /// `connect [--discard-my-data]`: the operator wants the link up.
    pub fn connect(&mut self, discard_my_data: bool) {
        self.want_connect = true;
        self.discard_my_data = discard_my_data;
        self.split_brain = None;
        self.last_refusal = None;
        if self.conn == StandAlone {
            self.go(Change::conn(Connecting), C::Connect);
        }
    }

    /// `disconnect`: the operator wants the link down.
    pub fn disconnect(&mut self) {
        self.want_connect = false;
        self.go(Change::conn(StandAlone), C::Disconnect);
    }

    /// The link went away. Returns whether this node was primary then. A sync target whose
    /// resync did not finish stays Inconsistent.
    pub fn link_lost(&mut self) -> bool {
        let to = if self.want_connect {
            Connecting
        } else {
            StandAlone
        };
        self.go(Change::conn(to), C::LinkLost);
        self.resync = None;
        self.verify = None;
        self.primary_when_peer_lost = self.role == Primary;
        self.primary_when_peer_lost
    }

    /// Blocks were marked while connected: a primary that is Connected becomes SyncSource of
    /// `total` bytes. False (and nothing changes) otherwise; only the caller that got true
    /// runs the resync.
    pub fn claim_online_resync(&mut self, total: u64) -> bool {
        if self.role != Primary || self.conn != Connected || total == 0 {
            return false;
        }
        self.go(Change::conn(SyncSource), C::ResyncStart);
        self.resync = Some(Progress::new(total));
        true
    }

    /// This node finished a resync as its source: Connected again. Returns its progress.
    pub fn resync_done_as_source(&mut self) -> Option<Progress> {
        if self.conn == SyncSource {
            self.go(Change::conn(Connected), C::ResyncEnd);
        }
        self.resync.take()
    }

    /// This node finished a resync as its target, from a source whose copy is `source`: the
    /// copy is as current as the source's (a copy of an Outdated copy is Outdated). Returns
    /// the new disk state.
    pub fn resync_done_as_target(&mut self, source: DiskState) -> DiskState {
        let disk = synced_copy(source);
        // After an online resync this node was Connected all along (or verifying).
        let conn = if self.conn == SyncTarget {
            Connected
        } else {
            self.conn
        };
        self.go(Change::conn(conn).and_disk(disk), C::ResyncEnd);
        self.resync = None;
        disk
    }

    /// This node starts an online verify of `size` bytes; refused unless plainly Connected.
    pub fn verify_started(&mut self, size: u64) -> Result<(), String> {
        if self.conn != Connected {
            return Err(format!("cannot verify while {}", self.conn.as_str()));
        }
        self.go(Change::conn(VerifySource), C::Verify);
        self.verify = Some(Progress::new(size));
        Ok(())
    }

    /// This node's verify ended (finished or not): its result becomes the last verify.
    pub fn verify_ended(&mut self) -> Option<Progress> {
        if self.conn == VerifySource {
            self.go(Change::conn(Connected), C::Verify);
        }
        let p = self.verify.take();
        self.last_verify = p.clone();
        p
    }

    /// The peer starts or ends a verify against this node. Only from plain Connected: a
    /// resync or this node's own verify keeps its state. Whether anything changed.
    pub fn peer_verify(&mut self, active: bool) -> bool {
        let (from, to) = if active {
            (Connected, VerifyTarget)
        } else {
            (VerifyTarget, Connected)
        };
        if self.conn != from {
            return false;
        }
        self.go(Change::conn(to), C::PeerVerify);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Role; 2] = [Primary, Secondary];
    const DISKS: [DiskState; 3] = [Inconsistent, Outdated, UpToDate];
    const CONNS: [Conn; 7] = [
        StandAlone,
        Connecting,
        Connected,
        SyncSource,
        SyncTarget,
        VerifySource,
        VerifyTarget,
    ];

    #[test]
    fn nothing_comes_back_from_inconsistent_but_a_resync_or_force() {
        for &(from, to, cause) in DISK_EDGES {
            if from == Inconsistent {
                assert!(
                    matches!(cause, C::ResyncEnd | C::ForcePromote),
                    "{from:?} -> {to:?} by {cause:?}"
                );
            }
            // Only proof, a resync or an operator's force lifts an Outdated copy.
            if from == Outdated && to == UpToDate {
                assert!(matches!(
                    cause,
                    C::ProvenCurrent | C::ResyncEnd | C::ForcePromote
                ));
            }
        }
    }

    #[test]
    fn every_state_is_reachable_and_every_linked_state_can_lose_its_link() {
        for c in CONNS {
            let linked = c.is_linked();
            let lose = CONN_EDGES
                .iter()
                .any(|&(f, t, cause)| f == c && !t.is_linked() && cause == C::LinkLost);
            assert!(lose || !linked, "{c:?}");
            // With no link there is none to lose.
            assert!(c != StandAlone || !lose);
            if c != Connecting {
                assert!(CONN_EDGES.iter().any(|&(_, t, _)| t == c), "{c:?}");
            }
            if c != StandAlone {
                assert!(
                    CONN_EDGES
                        .iter()
                        .any(|&(f, t, cause)| f == c && t == StandAlone && cause == C::Disconnect),
                    "{c:?}"
                );
            }
        }
        for r in ROLES {
            assert!(ROLE_EDGES.iter().any(|&(_, t, _)| t == r));
        }
        for d in DISKS {
            assert!(DISK_EDGES.iter().any(|&(_, t, _)| t == d), "{d:?}");
        }
    }

    #[test]
    fn no_edge_is_listed_twice_or_goes_nowhere() {
        fn check<T: PartialEq + Copy + std::fmt::Debug>(edges: &[(T, T, Cause)]) {
            for (i, e) in edges.iter().enumerate() {
                assert_ne!(e.0, e.1, "{e:?} is no change");
                assert!(!edges[..i].contains(e), "{e:?} twice");
            }
        }
        check(ROLE_EDGES);
        check(DISK_EDGES);
        check(CONN_EDGES);
    }

    /// A secondary connected and UpToDate, as after a handshake with nothing to resync.
    fn connected() -> State {
        let mut st = State::new(UpToDate);
        st.go(Change::conn(Connected), C::Handshake);
        st
    }

    #[test]
    fn a_lost_link_is_retried_unless_the_operator_wants_it_down() {
        let mut st = connected();
        st.resync = Some(Progress::new(1));
        assert!(!st.link_lost());
        assert_eq!((st.conn(), st.resync.is_none()), (Connecting, true));
        let mut st = connected();
        st.disconnect();
        assert_eq!(st.conn(), StandAlone);
        assert!(!st.link_lost());
        assert_eq!(st.conn(), StandAlone);
        st.split_brain = Some("x".into());
        st.connect(true);
        assert_eq!(st.conn(), Connecting);
        assert!(st.want_connect && st.discard_my_data && st.split_brain.is_none());
        let mut st = connected();
        st.promoted();
        assert!(st.link_lost(), "a primary's loss is remembered");
    }

    #[test]
    fn only_a_connected_primary_with_bits_claims_an_online_resync_and_only_once() {
        let mut st = connected();
        assert!(!st.claim_online_resync(4096), "a secondary");
        st.promoted();
        assert!(!st.claim_online_resync(0), "nothing marked");
        assert!(st.claim_online_resync(4096));
        assert_eq!(st.conn(), SyncSource);
        assert!(!st.claim_online_resync(4096), "already resyncing");
        assert_eq!(st.resync_done_as_source().unwrap().total_bytes, 4096);
        assert_eq!(st.conn(), Connected);
        assert!(st.verify_started(1).is_ok());
        assert!(!st.claim_online_resync(4096), "verifying");
    }

    #[test]
    fn a_finished_resync_makes_the_target_as_current_as_its_source() {
        let mut st = State::new(Outdated);
        st.go(
            Change::conn(SyncTarget).and_disk(Inconsistent),
            C::Handshake,
        );
        assert_eq!(st.resync_done_as_target(Outdated), Outdated);
        assert_eq!(st.conn(), Connected);
        let mut st = State::new(Inconsistent);
        st.go(Change::conn(SyncTarget), C::Handshake);
        assert_eq!(st.resync_done_as_target(UpToDate), UpToDate);
        // An online resync leaves a verifying node's connection alone.
        let mut st = connected();
        st.verify_started(8).unwrap();
        assert_eq!(st.resync_done_as_target(UpToDate), UpToDate);
        assert_eq!(st.conn(), VerifySource);
        assert!(st.verify_ended().is_some());
        assert!(st.last_verify.is_some() && st.conn() == Connected);
    }

    #[test]
    fn a_peer_verify_shows_only_over_a_plain_connection() {
        let mut st = connected();
        assert!(st.peer_verify(true));
        assert_eq!(st.conn(), VerifyTarget);
        assert!(st.verify_started(1).is_err(), "not while the peer verifies");
        assert!(st.peer_verify(false));
        assert_eq!(st.conn(), Connected);
        st.promoted();
        assert!(st.claim_online_resync(1));
        assert!(!st.peer_verify(true), "a resync keeps its state");
        assert!(!st.peer_verify(false));
        assert_eq!(st.conn(), SyncSource);
    }

    #[test]
    fn roles_and_copies_change_only_from_the_states_that_allow_it() {
        let mut st = connected();
        assert!(
            !st.stepped_down(),
            "a secondary has nothing to step down from"
        );
        st.promoted();
        assert!(st.stepped_down());
        assert_eq!(st.role(), Secondary);
        assert!(!st.proven_current(), "already UpToDate");
        assert!(st.outdated());
        assert!(!st.outdated());
        assert!(st.proven_current());
        // A sync target's copy is Inconsistent: neither outdated nor proven current.
        let mut st = State::new(Outdated);
        st.handshake_done(SyncTarget, 4096);
        assert_eq!((st.disk(), st.conn()), (Inconsistent, SyncTarget));
        assert_eq!(st.resync.as_ref().unwrap().total_bytes, 4096);
        assert!(!st.outdated() && !st.proven_current());
        assert_eq!(st.disk(), Inconsistent);
        // A lost role and a lapsed lease are remembered until an event ends them.
        let mut st = connected();
        st.promoted();
        assert!(st.stepped_down() && st.lost_primary_role);
        st.lapsed_in = Some(7);
        st.handshake_done(Connected, 0);
        assert_eq!(st.lapsed_in, Some(7), "a plain reconnect keeps it");
        // Any proof attempt ends it, even one that finds the copy UpToDate already.
        assert!(!st.proven_current());
        assert_eq!(st.lapsed_in, None);
        st.promoted();
        assert!(!st.lost_primary_role);
        // A refused handshake needs the operator.
        let mut st = State::new(UpToDate);
        st.split_brain_found("both wrote".into());
        assert_eq!(st.conn(), StandAlone);
        assert!(!st.want_connect && st.split_brain.is_some());
        st.connect(false);
        st.handshake_refused("unrelated data".into());
        assert!(!st.want_connect && st.last_refusal.is_some());
        assert_eq!(st.illegal_transitions(), 0);
    }

    #[test]
    fn check_names_the_edge_it_refuses() {
        let mut st = State::new(Inconsistent);
        assert!(st.check(Change::disk(UpToDate), C::ResyncEnd).is_ok());
        let e = st
            .check(Change::disk(UpToDate), C::ProvenCurrent)
            .unwrap_err();
        assert_eq!(e.0, "disk Inconsistent -> UpToDate by ProvenCurrent");
        // Connecting -> SyncSource only by a handshake, not by an online resync.
        assert!(st.check(Change::conn(SyncSource), C::ResyncStart).is_err());
        st.go(Change::conn(Connected), C::Handshake);
        assert!(st.check(Change::conn(SyncSource), C::ResyncStart).is_ok());
        // A change that is no change is always allowed.
        assert!(st.check(Change::conn(Connected), C::Promote).is_ok());
        // The first illegal field is named, even if another is fine.
        let e = st
            .check(Change::role(Primary).and_disk(Outdated), C::Promote)
            .unwrap_err();
        assert!(e.0.starts_with("disk"), "{e:?}");
        assert_eq!(st.illegal_transitions(), 0);
    }

    /// The lease lives with the role: losing the role, whichever way, loses the lease in the
    /// same step, so no reader sees a secondary with a valid lease.
    #[test]
    fn the_published_role_follows_every_role_change_and_the_switchover() {
        let mut st = State::new(UpToDate);
        let p = st.published();
        assert_eq!(p.role_and_switching(), (Secondary, false));
        st.promoted();
        assert_eq!(p.role_and_switching(), (Primary, false));
        st.set_switching(true);
        assert_eq!(p.role_and_switching(), (Primary, true));
        st.demoted();
        assert_eq!(p.role_and_switching(), (Secondary, true));
        st.set_switching(false);
        st.promoted();
        st.stepped_down();
        assert_eq!(p.role(), Secondary);
        assert_eq!(p.role_and_switching(), st.role_and_switching());
    }

    #[test]
    fn giving_up_the_role_gives_up_the_lease() {
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(2);
        for lose in [State::demoted as fn(&mut State), |st| {
            assert!(st.stepped_down());
        }] {
            let mut st = connected();
            st.promoted();
            assert!(st.lease_renewed(later, now), "a first grant ends a lapse");
            assert!(
                !st.lease_renewed(later, now),
                "a renewal of a valid lease does not"
            );
            assert!(st.lease_valid(now) && !st.lease_valid(later));
            lose(&mut st);
            assert!(!st.lease_valid(now) && st.lease_until().is_none());
        }
        let mut st = connected();
        assert!(
            st.lease_trouble("witness down".into()),
            "the first problem is new"
        );
        assert!(!st.lease_trouble("still down".into()));
        assert_eq!(st.lease_problem(), Some("still down"));
        st.lease_renewed(later, now);
        assert_eq!(st.lease_problem(), None);
        assert!(st.set_failover_note(Some("waiting".into())));
        assert!(!st.set_failover_note(Some("waiting".into())), "unchanged");
        assert_eq!(st.failover_note(), Some("waiting"));
    }
}
