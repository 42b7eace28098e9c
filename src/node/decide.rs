//! The connect-time decision: compare the two sides' generations and decide who resyncs from
//! whom, whether the pair has split brain, or why the connection must be refused.
//!
//! Two pure functions, no I/O:
//!
//! * [`compare`] is the generation rule table (DRBD 8.4's `uuid_compare` order, see
//!   `reference/drbd.md` §2.4) with DRBD 9's choice for a protocol-C primary crash (§2.6: the side
//!   that survived is the sync source, the crashed primary's un-acknowledged activity-log writes are
//!   rolled back).
//! * [`handshake`] turns that result into a [`Verdict`] (§2.5 order): disk states, split-brain
//!   policies (§4.2), `--discard-my-data` (§4.3), and the refusals.
//!
//! Every comparison masks the "was primary" bit ([`PRIMARY_BIT`]).
//!
//! ## Where this deliberately differs from DRBD 8.4
//!
//! * **Current generation 0** is treated like [`JUST_CREATED`] ("no data generation"), so two such
//!   sides give rule 10 on both ends (8.4 would make both ends sync target by rule 20).
//! * **Equal current generations after a crash** (8.4 rule 40/41): a side that crashed as primary
//!   is rolled back to the survivor (DRBD 9, protocol C). If exactly one side is primary *now*, that
//!   side is the source instead (rule 41; DRBD 9's `*-if-both-failed` also follows the current
//!   primary) — otherwise the survivor would overwrite the data a primary is serving, which the
//!   handshake would have to refuse. Both crashed: the node whose name sorts first is the source
//!   (the same tie-break serves the policies; node names must differ, [`handshake`] refuses a
//!   peer with my name).
//! * **Rules 34–37** (equal current, exactly one side still holds a bitmap generation: a resync
//!   whose "finished" step was persisted on one side only) are implemented as in 8.4 with the
//!   protocol ≥ 91 behaviour. The side holding the bitmap is the source, bitmap-based; the normal
//!   finish step after that resync (source `clear_bitmap`, target `adopt`) repairs the tuples, so
//!   the "corrected myself / corrected peer" rotations are left to the caller's finish step rather
//!   than done here (this function is pure).
//! * **Rules 51/71**: tandem has no sync-UUID (`UUID_NEW_BM_OFFSET`) rotation at resync start, so
//!   the protocol ≥ 96 form cannot occur. The resync *finish* on the source (`clear_bitmap`: B moves
//!   to H0) leaves exactly the shape 8.4's protocol < 96 test looks for, so that form is used:
//!   `C_self == H0_peer && H0_self == H1_peer` — "the peer finished a resync to me, I never adopted
//!   its generation" — which is a bitmap-based resync (the source only finishes after the target
//!   acknowledged every block), where rule 60 would have forced a full one. Named
//!   `sync-target-missed-adopt` / `sync-source-peer-missed-adopt`.
//! * **Ambiguous ancestry**: if the peer's tuple shows my current as an ancestor *and* mine shows
//!   the peer's current as an ancestor (rules 50/51/60 and 70/71/80 both match — only possible with
//!   corrupted or re-used generations), 8.4 would let rule order pick a direction, and the two ends
//!   would disagree. Here it is a split brain that only an operator resolves
//!   (`ambiguous-ancestry`). This is DRBD 9's refinement of rule 60/80 generalised.
//! * **Rule 100** skips 0 and [`JUST_CREATED`] slots (DRBD 9 skips 0; two never-synced nodes share
//!   JC without sharing data) and, because tandem's history has only two slots, also counts a
//!   bitmap generation that equals one of the peer's history slots as a common ancestor (after the
//!   first resync of a split side its old bitmap generation has moved into history).
//! * **Policies after `history-both`** (8.4's `always-asbp`) are always applied, and always as a
//!   full sync; after `bitmap-both` a policy resolution is bitmap-based.
//! * **`--discard-my-data`** on exactly one side wins over a configured policy (the operator's
//!   explicit choice; DRBD 9 also lets it reverse a decided direction) and is always a full sync of
//!   that side. Set on both sides, the connection is refused whatever the generations say (DRBD
//!   refuses that at protocol exchange).
//! * **`discard-younger-primary`** reads bit 0 of each side's *bitmap* generation ("was primary when
//!   the generations split"), as DRBD does. When it cannot decide, it falls back to
//!   `discard-least-changes` (what DRBD's fall-through amounts to).

use std::fmt;

use crate::meta::gen::{hex, Generations, JUST_CREATED, PRIMARY_BIT};
use crate::node::{DiskState, Role};
use crate::policy::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
use crate::repl::proto::PeerState;

/// One side of the handshake, as it stands when the two nodes connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    pub gens: Generations,
    /// Role at connect time.
    pub role: Role,
    pub disk: DiskState,
    /// Was primary when it last went down uncleanly.
    pub crashed_primary: bool,
    /// Its machine went down with it (power loss, OS crash): acknowledged writes may be
    /// missing from its copy, and it cannot tell which.
    pub rolled_back: bool,
    /// It lost its link while the peer had not flushed writes it acknowledged (see
    /// `MetaFlags::peer_unflushed`).
    pub peer_unflushed: bool,
    /// The epoch it was last promoted in (a crashed primary's is the one it served in; its
    /// current epoch may since have risen to a peer's).
    pub primary_epoch: u64,
    /// Dirty bitmap bytes ("changes" for discard-least-changes / discard-zero-changes).
    pub out_of_sync_bytes: u64,
    /// The operator asked `connect --discard-my-data`.
    pub discard_my_data: bool,
    /// Node name (for discard-node-NAME and the deterministic tie-breaks).
    pub node: String,
}

impl Side {
    /// A side with only generations, role and disk known: no crash, rollback, unflushed
    /// writes, bits or operator flags.
    pub fn plain(node: &str, gens: Generations, role: Role, disk: DiskState) -> Self {
        Self {
            gens,
            role,
            disk,
            crashed_primary: false,
            rolled_back: false,
            peer_unflushed: false,
            primary_epoch: 0,
            out_of_sync_bytes: 0,
            discard_my_data: false,
            node: node.to_owned(),
        }
    }

    /// `node`'s side as its state message describes it.
    pub fn of(node: &str, s: &PeerState) -> Self {
        Self {
            gens: s.gens,
            role: s.role,
            disk: s.disk,
            crashed_primary: s.crashed_primary,
            rolled_back: s.rolled_back,
            peer_unflushed: s.peer_unflushed,
            primary_epoch: s.primary_epoch,
            out_of_sync_bytes: s.out_of_sync_bytes,
            discard_my_data: s.discard_my_data,
            node: node.to_owned(),
        }
    }
}

/// Which way a resync goes, from the point of view of the side that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Source,
    Target,
}

impl Direction {
    pub fn mirror(self) -> Self {
        match self {
            Self::Source => Self::Target,
            Self::Target => Self::Source,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

/// The result of the generation comparison, from the point of view of `me`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    NoSync,
    SourceUseBitmap,
    SourceFullSync,
    TargetUseBitmap,
    TargetFullSync,
    /// Both sides diverged from the same bitmap generation: a policy may resolve it.
    SplitBrainAutoRecover,
    /// Common ancestry only in history (or ambiguous): only a full sync can resolve it.
    SplitBrainDisconnect,
    /// No generation in common.
    Unrelated,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Self::NoSync => "no-sync",
            Self::SourceUseBitmap => "source-use-bitmap",
            Self::SourceFullSync => "source-full-sync",
            Self::TargetUseBitmap => "target-use-bitmap",
            Self::TargetFullSync => "target-full-sync",
            Self::SplitBrainAutoRecover => "split-brain-auto-recover",
            Self::SplitBrainDisconnect => "split-brain-disconnect",
            Self::Unrelated => "unrelated-data",
        }
    }

    /// DRBD 8.4's `uuid_compare()` return value, for log lines in its format.
    pub fn drbd_code(self) -> i32 {
        match self {
            Self::NoSync => 0,
            Self::SourceUseBitmap => 1,
            Self::SourceFullSync => 2,
            Self::TargetUseBitmap => -1,
            Self::TargetFullSync => -2,
            Self::SplitBrainAutoRecover => 100,
            Self::SplitBrainDisconnect => -100,
            Self::Unrelated => -1000,
        }
    }

    /// The same result seen from the other side.
    pub fn mirror(self) -> Self {
        match self {
            Self::SourceUseBitmap => Self::TargetUseBitmap,
            Self::SourceFullSync => Self::TargetFullSync,
            Self::TargetUseBitmap => Self::SourceUseBitmap,
            Self::TargetFullSync => Self::SourceFullSync,
            s => s,
        }
    }

    pub fn direction(self) -> Option<Direction> {
        match self {
            Self::SourceUseBitmap | Self::SourceFullSync => Some(Direction::Source),
            Self::TargetUseBitmap | Self::TargetFullSync => Some(Direction::Target),
            _ => None,
        }
    }

    pub fn is_full(self) -> bool {
        matches!(self, Self::SourceFullSync | Self::TargetFullSync)
    }

    pub fn is_split_brain(self) -> bool {
        matches!(
            self,
            Self::SplitBrainAutoRecover | Self::SplitBrainDisconnect
        )
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which rule of the table decided; `name()` is stable (logs, status, events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// 10: both never synced.
    JustCreatedBoth,
    /// 20: I was never synced, the peer has data.
    JustCreatedSelf,
    /// 30: the peer was never synced.
    JustCreatedPeer,
    /// 34: equal current; I still hold the bitmap of a resync I was source of, and the peer's
    /// history shows it finished.
    SyncSourceMissedFinish,
    /// 35: mirror of 34.
    SyncTargetPeerMissedFinish,
    /// 36: equal current; I still hold a bitmap, the peer does not (histories do not line up).
    SyncSourcePeerMissedFinish,
    /// 37: mirror of 36.
    SyncTargetMissedFinish,
    /// 40: equal current, nobody crashed as primary: a link hiccup, nothing to do.
    Reconnected,
    /// 40 (DRBD 9, protocol C): one side crashed as primary; the other survived and is source.
    CrashedPrimarySurvivor,
    /// 40: both crashed as primary; tie broken by node name.
    CrashedPrimaryBoth,
    /// 41: equal current after a crash and exactly one side is primary now: it is the source.
    PrimaryAfterCrash,
    /// (40) equal current, and one side's machine went down with it: its copy lost what was
    /// only in its page cache, so the other side is the source of everything.
    RolledBack,
    /// (40) both machines went down: the one that kept flushes its peer lacked is the source
    /// (see `compare`), of everything.
    RolledBackBoth,
    /// 50: my current is the peer's bitmap generation.
    BitmapPeer,
    /// 51: the peer finished a resync to me (my current is its H0) but I never adopted it.
    SyncTargetMissedAdopt,
    /// 60: my current is in the peer's history.
    HistoryPeer,
    /// 70: the peer's current is my bitmap generation.
    BitmapSelf,
    /// 71: mirror of 51.
    SyncSourcePeerMissedAdopt,
    /// 80: the peer's current is in my history.
    HistorySelf,
    /// 90: same bitmap generation on both sides: both wrote since.
    BitmapBoth,
    /// 100: a common generation in history (or bitmap vs history) only.
    HistoryBoth,
    /// (100): each side's current is an ancestor of the other's.
    AmbiguousAncestry,
    /// (100, as DRBD logs it): nothing in common.
    Unrelated,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Self::JustCreatedBoth => "just-created-both",
            Self::JustCreatedSelf => "just-created-self",
            Self::JustCreatedPeer => "just-created-peer",
            Self::SyncSourceMissedFinish => "sync-source-missed-finish",
            Self::SyncTargetPeerMissedFinish => "sync-target-peer-missed-finish",
            Self::SyncSourcePeerMissedFinish => "sync-source-peer-missed-finish",
            Self::SyncTargetMissedFinish => "sync-target-missed-finish",
            Self::Reconnected => "reconnected",
            Self::CrashedPrimarySurvivor => "crashed-primary-survivor",
            Self::CrashedPrimaryBoth => "crashed-primary-both",
            Self::PrimaryAfterCrash => "primary-after-crash",
            Self::RolledBack => "rolled-back",
            Self::RolledBackBoth => "rolled-back-both",
            Self::BitmapPeer => "bitmap-peer",
            Self::SyncTargetMissedAdopt => "sync-target-missed-adopt",
            Self::HistoryPeer => "history-peer",
            Self::BitmapSelf => "bitmap-self",
            Self::SyncSourcePeerMissedAdopt => "sync-source-peer-missed-adopt",
            Self::HistorySelf => "history-self",
            Self::BitmapBoth => "bitmap-both",
            Self::HistoryBoth => "history-both",
            Self::AmbiguousAncestry => "ambiguous-ancestry",
            Self::Unrelated => "unrelated-data",
        }
    }

    /// The DRBD 8.4 rule number (`uuid_compare()=… by rule N`). The crash sub-rules share 40;
    /// ambiguous ancestry and unrelated data report 100 as 8.4 does after its last loop.
    pub fn number(self) -> u16 {
        match self {
            Self::JustCreatedBoth => 10,
            Self::JustCreatedSelf => 20,
            Self::JustCreatedPeer => 30,
            Self::SyncSourceMissedFinish => 34,
            Self::SyncTargetPeerMissedFinish => 35,
            Self::SyncSourcePeerMissedFinish => 36,
            Self::SyncTargetMissedFinish => 37,
            Self::Reconnected
            | Self::CrashedPrimarySurvivor
            | Self::CrashedPrimaryBoth
            | Self::RolledBack
            | Self::RolledBackBoth => 40,
            Self::PrimaryAfterCrash => 41,
            Self::BitmapPeer => 50,
            Self::SyncTargetMissedAdopt => 51,
            Self::HistoryPeer => 60,
            Self::BitmapSelf => 70,
            Self::SyncSourcePeerMissedAdopt => 71,
            Self::HistorySelf => 80,
            Self::BitmapBoth => 90,
            Self::HistoryBoth | Self::AmbiguousAncestry | Self::Unrelated => 100,
        }
    }

    /// The rule the other side reports for the same pair.
    pub fn mirror(self) -> Self {
        match self {
            Self::JustCreatedSelf => Self::JustCreatedPeer,
            Self::JustCreatedPeer => Self::JustCreatedSelf,
            Self::SyncSourceMissedFinish => Self::SyncTargetPeerMissedFinish,
            Self::SyncTargetPeerMissedFinish => Self::SyncSourceMissedFinish,
            Self::SyncSourcePeerMissedFinish => Self::SyncTargetMissedFinish,
            Self::SyncTargetMissedFinish => Self::SyncSourcePeerMissedFinish,
            Self::BitmapPeer => Self::BitmapSelf,
            Self::BitmapSelf => Self::BitmapPeer,
            Self::SyncTargetMissedAdopt => Self::SyncSourcePeerMissedAdopt,
            Self::SyncSourcePeerMissedAdopt => Self::SyncTargetMissedAdopt,
            Self::HistoryPeer => Self::HistorySelf,
            Self::HistorySelf => Self::HistoryPeer,
            r => r,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.number())
    }
}

/// A generation tuple with the primary bit masked out of every slot.
#[derive(Clone, Copy)]
struct Masked {
    c: u64,
    b: u64,
    h0: u64,
    h1: u64,
}

impl Masked {
    fn of(g: &Generations) -> Self {
        let m = |v: u64| v & !PRIMARY_BIT;
        Self {
            c: m(g.current),
            b: m(g.bitmap),
            h0: m(g.history[0]),
            h1: m(g.history[1]),
        }
    }

    /// Slots that can name a shared ancestor: bitmap and history, without 0 and JUST_CREATED.
    fn ancestors(&self) -> impl Iterator<Item = u64> {
        [self.b, self.h0, self.h1]
            .into_iter()
            .filter(|&v| v != 0 && v != JUST_CREATED)
    }
}

fn fresh(current: u64) -> bool {
    current == 0 || current == JUST_CREATED
}

/// The tie-break both ends compute alike: the node whose name sorts first is the source.
fn tie_break(me: &Side, peer: &Side) -> Direction {
    if me.node < peer.node {
        Direction::Source
    } else {
        Direction::Target
    }
}

fn toward(d: Direction, bitmap: bool) -> Strategy {
    match (d, bitmap) {
        (Direction::Source, true) => Strategy::SourceUseBitmap,
        (Direction::Source, false) => Strategy::SourceFullSync,
        (Direction::Target, true) => Strategy::TargetUseBitmap,
        (Direction::Target, false) => Strategy::TargetFullSync,
    }
}

/// Rules 50/51/60 seen from `older`: does `newer`'s tuple show `older`'s current as an ancestor?
fn descends(older: &Masked, newer: &Masked) -> Option<(Strategy, Rule)> {
    if older.c == newer.b {
        Some((Strategy::TargetUseBitmap, Rule::BitmapPeer))
    } else if older.c == newer.h0 && older.h0 == newer.h1 {
        Some((Strategy::TargetUseBitmap, Rule::SyncTargetMissedAdopt))
    } else if older.c == newer.h0 || older.c == newer.h1 {
        Some((Strategy::TargetFullSync, Rule::HistoryPeer))
    } else {
        None
    }
}

/// Rules 34–41: both sides carry the same current generation.
fn equal_current(me: &Side, peer: &Side, s: &Masked, p: &Masked) -> (Strategy, Rule) {
    match (s.b != 0, p.b != 0) {
        (true, false) if s.b == p.h0 && s.h0 == p.h1 => {
            return (Strategy::SourceUseBitmap, Rule::SyncSourceMissedFinish)
        }
        (true, false) => return (Strategy::SourceUseBitmap, Rule::SyncSourcePeerMissedFinish),
        (false, true) if s.h0 == p.b && s.h1 == p.h0 => {
            return (Strategy::TargetUseBitmap, Rule::SyncTargetPeerMissedFinish)
        }
        (false, true) => return (Strategy::TargetUseBitmap, Rule::SyncTargetMissedFinish),
        _ => {}
    }
    // Neither knows which of its blocks went back with a lost page cache, so nothing short
    // of every block restores identical copies; a copy that kept its cache wins.
    match (me.rolled_back, peer.rolled_back) {
        (true, false) => return (Strategy::TargetFullSync, Rule::RolledBack),
        (false, true) => return (Strategy::SourceFullSync, Rule::RolledBack),
        (true, true) => {
            // Both lost power. A flush acknowledged while the peer was away is durable only on
            // the primary that acknowledged it. That side is the source: the one that
            // recorded the peer had writes it had not flushed, else the one promoted in the
            // later epoch (whether or not it was still primary when it went down: seed 44675
            // of the simulator, a primary that flushed, stepped down and then lost power),
            // else the one that crashed as primary, else the side with out-of-sync bits,
            // else the tie-break.
            let old_rule = crate::mutation::active(crate::mutation::Mutation::PrimaryEpoch);
            let key = |s: &Side| {
                let epoch = match (old_rule, s.crashed_primary) {
                    (false, _) => s.primary_epoch,
                    (true, crashed) => u64::from(crashed),
                };
                (
                    s.peer_unflushed,
                    epoch,
                    s.crashed_primary,
                    s.out_of_sync_bytes > 0,
                )
            };
            let d = match key(me).cmp(&key(peer)) {
                std::cmp::Ordering::Greater => Direction::Source,
                std::cmp::Ordering::Less => Direction::Target,
                std::cmp::Ordering::Equal => tie_break(me, peer),
            };
            return (toward(d, false), Rule::RolledBackBoth);
        }
        _ => {}
    }
    if !me.crashed_primary && !peer.crashed_primary {
        return (Strategy::NoSync, Rule::Reconnected);
    }
    let (me_pri, peer_pri) = (me.role == Role::Primary, peer.role == Role::Primary);
    if me_pri != peer_pri {
        let d = if me_pri {
            Direction::Source
        } else {
            Direction::Target
        };
        return (toward(d, true), Rule::PrimaryAfterCrash);
    }
    match (me.crashed_primary, peer.crashed_primary) {
        (true, false) => (Strategy::TargetUseBitmap, Rule::CrashedPrimarySurvivor),
        (false, true) => (Strategy::SourceUseBitmap, Rule::CrashedPrimarySurvivor),
        _ => (toward(tie_break(me, peer), true), Rule::CrashedPrimaryBoth),
    }
}

/// Compare the generations of `me` and `peer` (DRBD 8.4 rule order, see the module docs).
/// The result is from `me`'s point of view; `compare(peer, me)` gives the mirror image.
pub fn compare(me: &Side, peer: &Side) -> (Strategy, Rule) {
    let s = Masked::of(&me.gens);
    let p = Masked::of(&peer.gens);

    match (fresh(s.c), fresh(p.c)) {
        (true, true) => return (Strategy::NoSync, Rule::JustCreatedBoth),
        (true, false) => return (Strategy::TargetFullSync, Rule::JustCreatedSelf),
        (false, true) => return (Strategy::SourceFullSync, Rule::JustCreatedPeer),
        (false, false) => {}
    }
    if s.c == p.c {
        return equal_current(me, peer, &s, &p);
    }

    // Rules 50/51/60 (I am behind) and 70/71/80 (the peer is behind).
    let behind = descends(&s, &p);
    let ahead = descends(&p, &s).map(|(st, r)| (st.mirror(), r.mirror()));
    match (behind, ahead) {
        (Some(r), None) | (None, Some(r)) => return r,
        (Some(_), Some(_)) => return (Strategy::SplitBrainDisconnect, Rule::AmbiguousAncestry),
        (None, None) => {}
    }

    if s.b != 0 && s.b == p.b {
        return (Strategy::SplitBrainAutoRecover, Rule::BitmapBoth);
    }
    if s.ancestors().any(|a| p.ancestors().any(|b| a == b)) {
        return (Strategy::SplitBrainDisconnect, Rule::HistoryBoth);
    }
    (Strategy::Unrelated, Rule::Unrelated)
}

/// What settled the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedBy {
    /// The generation rule alone.
    Generations,
    /// Exactly one side was Inconsistent: the consistent side is source.
    DiskStates,
    /// A split brain resolved by a configured policy; the text names it.
    Policy(String),
    /// A split brain resolved by `--discard-my-data` on the named node (the victim).
    DiscardMyData(String),
    /// Nothing decided: unresolved split brain or a refusal.
    Nobody,
}

impl fmt::Display for DecidedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generations => f.write_str("generations"),
            Self::DiskStates => f.write_str("disk states"),
            Self::Policy(p) => write!(f, "policy {p}"),
            Self::DiscardMyData(n) => write!(f, "--discard-my-data on {n}"),
            Self::Nobody => f.write_str("nobody"),
        }
    }
}

/// Everything a verdict was based on, for logs, status and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basis {
    pub strategy: Strategy,
    pub rule: Rule,
    pub decided_by: DecidedBy,
    pub me: Side,
    pub peer: Side,
}

/// What to do with the connection, from `me`'s point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Connected, no resync.
    NoSync { basis: Basis },
    /// Resync; `full` means every block, otherwise the union of both bitmaps.
    Sync {
        direction: Direction,
        full: bool,
        basis: Basis,
    },
    /// Split brain detected and not resolved: both sides must stay disconnected.
    SplitBrain { rule: Rule, basis: Basis },
    /// Drop the connection; `reason` says why.
    Refuse { reason: String, basis: Basis },
}

impl Verdict {
    pub fn basis(&self) -> &Basis {
        match self {
            Self::NoSync { basis }
            | Self::Sync { basis, .. }
            | Self::SplitBrain { basis, .. }
            | Self::Refuse { basis, .. } => basis,
        }
    }

    /// The generations showed a split brain (resolved or not).
    pub fn split_brain_detected(&self) -> bool {
        self.basis().strategy.is_split_brain()
    }

    /// One line naming the outcome, the rule, both generation tuples (hex) and what decided.
    pub fn explain(&self) -> String {
        let b = self.basis();
        let outcome = match self {
            Self::NoSync { .. } => "no resync".to_owned(),
            Self::Sync {
                direction, full, ..
            } => format!(
                "become sync {} ({})",
                direction.as_str(),
                if *full { "full" } else { "bitmap" }
            ),
            Self::SplitBrain { .. } => "split brain detected but unresolved".to_owned(),
            Self::Refuse { reason, .. } => format!("refuse: {reason}"),
        };
        let resolved = if b.strategy.is_split_brain() && matches!(self, Self::Sync { .. }) {
            " (split brain resolved)"
        } else {
            ""
        };
        format!(
            "{outcome}{resolved}; decided by {}; uuid_compare={} ({}) by rule {}; self {}; peer {}",
            b.decided_by,
            b.strategy.name(),
            b.strategy.drbd_code(),
            b.rule,
            describe(&b.me),
            describe(&b.peer),
        )
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.explain())
    }
}

fn describe(s: &Side) -> String {
    let g = &s.gens;
    let mut flags = Vec::new();
    if s.crashed_primary {
        flags.push("crashed-primary");
    }
    if s.rolled_back {
        flags.push("rolled-back");
    }
    if s.peer_unflushed {
        flags.push("peer-unflushed");
    }
    if s.discard_my_data {
        flags.push("discard-my-data");
    }
    format!(
        "{} C:B:H0:H1 {}:{}:{}:{} role:{} disk:{} out-of-sync:{} flags:{}",
        s.node,
        hex(g.current),
        hex(g.bitmap),
        hex(g.history[0]),
        hex(g.history[1]),
        match s.role {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        },
        s.disk.as_str(),
        s.out_of_sync_bytes,
        if flags.is_empty() {
            "-".to_owned()
        } else {
            flags.join(",")
        },
    )
}

/// Decide what the connection does (DRBD 8.4 `drbd_sync_handshake` order, see module docs).
pub fn handshake(me: &Side, peer: &Side, policy: &SplitBrainPolicy) -> Verdict {
    let (strategy, rule) = compare(me, peer);
    let basis = |decided_by| Basis {
        strategy,
        rule,
        decided_by,
        me: me.clone(),
        peer: peer.clone(),
    };
    let refuse = |reason: String| Verdict::Refuse {
        reason,
        basis: basis(DecidedBy::Nobody),
    };

    if me.node == peer.node {
        return refuse(format!("the peer claims my node name {:?}", me.node));
    }
    // An Inconsistent copy holds nothing worth keeping, so the operator may have it take
    // every block even from a side it shares no generation with (a target that could not
    // record the end of several resyncs in a row falls out of the source's history).
    let discards_garbage = |s: &Side| s.discard_my_data && s.disk == DiskState::Inconsistent;
    let unrelated = strategy == Strategy::Unrelated;
    if unrelated && !(discards_garbage(me) || discards_garbage(peer)) {
        return refuse(
            "unrelated data: the two sides share no generation (an Inconsistent side can take \
             a full sync with connect --discard-my-data; tandem invalidate makes a secondary's \
             copy Inconsistent)"
                .to_owned(),
        );
    }
    if me.discard_my_data && peer.discard_my_data {
        return refuse("both sides asked to discard their data (--discard-my-data)".to_owned());
    }

    let me_bad = me.disk == DiskState::Inconsistent;
    let peer_bad = peer.disk == DiskState::Inconsistent;
    let (direction, full, decided_by) =
        if me_bad != peer_bad {
            let d = if peer_bad {
                Direction::Source
            } else {
                Direction::Target
            };
            (
                d,
                strategy.is_full() || strategy.is_split_brain() || unrelated,
                DecidedBy::DiskStates,
            )
        } else if strategy.is_split_brain() {
            match resolve_split_brain(me, peer, policy) {
                Some((d, by)) => {
                    let full = strategy == Strategy::SplitBrainDisconnect
                        || matches!(by, DecidedBy::DiscardMyData(_));
                    (d, full, by)
                }
                None => {
                    return Verdict::SplitBrain {
                        rule,
                        basis: basis(DecidedBy::Nobody),
                    }
                }
            }
        } else {
            match strategy.direction() {
                Some(d) => (d, strategy.is_full(), DecidedBy::Generations),
                // Two primaries on one link would each acknowledge writes and apply the other's.
                None if me.role == Role::Primary && peer.role == Role::Primary => return refuse(
                    "both sides are primary (same data so far); demote one with tandem secondary"
                        .to_owned(),
                ),
                None => {
                    return Verdict::NoSync {
                        basis: basis(DecidedBy::Generations),
                    }
                }
            }
        };

    // A copy that lost its page cache is made whole block by block, whichever way it goes.
    let full = full || me.rolled_back || peer.rolled_back;
    let (source, target) = match direction {
        Direction::Source => (me, peer),
        Direction::Target => (peer, me),
    };
    // Who is who, in DRBD's wording: "I shall become …, but I am …".
    let subject = |s: &Side| {
        if s.node == me.node {
            ("I".to_owned(), "I am")
        } else {
            (format!("peer {}", s.node), "it is")
        }
    };
    if source.disk == DiskState::Inconsistent {
        let (who, is) = subject(source);
        return refuse(format!(
            "{who} shall become sync source, but {is} Inconsistent"
        ));
    }
    if target.role == Role::Primary && target.disk > DiskState::Inconsistent {
        let (who, is) = subject(target);
        return refuse(format!(
            "{who} shall become sync target, but {is} primary with {} data (rr-conflict)",
            target.disk.as_str()
        ));
    }
    Verdict::Sync {
        direction,
        full,
        basis: basis(decided_by),
    }
}

/// `--discard-my-data`, then the policy for the number of primaries. `None`: unresolved.
fn resolve_split_brain(
    me: &Side,
    peer: &Side,
    policy: &SplitBrainPolicy,
) -> Option<(Direction, DecidedBy)> {
    if me.discard_my_data != peer.discard_my_data {
        let victim = if me.discard_my_data { me } else { peer };
        let d = if me.discard_my_data {
            Direction::Target
        } else {
            Direction::Source
        };
        return Some((d, DecidedBy::DiscardMyData(victim.node.clone())));
    }
    let primaries = [me, peer]
        .iter()
        .filter(|s| s.role == Role::Primary)
        .count();
    match primaries {
        0 => after_sb_0pri(me, peer, &policy.after_sb_0pri)
            .map(|(d, how)| (d, DecidedBy::Policy(format!("after-sb-0pri={how}")))),
        1 => match policy.after_sb_1pri {
            AfterSb1Pri::Disconnect => None,
            AfterSb1Pri::DiscardSecondary => {
                let d = if me.role == Role::Secondary {
                    Direction::Target
                } else {
                    Direction::Source
                };
                Some((
                    d,
                    DecidedBy::Policy("after-sb-1pri=discard-secondary".to_owned()),
                ))
            }
            AfterSb1Pri::Consensus => {
                let (d, how) = after_sb_0pri(me, peer, &policy.after_sb_0pri)?;
                let discards_secondary = (d == Direction::Target) == (me.role == Role::Secondary);
                discards_secondary.then(|| {
                    (
                        d,
                        DecidedBy::Policy(format!(
                            "after-sb-1pri=consensus with after-sb-0pri={how}"
                        )),
                    )
                })
            }
        },
        _ => match policy.after_sb_2pri {
            AfterSb2Pri::Disconnect => None,
        },
    }
}

/// The after-sb-0pri verdict for `me` and a description of how it was reached.
fn after_sb_0pri(me: &Side, peer: &Side, p: &AfterSb0Pri) -> Option<(Direction, String)> {
    match p {
        AfterSb0Pri::Disconnect => None,
        AfterSb0Pri::DiscardZeroChanges => {
            match (me.out_of_sync_bytes == 0, peer.out_of_sync_bytes == 0) {
                (true, false) => Some((Direction::Target, p.to_string())),
                (false, true) => Some((Direction::Source, p.to_string())),
                (true, true) => Some((
                    tie_break(me, peer),
                    format!("{p} (no changes on either side: by node name)"),
                )),
                (false, false) => None,
            }
        }
        AfterSb0Pri::DiscardLeastChanges => Some(least_changes(me, peer, p.to_string())),
        AfterSb0Pri::DiscardYoungerPrimary => {
            // Bit 0 of the bitmap generation: was primary when the generations split.
            let older = |s: &Side| s.gens.bitmap & PRIMARY_BIT != 0;
            match (older(me), older(peer)) {
                (false, true) => Some((Direction::Target, p.to_string())),
                (true, false) => Some((Direction::Source, p.to_string())),
                _ => Some(least_changes(
                    me,
                    peer,
                    format!("{p} (undecided: discard-least-changes)"),
                )),
            }
        }
        AfterSb0Pri::DiscardNode(name) => {
            if *name == me.node {
                Some((Direction::Target, p.to_string()))
            } else if *name == peer.node {
                Some((Direction::Source, p.to_string()))
            } else {
                None
            }
        }
    }
}

fn least_changes(me: &Side, peer: &Side, how: String) -> (Direction, String) {
    use std::cmp::Ordering::*;
    match me.out_of_sync_bytes.cmp(&peer.out_of_sync_bytes) {
        Less => (Direction::Target, how),
        Greater => (Direction::Source, how),
        Equal => (
            tie_break(me, peer),
            format!("{how} (equal changes: by node name)"),
        ),
    }
}

/// Equal generations, but out-of-sync bits on one side or both (blocks a verify found
/// different, or ranges the peer had not flushed when the link dropped): which copy wins.
/// `Err` when neither may: the link must not come up this way.
///
/// In order: two primaries never resync each other; an UpToDate copy wins over one that is
/// not (an Outdated node may hold writes nobody acknowledged, so it never overwrites an
/// UpToDate one, whoever holds the bits); the primary's copy wins (it serves it); else the
/// side with the bits (the one that sent the writes), else the first name.
pub fn leftover_direction(me: &Side, peer: &Side) -> Result<Direction, String> {
    use Direction::{Source, Target};
    if me.role == Role::Primary && peer.role == Role::Primary {
        return Err("both sides are primary".into());
    }
    let up = |s: &Side| s.disk == DiskState::UpToDate;
    let d = if up(me) != up(peer) {
        if up(me) {
            Source
        } else {
            Target
        }
    } else if me.role != peer.role {
        if me.role == Role::Primary {
            Source
        } else {
            Target
        }
    } else if (me.out_of_sync_bytes == 0) != (peer.out_of_sync_bytes == 0) {
        if me.out_of_sync_bytes > 0 {
            Source
        } else {
            Target
        }
    } else {
        tie_break(me, peer)
    };
    let source = if d == Source { me } else { peer };
    if source.disk == DiskState::Inconsistent {
        return Err(format!(
            "{} would be sync source, but it is Inconsistent",
            source.node
        ));
    }
    Ok(d)
}

/// What the link becomes once both sides know the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkPlan {
    /// Connected with nothing to resync. `proven_current`: this copy is Outdated and the
    /// peer's, with the same data, is UpToDate, so this one is current too.
    InSync {
        proven_current: bool,
    },
    /// This node resyncs in `direction`; `full`: every block, else the union of the bitmaps.
    Resync {
        direction: Direction,
        full: bool,
    },
    /// Drop the link and try again later (why).
    Retry(String),
    /// StandAlone until an operator decides.
    SplitBrain,
    Refuse(String),
}

/// The verdict of [`handshake`] applied: equal generations with leftover out-of-sync bits
/// (after a verify, or ranges the peer had not flushed when the link was lost) resync the
/// way [`leftover_direction`] says.
pub fn plan(verdict: &Verdict, me: &Side, peer: &Side) -> LinkPlan {
    match verdict {
        Verdict::NoSync { .. } if me.out_of_sync_bytes + peer.out_of_sync_bytes > 0 => {
            match leftover_direction(me, peer) {
                Ok(direction) => LinkPlan::Resync {
                    direction,
                    full: false,
                },
                Err(why) => LinkPlan::Retry(format!("leftover out-of-sync blocks, but {why}")),
            }
        }
        Verdict::NoSync { .. } => LinkPlan::InSync {
            proven_current: me.disk == DiskState::Outdated && peer.disk == DiskState::UpToDate,
        },
        Verdict::Sync {
            direction, full, ..
        } => LinkPlan::Resync {
            direction: *direction,
            full: *full,
        },
        Verdict::SplitBrain { .. } => LinkPlan::SplitBrain,
        Verdict::Refuse { reason, .. } => LinkPlan::Refuse(reason.clone()),
    }
}

/// What a connected node does with the peer's reported role and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerClaim {
    /// Nothing to do beyond recording it.
    Fine,
    /// This primary was superseded: the peer holds a newer epoch. Step down.
    Superseded(String),
    /// Both claim the primary role on one link: end the link, the handshake decides.
    TwoPrimaries(String),
}

pub fn peer_claim(me: Role, my_epoch: u64, peer: Role, peer_epoch: u64) -> PeerClaim {
    if me != Role::Primary {
        return PeerClaim::Fine;
    }
    if peer_epoch > my_epoch {
        return PeerClaim::Superseded(format!(
            "superseded: the peer holds newer epoch {peer_epoch} (mine is {my_epoch})"
        ));
    }
    if peer == Role::Primary {
        return PeerClaim::TwoPrimaries(format!(
            "both nodes claim the primary role on one link (epochs {my_epoch} and {peer_epoch})"
        ));
    }
    PeerClaim::Fine
}

/// What the sync handshake does with both sides' roles and epochs, before the generations
/// are compared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochCheck {
    /// Compare the generations.
    Proceed,
    /// This primary was superseded while away (the witness gave the peer a newer epoch):
    /// step down, then handshake again as a secondary.
    Superseded(String),
    /// The peer is a primary of an older epoch that has not noticed it was superseded: try
    /// again once it steps down, rather than refusing for good.
    PeerStale(String),
}

pub fn handshake_epochs(me: Role, my_epoch: u64, peer: Role, peer_epoch: u64) -> EpochCheck {
    if me == Role::Primary && peer_epoch > my_epoch {
        return EpochCheck::Superseded(format!(
            "the peer holds newer epoch {peer_epoch} (mine is {my_epoch})"
        ));
    }
    if me == Role::Primary && peer == Role::Primary && peer_epoch < my_epoch {
        return EpochCheck::PeerStale(format!(
            "the peer still thinks it is primary at epoch {peer_epoch} (mine is {my_epoch})"
        ));
    }
    EpochCheck::Proceed
}

/// Two connected copies that are the same and neither promotable (the precondition of
/// `reclaim_identical_copy`): nobody is primary or UpToDate, nothing is out of sync.
pub fn identical_and_stuck(me: &Side, peer: &Side) -> bool {
    nobody_promotable(me, peer).is_some()
        && me.out_of_sync_bytes == 0
        && peer.out_of_sync_bytes == 0
}

/// Connected with no primary and no UpToDate copy: nobody may be promoted without an
/// operator. Returns what to tell them.
pub fn nobody_promotable(me: &Side, peer: &Side) -> Option<String> {
    let promotable = |s: &Side| s.role == Role::Primary || s.disk == DiskState::UpToDate;
    if promotable(me) || promotable(peer) {
        return None;
    }
    Some(format!(
        "no node can take over: {} is {} and {} is {}; promote the one with the newest data \
         with tandem primary --force",
        me.node,
        me.disk.as_str(),
        peer.node,
        peer.disk.as_str()
    ))
}

/// What the witness answered to `Query`: the epoch, its holder (kept after the lease lapsed,
/// until someone else acquires or the holder releases) and the nodes marked outdated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessView {
    pub epoch: u64,
    pub holder: Option<String>,
    pub outdated: Vec<String>,
}

impl WitnessView {
    /// `node` holds the epoch (its lease may have lapsed) and is not marked outdated.
    pub fn names_holder(&self, node: &str) -> bool {
        self.holder.as_deref() == Some(node) && !self.outdated.iter().any(|n| n == node)
    }
}

/// Connected, no primary, no UpToDate copy, and the two copies are the same: equal current
/// generations and nothing out of sync on either side (e.g. a primary whose lease ran out
/// while its request outdating the peer waited at a stopped witness). May `me` call its copy
/// UpToDate again? Only the node the witness names as the holder of the epoch, and that it
/// has not marked outdated: the peer is not the holder, so every write acknowledged since
/// the peer last held an epoch was written on `me`'s copy first, and the peer's copy is the
/// same, so no newer data exists anywhere. The witness still decides the promotion that
/// follows. Returns why, or None.
pub fn reclaim_identical_copy(me: &Side, peer: &Side, w: &WitnessView) -> Option<String> {
    let stale = |d: DiskState| d == DiskState::Outdated;
    let same = me.gens.current & !PRIMARY_BIT == peer.gens.current & !PRIMARY_BIT
        && me.out_of_sync_bytes == 0
        && peer.out_of_sync_bytes == 0;
    let nobody_primary = me.role != Role::Primary && peer.role != Role::Primary;
    let holder = w.names_holder(&me.node);
    (stale(me.disk)
        && !matches!(peer.disk, DiskState::UpToDate)
        && same
        && nobody_primary
        && holder)
        .then(|| {
            format!(
                "{} holds the same data as {} ({}), nothing is out of sync, and the witness \
                 names {} the holder of epoch {}: no newer copy exists",
                me.node,
                peer.node,
                peer.disk.as_str(),
                me.node,
                w.epoch
            )
        })
}

#[cfg(test)]
mod tests {
    use super::Strategy as St;
    use super::*;
    use crate::policy::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
    use proptest::prelude::*;
    use proptest::strategy::{BoxedStrategy, Strategy};

    const JC: u64 = JUST_CREATED;
    const A: u64 = 0xA0;
    const B: u64 = 0xB0;
    const C: u64 = 0xC0;
    const H: u64 = 0x70;
    const X: u64 = 0x80;
    const P: u64 = PRIMARY_BIT;

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> Generations {
        Generations {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    /// A secondary, UpToDate, clean side with no changes.
    fn side(node: &str, gens: Generations) -> Side {
        Side::plain(node, gens, Role::Secondary, DiskState::UpToDate)
    }

    impl Side {
        fn primary(mut self) -> Self {
            self.role = Role::Primary;
            self
        }
        fn crashed(mut self) -> Self {
            self.crashed_primary = true;
            self
        }
        fn in_epoch(mut self, e: u64) -> Self {
            self.primary_epoch = e;
            self
        }
        /// It lost its link while the peer had not flushed some of its writes.
        fn unflushed_peer(mut self) -> Self {
            self.peer_unflushed = true;
            self
        }
        /// Its machine went down with it: Outdated, as `Meta::open` leaves it.
        fn rolled_back(mut self) -> Self {
            self.rolled_back = true;
            self.disk = DiskState::Outdated;
            self
        }
        fn disk(mut self, d: DiskState) -> Self {
            self.disk = d;
            self
        }
        fn changes(mut self, bytes: u64) -> Self {
            self.out_of_sync_bytes = bytes;
            self
        }
        fn discard(mut self) -> Self {
            self.discard_my_data = true;
            self
        }
    }

    fn alpha(gens: Generations) -> Side {
        side("alpha", gens)
    }
    fn beta(gens: Generations) -> Side {
        side("beta", gens)
    }

    fn policy(p0: AfterSb0Pri, p1: AfterSb1Pri) -> SplitBrainPolicy {
        SplitBrainPolicy {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
            after_sb_2pri: AfterSb2Pri::Disconnect,
        }
    }

    fn default_policy() -> SplitBrainPolicy {
        SplitBrainPolicy::default()
    }

    /// `Some((direction, full))` for a sync verdict, `None` otherwise.
    fn sync_of(v: &Verdict) -> Option<(Direction, bool)> {
        match v {
            Verdict::Sync {
                direction, full, ..
            } => Some((*direction, *full)),
            _ => None,
        }
    }

    // ---------------------------------------------------------------- the rule table

    #[test]
    fn one_case_per_rule() {
        use St::*;
        #[rustfmt::skip]
        let rows: Vec<(&str, Side, Side, St, Rule, u16)> = vec![
            ("both just created",          alpha(g(JC, 0, 0, 0)),  beta(g(JC, 0, 0, 0)),        NoSync, Rule::JustCreatedBoth, 10),
            ("zero current counts as JC",  alpha(g(0, 0, 0, 0)),   beta(g(JC, 0, 0, 0)),        NoSync, Rule::JustCreatedBoth, 10),
            ("I am just created",          alpha(g(JC, 0, 0, 0)),  beta(g(A | P, JC, 0, 0)),    TargetFullSync, Rule::JustCreatedSelf, 20),
            ("peer is just created",       alpha(g(A, 0, JC, 0)),  beta(g(JC, 0, 0, 0)),        SourceFullSync, Rule::JustCreatedPeer, 30),
            ("source missed finish",       alpha(g(A, B, H, 0)),   beta(g(A, 0, B, H)),         SourceUseBitmap, Rule::SyncSourceMissedFinish, 34),
            ("target, peer missed finish", alpha(g(A, 0, B, H)),   beta(g(A, B, H, 0)),         TargetUseBitmap, Rule::SyncTargetPeerMissedFinish, 35),
            ("source, histories differ",   alpha(g(A, B, H, 0)),   beta(g(A, 0, H, 0)),         SourceUseBitmap, Rule::SyncSourcePeerMissedFinish, 36),
            ("target, histories differ",   alpha(g(A, 0, H, 0)),   beta(g(A, B, H, 0)),         TargetUseBitmap, Rule::SyncTargetMissedFinish, 37),
            ("link hiccup",                alpha(g(A | P, 0, H, 0)).primary(), beta(g(A, 0, H, 0)), NoSync, Rule::Reconnected, 40),
            ("peer crashed, I survived",   alpha(g(A, 0, H, 0)),   beta(g(A | P, 0, H, 0)).crashed(), SourceUseBitmap, Rule::CrashedPrimarySurvivor, 40),
            ("I crashed, peer survived",   alpha(g(A | P, 0, H, 0)).crashed(), beta(g(A, 0, H, 0)), TargetUseBitmap, Rule::CrashedPrimarySurvivor, 40),
            ("both crashed, alpha first",  alpha(g(A, 0, H, 0)).crashed(), beta(g(A, 0, H, 0)).crashed(), SourceUseBitmap, Rule::CrashedPrimaryBoth, 40),
            ("both crashed, beta second",  beta(g(A, 0, H, 0)).crashed(), alpha(g(A, 0, H, 0)).crashed(), TargetUseBitmap, Rule::CrashedPrimaryBoth, 40),
            ("crashed primary is primary again", alpha(g(A | P, 0, H, 0)).crashed().primary(), beta(g(A, 0, H, 0)), SourceUseBitmap, Rule::PrimaryAfterCrash, 41),
            ("survivor promoted, peer crashed",  alpha(g(A, 0, H, 0)), beta(g(A | P, 0, H, 0)).crashed().primary(), TargetUseBitmap, Rule::PrimaryAfterCrash, 41),
            ("my machine went down",             alpha(g(A, 0, H, 0)).rolled_back(), beta(g(A, 0, H, 0)), TargetFullSync, Rule::RolledBack, 40),
            ("peer's machine went down",         alpha(g(A, 0, H, 0)), beta(g(A, 0, H, 0)).rolled_back(), SourceFullSync, Rule::RolledBack, 40),
            ("went down, peer crashed primary",  alpha(g(A, 0, H, 0)).rolled_back(), beta(g(A, 0, H, 0)).crashed(), TargetFullSync, Rule::RolledBack, 40),
            ("both went down",                   alpha(g(A, 0, H, 0)).rolled_back(), beta(g(A, 0, H, 0)).rolled_back(), SourceFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta second",      beta(g(A, 0, H, 0)).rolled_back(), alpha(g(A, 0, H, 0)).rolled_back(), TargetFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta was primary", alpha(g(A, 0, H, 0)).rolled_back(), beta(g(A, 0, H, 0)).rolled_back().crashed(), TargetFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta was primary later", alpha(g(A, 0, H, 0)).rolled_back().crashed().changes(4096), beta(g(A, 0, H, 0)).rolled_back().crashed().in_epoch(2), TargetFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta promoted later, stepped down", alpha(g(A, 0, H, 0)).rolled_back().crashed().in_epoch(1), beta(g(A, 0, H, 0)).rolled_back().in_epoch(2), TargetFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta marked",      alpha(g(A, 0, H, 0)).rolled_back(), beta(g(A, 0, H, 0)).rolled_back().changes(4096), TargetFullSync, Rule::RolledBackBoth, 40),
            ("both went down, beta kept flushes", alpha(g(A, 0, H, 0)).rolled_back().changes(4096), beta(g(A, 0, H, 0)).rolled_back().unflushed_peer(), TargetFullSync, Rule::RolledBackBoth, 40),
            ("my current is peer's bitmap",      alpha(g(A, 0, H, 0)), beta(g(B | P, A, H, 0)), TargetUseBitmap, Rule::BitmapPeer, 50),
            ("peer finished, I never adopted",   alpha(g(A, 0, H, 0)), beta(g(B, 0, A, H)),     TargetUseBitmap, Rule::SyncTargetMissedAdopt, 51),
            ("my current in peer's H1",          alpha(g(A, 0, H, 0)), beta(g(B, 0, X, A)),     TargetFullSync, Rule::HistoryPeer, 60),
            ("my current in peer's H0, H1 off",  alpha(g(A, 0, H, 0)), beta(g(B, 0, A, X)),     TargetFullSync, Rule::HistoryPeer, 60),
            ("peer's current is my bitmap",      alpha(g(B | P, A, H, 0)).primary(), beta(g(A, 0, H, 0)), SourceUseBitmap, Rule::BitmapSelf, 70),
            ("I finished, peer never adopted",   alpha(g(B, 0, A, H)), beta(g(A, 0, H, 0)),     SourceUseBitmap, Rule::SyncSourcePeerMissedAdopt, 71),
            ("peer's current in my H1",          alpha(g(B, 0, X, A)), beta(g(A, 0, H, 0)),     SourceFullSync, Rule::HistorySelf, 80),
            ("same bitmap, both wrote",          alpha(g(B | P, A | P, H, 0)), beta(g(C | P, A, H, 0)), SplitBrainAutoRecover, Rule::BitmapBoth, 90),
            ("common history only",              alpha(g(B, 0, A, H)), beta(g(C, 0, X, A)),     SplitBrainDisconnect, Rule::HistoryBoth, 100),
            ("my bitmap is peer's history",      alpha(g(B, A, 0, 0)), beta(g(C, 0, A, 0)),     SplitBrainDisconnect, Rule::HistoryBoth, 100),
            ("each other's ancestor",            alpha(g(A, B, 0, 0)), beta(g(B, A, 0, 0)),     SplitBrainDisconnect, Rule::AmbiguousAncestry, 100),
            ("nothing in common",                alpha(g(A, 0, H, 0)), beta(g(B, 0, X, 0)),     Unrelated, Rule::Unrelated, 100),
            ("JC in history is no ancestor",     alpha(g(A, 0, JC, 0)), beta(g(B, 0, JC, 0)),  Unrelated, Rule::Unrelated, 100),
        ];
        for (label, me, peer, strategy, rule, number) in rows {
            assert_eq!(compare(&me, &peer), (strategy, rule), "{label}");
            assert_eq!(
                compare(&peer, &me),
                (strategy.mirror(), rule.mirror()),
                "{label} (mirrored)"
            );
            assert_eq!(rule.number(), number, "{label}");
        }
    }

    #[test]
    fn rule_names_are_stable_and_distinct() {
        let all = [
            Rule::JustCreatedBoth,
            Rule::JustCreatedSelf,
            Rule::JustCreatedPeer,
            Rule::SyncSourceMissedFinish,
            Rule::SyncTargetPeerMissedFinish,
            Rule::SyncSourcePeerMissedFinish,
            Rule::SyncTargetMissedFinish,
            Rule::Reconnected,
            Rule::CrashedPrimarySurvivor,
            Rule::CrashedPrimaryBoth,
            Rule::PrimaryAfterCrash,
            Rule::RolledBack,
            Rule::RolledBackBoth,
            Rule::BitmapPeer,
            Rule::SyncTargetMissedAdopt,
            Rule::HistoryPeer,
            Rule::BitmapSelf,
            Rule::SyncSourcePeerMissedAdopt,
            Rule::HistorySelf,
            Rule::BitmapBoth,
            Rule::HistoryBoth,
            Rule::AmbiguousAncestry,
            Rule::Unrelated,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), all.len());
        for r in all {
            assert_eq!(r.mirror().mirror(), r);
            // A rule and its mirror are neighbours in DRBD's numbering (20/30 excepted).
            let (n, m) = (r.number(), r.mirror().number());
            assert!(
                n == m || n.abs_diff(m) == 1 || n.abs_diff(m) == 20 || n.abs_diff(m) == 10,
                "{r:?}"
            );
        }
        assert_eq!(Rule::BitmapSelf.to_string(), "bitmap-self (70)");
        assert_eq!(Rule::HistoryPeer.name(), "history-peer");
        assert_eq!(St::SplitBrainAutoRecover.drbd_code(), 100);
    }

    // ---------------------------------------------------------------- handshake

    /// Found by the simulator: a secondary whose machine lost power came back UpToDate with
    /// acknowledged writes gone from its page cache, and was chosen as the source.
    #[test]
    fn a_copy_that_lost_its_page_cache_is_resynced_whole_and_never_the_source_alone() {
        // Equal generations; the survivor crashed as primary (killed, cache kept).
        let lost = alpha(g(A, 0, H, 0)).rolled_back();
        let kept = beta(g(A, 0, H, 0)).crashed().changes(4096);
        for (me, peer, dir) in [
            (&lost, &kept, Direction::Target),
            (&kept, &lost, Direction::Source),
        ] {
            let v = handshake(me, peer, &default_policy());
            assert_eq!(sync_of(&v), Some((dir, true)), "{v}");
        }
        // Behind the peer: the bitmap would name only the peer's changes, not what the cache
        // took from this copy, so the resync is full.
        let behind = alpha(g(A, 0, H, 0)).rolled_back();
        let ahead = beta(g(B | P, A, H, 0)).primary().changes(8192);
        let v = handshake(&behind, &ahead, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, true)), "{v}");
        assert!(v.to_string().contains("rolled-back"), "{v}");
    }

    #[test]
    fn plain_directions_follow_the_generations() {
        let me = alpha(g(B | P, A, H, 0)).primary().changes(4096);
        let peer = beta(g(A, 0, H, 0));
        let v = handshake(&me, &peer, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, false)));
        assert_eq!(v.basis().decided_by, DecidedBy::Generations);
        assert_eq!(
            sync_of(&handshake(&peer, &me, &default_policy())),
            Some((Direction::Target, false))
        );

        let v = handshake(
            &alpha(g(A, 0, H, 0)),
            &beta(g(A, 0, H, 0)),
            &default_policy(),
        );
        assert!(matches!(v, Verdict::NoSync { .. }), "{v}");
    }

    #[test]
    fn disk_state_override() {
        let newer = g(B, A, H, 0);
        let older = g(A, 0, H, 0);
        // Generations say I am source (70), but I am Inconsistent: the peer is source, bitmap.
        let v = handshake(
            &alpha(newer).disk(DiskState::Inconsistent),
            &beta(older),
            &default_policy(),
        );
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");
        assert_eq!(v.basis().decided_by, DecidedBy::DiskStates);
        // Equal generations (after `invalidate`): bitmap sync towards the Inconsistent side.
        let v = handshake(
            &alpha(older),
            &beta(older).disk(DiskState::Inconsistent),
            &default_policy(),
        );
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
        // A full-sync result stays full.
        let v = handshake(
            &alpha(g(B, 0, X, A)).disk(DiskState::Inconsistent),
            &beta(older),
            &default_policy(),
        );
        assert_eq!(sync_of(&v), Some((Direction::Target, true)), "{v}");
        // A split brain with one Inconsistent side: the consistent side, full.
        for (mine, theirs) in [
            (g(B, A, H, 0), g(C, A, H, 0)),
            (g(B, 0, A, H), g(C, 0, X, A)),
        ] {
            let v = handshake(
                &alpha(mine),
                &beta(theirs).disk(DiskState::Inconsistent),
                &default_policy(),
            );
            assert_eq!(sync_of(&v), Some((Direction::Source, true)), "{v}");
            assert!(v.split_brain_detected());
        }
        // Fresh node against a populated one: full sync towards the fresh one.
        let v = handshake(
            &alpha(g(JC, 0, 0, 0)).disk(DiskState::Inconsistent),
            &beta(g(A, JC, 0, 0)).primary(),
            &default_policy(),
        );
        assert_eq!(sync_of(&v), Some((Direction::Target, true)), "{v}");
    }

    #[test]
    fn refusals() {
        let pol = default_policy();
        let refused = |v: Verdict, needle: &str| match &v {
            Verdict::Refuse { reason, .. } => {
                assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
                assert!(v.explain().contains(needle));
            }
            _ => panic!("expected a refusal with {needle:?}: {v}"),
        };
        // Both Inconsistent and the generations make me the source.
        let me = alpha(g(B, A, H, 0)).disk(DiskState::Inconsistent);
        let peer = beta(g(A, 0, H, 0)).disk(DiskState::Inconsistent);
        refused(
            handshake(&me, &peer, &pol),
            "I shall become sync source, but I am Inconsistent",
        );
        refused(
            handshake(&peer, &me, &pol),
            "peer alpha shall become sync source, but it is Inconsistent",
        );
        // rr-conflict: I am a primary with good data and would become target.
        let me = alpha(g(A | P, 0, H, 0)).primary();
        let peer = beta(g(B, A, H, 0));
        refused(handshake(&me, &peer, &pol), "rr-conflict");
        refused(
            handshake(&peer, &me, &pol),
            "peer alpha shall become sync target, but it is primary",
        );
        // Unrelated data, even if one side is Inconsistent.
        refused(
            handshake(
                &alpha(g(A, 0, H, 0)),
                &beta(g(B, 0, X, 0)).disk(DiskState::Inconsistent),
                &pol,
            ),
            "unrelated data",
        );
        // ... unless the Inconsistent side discards its data: a full sync to it.
        let v = handshake(
            &alpha(g(A, 0, H, 0)),
            &beta(g(B, 0, X, 0)).disk(DiskState::Inconsistent).discard(),
            &pol,
        );
        assert_eq!(sync_of(&v), Some((Direction::Source, true)), "{v}");
        // Not a consistent side that discards, nor a discard on the consistent side.
        refused(
            handshake(
                &alpha(g(A, 0, H, 0)).discard(),
                &beta(g(B, 0, X, 0)).disk(DiskState::Inconsistent),
                &pol,
            ),
            "unrelated data",
        );
        refused(
            handshake(&alpha(g(A, 0, H, 0)), &beta(g(B, 0, X, 0)).discard(), &pol),
            "unrelated data",
        );
        // Both asked to discard their data.
        refused(
            handshake(
                &alpha(g(B, A, H, 0)).discard(),
                &beta(g(C, A, H, 0)).discard(),
                &pol,
            ),
            "both sides asked to discard",
        );
        refused(
            handshake(&alpha(g(A, 0, 0, 0)), &alpha(g(A, 0, 0, 0)), &pol),
            "my node name",
        );
    }

    #[test]
    fn unresolved_split_brain_by_default() {
        let me = alpha(g(B | P, A | P, H, 0)).changes(4096);
        let peer = beta(g(C | P, A, H, 0)).changes(8192);
        let v = handshake(&me, &peer, &default_policy());
        assert!(
            matches!(
                v,
                Verdict::SplitBrain {
                    rule: Rule::BitmapBoth,
                    ..
                }
            ),
            "{v}"
        );
        assert!(v.split_brain_detected());
        let v = handshake(
            &alpha(g(B, 0, A, H)),
            &beta(g(C, 0, X, A)),
            &default_policy(),
        );
        assert!(
            matches!(
                v,
                Verdict::SplitBrain {
                    rule: Rule::HistoryBoth,
                    ..
                }
            ),
            "{v}"
        );
    }

    #[test]
    fn after_sb_0pri_policies() {
        let split = |me: u64, peer: u64| {
            (
                alpha(g(B, A, H, 0)).changes(me),
                beta(g(C, A, H, 0)).changes(peer),
            )
        };
        let pol0 = |p| policy(p, AfterSb1Pri::Disconnect);
        let dir = |me: &Side, peer: &Side, p: &SplitBrainPolicy| {
            let v = handshake(me, peer, p);
            let mirrored = sync_of(&handshake(peer, me, p)).map(|(d, f)| (d.mirror(), f));
            assert_eq!(sync_of(&v), mirrored, "{v}");
            if let Verdict::Sync { basis, .. } = &v {
                assert!(matches!(basis.decided_by, DecidedBy::Policy(_)), "{v}");
            }
            sync_of(&v)
        };

        let zero = pol0(AfterSb0Pri::DiscardZeroChanges);
        let (me, peer) = split(0, 4096);
        assert_eq!(dir(&me, &peer, &zero), Some((Direction::Target, false)));
        let (me, peer) = split(4096, 0);
        assert_eq!(dir(&me, &peer, &zero), Some((Direction::Source, false)));
        let (me, peer) = split(0, 0);
        assert_eq!(
            dir(&me, &peer, &zero),
            Some((Direction::Source, false)),
            "alpha wins the tie"
        );
        let (me, peer) = split(4096, 4096);
        assert_eq!(dir(&me, &peer, &zero), None);

        let least = pol0(AfterSb0Pri::DiscardLeastChanges);
        let (me, peer) = split(4096, 8192);
        assert_eq!(dir(&me, &peer, &least), Some((Direction::Target, false)));
        let (me, peer) = split(8192, 4096);
        assert_eq!(dir(&me, &peer, &least), Some((Direction::Source, false)));
        let (me, peer) = split(4096, 4096);
        assert_eq!(
            dir(&beta(me.gens), &alpha(peer.gens), &least),
            Some((Direction::Target, false))
        );

        // discard-younger-primary: bit 0 of the bitmap generation says "was primary at the split".
        let younger = pol0(AfterSb0Pri::DiscardYoungerPrimary);
        let old_primary = alpha(g(B, A | P, H, 0)).changes(4096);
        let new_primary = beta(g(C, A, H, 0)).changes(8192);
        assert_eq!(
            dir(&old_primary, &new_primary, &younger),
            Some((Direction::Source, false))
        );
        let (me, peer) = split(4096, 8192);
        assert_eq!(
            dir(&me, &peer, &younger),
            Some((Direction::Target, false)),
            "falls back to least changes"
        );

        let node = |n: &str| pol0(AfterSb0Pri::DiscardNode(n.to_owned()));
        let (me, peer) = split(4096, 8192);
        assert_eq!(
            dir(&me, &peer, &node("beta")),
            Some((Direction::Source, false))
        );
        assert_eq!(
            dir(&me, &peer, &node("alpha")),
            Some((Direction::Target, false))
        );
        assert_eq!(dir(&me, &peer, &node("gamma")), None);

        // After history-both a policy resolution is a full sync.
        let me = alpha(g(B, 0, A, H)).changes(0);
        let peer = beta(g(C, 0, X, A)).changes(4096);
        assert_eq!(dir(&me, &peer, &zero), Some((Direction::Target, true)));
    }

    #[test]
    fn after_sb_1pri_and_2pri_policies() {
        let pri = alpha(g(B | P, A | P, H, 0)).primary().changes(8192);
        let sec = beta(g(C, A, H, 0)).changes(4096);
        let check = |p: &SplitBrainPolicy, want_pri: Option<Direction>| {
            let v = handshake(&pri, &sec, p);
            assert_eq!(sync_of(&v).map(|(d, _)| d), want_pri, "{v}");
            let w = handshake(&sec, &pri, p);
            assert_eq!(
                sync_of(&w).map(|(d, _)| d),
                want_pri.map(Direction::mirror),
                "{w}"
            );
            v
        };
        check(&default_policy(), None);
        let v = check(
            &policy(AfterSb0Pri::Disconnect, AfterSb1Pri::DiscardSecondary),
            Some(Direction::Source),
        );
        assert_eq!(
            v.basis().decided_by,
            DecidedBy::Policy("after-sb-1pri=discard-secondary".into())
        );
        // Consensus: the 0pri verdict discards the secondary (it has fewer changes) → applied.
        let v = check(
            &policy(AfterSb0Pri::DiscardLeastChanges, AfterSb1Pri::Consensus),
            Some(Direction::Source),
        );
        assert!(v.explain().contains("consensus"), "{v}");
        // Consensus: the 0pri verdict would discard the primary → not applied.
        check(
            &policy(
                AfterSb0Pri::DiscardNode("alpha".into()),
                AfterSb1Pri::Consensus,
            ),
            None,
        );
        check(
            &policy(AfterSb0Pri::Disconnect, AfterSb1Pri::Consensus),
            None,
        );

        // Two primaries: only disconnect, whatever else is configured.
        let sec_pri = sec.clone().primary();
        let all = policy(
            AfterSb0Pri::DiscardLeastChanges,
            AfterSb1Pri::DiscardSecondary,
        );
        let v = handshake(&pri, &sec_pri, &all);
        assert!(matches!(v, Verdict::SplitBrain { .. }), "{v}");
    }

    #[test]
    fn discard_my_data() {
        let pol = default_policy();
        let me = alpha(g(B, A, H, 0)).changes(4096).discard();
        let peer = beta(g(C, A, H, 0)).changes(4096);
        let v = handshake(&me, &peer, &pol);
        assert_eq!(sync_of(&v), Some((Direction::Target, true)), "{v}");
        assert_eq!(
            v.basis().decided_by,
            DecidedBy::DiscardMyData("alpha".into())
        );
        assert_eq!(
            sync_of(&handshake(&peer, &me, &pol)),
            Some((Direction::Source, true))
        );
        // It beats a policy that would have gone the other way.
        let least = policy(
            AfterSb0Pri::DiscardNode("beta".into()),
            AfterSb1Pri::Disconnect,
        );
        assert_eq!(
            sync_of(&handshake(&me, &peer, &least)),
            Some((Direction::Target, true))
        );
        // history-both: full as well.
        let v = handshake(&alpha(g(B, 0, A, H)), &beta(g(C, 0, X, A)).discard(), &pol);
        assert_eq!(sync_of(&v), Some((Direction::Source, true)), "{v}");
        // A primary must demote first.
        let v = handshake(&me.clone().primary(), &peer, &pol);
        assert!(matches!(v, Verdict::Refuse { .. }), "{v}");
        // Without a split brain the generations decide and the flag does not reverse them.
        let v = handshake(&alpha(g(B, A, H, 0)).discard(), &beta(g(A, 0, H, 0)), &pol);
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
    }

    #[test]
    fn explain_names_rule_and_both_tuples() {
        let me = alpha(g(0x6A0F_0000_0000_0011, 0x1234_0000_0000_0000, H, 0))
            .primary()
            .changes(4096);
        let peer = beta(g(0x1234_0000_0000_0000, 0, H, 0)).crashed();
        let v = handshake(&me, &peer, &default_policy());
        let e = v.explain();
        for needle in [
            "become sync source (bitmap)",
            "bitmap-self (70)",
            "source-use-bitmap (1)",
            "alpha C:B:H0:H1 6A0F000000000011:1234000000000000:0000000000000070:0000000000000000",
            "beta C:B:H0:H1 1234000000000000:0000000000000000:0000000000000070:0000000000000000",
            "role:primary",
            "flags:crashed-primary",
            "decided by generations",
        ] {
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        }
        let v = handshake(
            &alpha(g(B, A, H, 0)),
            &beta(g(C, A, H, 0)),
            &default_policy(),
        );
        assert!(
            v.explain()
                .starts_with("split brain detected but unresolved"),
            "{v}"
        );
        assert!(v.explain().contains("bitmap-both (90)"), "{v}");
    }

    // ---------------------------------------------------------------- drbd.md §2.7 scenarios

    /// Both nodes after `create-md`, `primary --force` on alpha and the initial full sync, alpha
    /// still primary: what the node does, step by step.
    fn initial_sync() -> (Side, Side) {
        let mut a = alpha(Generations::just_created()).disk(DiskState::Inconsistent);
        let mut b = beta(Generations::just_created()).disk(DiskState::Inconsistent);
        let v = handshake(&a, &b, &default_policy());
        assert!(matches!(v, Verdict::NoSync { .. }), "fresh pair: {v}");
        assert_eq!(v.basis().rule, Rule::JustCreatedBoth);

        // primary --force on alpha: a new generation, alpha becomes UpToDate.
        a.gens.new_current(true);
        a.role = Role::Primary;
        a.disk = DiskState::UpToDate;
        let v = handshake(&a, &b, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, true)), "{v}");
        assert_eq!(v.basis().rule, Rule::JustCreatedPeer);
        assert_eq!(
            sync_of(&handshake(&b, &a, &default_policy())),
            Some((Direction::Target, true))
        );

        finish_resync(&mut a, &mut b);
        (a, b)
    }

    fn finish_resync(source: &mut Side, target: &mut Side) {
        source.gens.clear_bitmap();
        target.gens.adopt(&source.gens);
        source.out_of_sync_bytes = 0;
        target.out_of_sync_bytes = 0;
        // Like DRBD, the crashed-primary flag is cleared once both disks are UpToDate again.
        source.crashed_primary = false;
        target.crashed_primary = false;
        target.disk = DiskState::UpToDate;
        let v = handshake(source, target, &default_policy());
        assert!(matches!(v, Verdict::NoSync { .. }), "after the resync: {v}");
    }

    #[test]
    fn scenario_1_secondary_dies_primary_keeps_writing() {
        let (mut p, mut s) = initial_sync();
        // s dies; p's first write after losing its peer starts a new generation.
        p.gens.new_current(true);
        p.out_of_sync_bytes = 3 * 4096;
        let v = handshake(&p, &s, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::BitmapSelf);
        let v = handshake(&s, &p, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::BitmapPeer);
        finish_resync(&mut p, &mut s);
    }

    #[test]
    fn scenario_2_link_hiccup_without_writes() {
        let (p, s) = initial_sync();
        // Lazy bump: no write while disconnected, no new generation.
        let v = handshake(&p, &s, &default_policy());
        assert!(matches!(v, Verdict::NoSync { .. }), "{v}");
        assert_eq!(v.basis().rule, Rule::Reconnected);
    }

    #[test]
    fn scenario_3_primary_crashes_secondary_not_promoted() {
        let (mut p, s) = initial_sync();
        // p crashes with writes in flight and reboots: crashed primary, secondary, its flags
        // say UpToDate, its activity-log extents marked out of sync.
        p.crashed_primary = true;
        p.role = Role::Secondary;
        p.disk = DiskState::UpToDate;
        p.out_of_sync_bytes = 4 << 20;
        let v = handshake(&s, &p, &default_policy());
        assert_eq!(
            sync_of(&v),
            Some((Direction::Source, false)),
            "survivor is source: {v}"
        );
        assert_eq!(v.basis().rule, Rule::CrashedPrimarySurvivor);
        let v = handshake(&p, &s, &default_policy());
        assert_eq!(
            sync_of(&v),
            Some((Direction::Target, false)),
            "crashed primary rolls back: {v}"
        );
        assert_eq!(v.basis().rule, Rule::CrashedPrimarySurvivor);

        // The survivor was promoted in the meantime but has not written yet: still the source.
        let mut s2 = s.clone();
        s2.role = Role::Primary;
        s2.gens.set_primary(true);
        let v = handshake(&s2, &p, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::PrimaryAfterCrash);
    }

    #[test]
    fn scenario_4_failover_then_failback() {
        let (mut p, mut s) = initial_sync();
        p.crashed_primary = true;
        p.role = Role::Secondary;
        p.disk = DiskState::UpToDate;
        p.out_of_sync_bytes = 4 << 20;
        // s is promoted and writes: the first write starts a new generation.
        s.role = Role::Primary;
        s.gens.set_primary(true);
        s.gens.new_current(true);
        s.out_of_sync_bytes = 8 * 4096;
        let v = handshake(&p, &s, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::BitmapPeer);
        let v = handshake(&s, &p, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::BitmapSelf);
        finish_resync(&mut s, &mut p);
    }

    #[test]
    fn scenario_5_real_split_brain() {
        let (mut p, mut s) = initial_sync();
        // Both primary while disconnected, both write.
        p.gens.new_current(true);
        p.out_of_sync_bytes = 4096;
        s.role = Role::Primary;
        s.gens.set_primary(true);
        s.gens.new_current(true);
        s.out_of_sync_bytes = 8192;
        for (a, b) in [(&p, &s), (&s, &p)] {
            let v = handshake(a, b, &default_policy());
            assert!(
                matches!(
                    v,
                    Verdict::SplitBrain {
                        rule: Rule::BitmapBoth,
                        ..
                    }
                ),
                "{v}"
            );
        }
        // Both demote; the default policy still refuses to guess.
        for x in [&mut p, &mut s] {
            x.role = Role::Secondary;
            x.gens.set_primary(false);
        }
        let v = handshake(&p, &s, &default_policy());
        assert!(matches!(v, Verdict::SplitBrain { .. }), "{v}");
        // The operator picks s as the victim: full sync from p.
        s.discard_my_data = true;
        let v = handshake(&s, &p, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, true)), "{v}");
        assert_eq!(
            sync_of(&handshake(&p, &s, &default_policy())),
            Some((Direction::Source, true))
        );
        s.discard_my_data = false;
        s.disk = DiskState::Inconsistent;
        finish_resync(&mut p, &mut s);
    }

    #[test]
    fn scenario_6_no_false_split_brain_with_lazy_bump() {
        let (mut p, mut s) = initial_sync();
        // p loses s but writes nothing; s is promoted and writes.
        s.role = Role::Primary;
        s.gens.set_primary(true);
        s.gens.new_current(true);
        s.out_of_sync_bytes = 4096;
        // p still primary: it would have to become target → refused, no split brain.
        let v = handshake(&p, &s, &default_policy());
        assert!(matches!(v, Verdict::Refuse { .. }), "{v}");
        assert!(!v.split_brain_detected());
        assert_eq!(v.basis().rule, Rule::BitmapPeer);
        // p demotes: a bitmap resync from s.
        p.role = Role::Secondary;
        p.gens.set_primary(false);
        let v = handshake(&p, &s, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");

        // DRBD 8.4's eager bump on disconnect would give a false split brain, which
        // discard-zero-changes resolves (p has no changes), bitmap-based.
        let mut p84 = p.clone();
        p84.gens.new_current(false);
        p84.out_of_sync_bytes = 0;
        s.role = Role::Secondary;
        s.gens.set_primary(false);
        let v = handshake(&p84, &s, &default_policy());
        assert!(
            matches!(
                v,
                Verdict::SplitBrain {
                    rule: Rule::BitmapBoth,
                    ..
                }
            ),
            "{v}"
        );
        let zero = policy(AfterSb0Pri::DiscardZeroChanges, AfterSb1Pri::Disconnect);
        let v = handshake(&p84, &s, &zero);
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");
    }

    #[test]
    fn lost_finish_events_resync_by_bitmap() {
        // Source persisted the finish (clear_bitmap), the target never adopted: rules 51/71.
        let (mut p, mut s) = initial_sync();
        p.gens.new_current(true);
        let mut p_done = p.clone();
        p_done.gens.clear_bitmap();
        let s_stale = s.clone().disk(DiskState::Inconsistent);
        let v = handshake(&s_stale, &p_done, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Target, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::SyncTargetMissedAdopt);
        assert_eq!(
            handshake(&p_done, &s_stale, &default_policy()).basis().rule,
            Rule::SyncSourcePeerMissedAdopt
        );

        // Target adopted the finished source tuple, the source did not persist its finish: 34/35.
        let mut finished = p.gens;
        finished.clear_bitmap();
        s.gens.adopt(&finished);
        let v = handshake(&p, &s, &default_policy());
        assert_eq!(sync_of(&v), Some((Direction::Source, false)), "{v}");
        assert_eq!(v.basis().rule, Rule::SyncSourceMissedFinish);
        finish_resync(&mut p, &mut s);
    }

    // ---------------------------------------------------------------- properties

    const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

    fn arb_value() -> impl Strategy<Value = u64> {
        (
            prop::sample::select(vec![0u64, JC, 0x10, 0x20, 0x30, 0x40, 0x50]),
            any::<bool>(),
        )
            .prop_map(|(v, p)| if p && v != 0 { v | P } else { v })
    }

    fn arb_gens() -> BoxedStrategy<Generations> {
        (arb_value(), arb_value(), arb_value(), arb_value())
            .prop_map(|(c, b, h0, h1)| g(c, b, h0, h1))
            .boxed()
    }

    fn arb_side(gens: impl Strategy<Value = Generations>) -> impl Strategy<Value = Side> {
        (
            gens,
            any::<bool>(),
            prop::sample::select(vec![
                DiskState::Inconsistent,
                DiskState::Outdated,
                DiskState::UpToDate,
                DiskState::UpToDate,
            ]),
            any::<bool>(),
            prop::sample::select(vec![0u64, 4096, 8192]),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.15),
        )
            .prop_map(
                |(gens, pri, disk, crashed_primary, out_of_sync_bytes, discard_my_data, rb, pu)| {
                    Side {
                        gens,
                        role: if pri { Role::Primary } else { Role::Secondary },
                        disk,
                        crashed_primary,
                        // `Meta::open` sets it only on a copy without a bitmap generation, and a
                        // rolled-back copy writes nothing alone until forced (which clears it).
                        rolled_back: rb && gens.bitmap == 0,
                        peer_unflushed: pu,
                        primary_epoch: 0,
                        out_of_sync_bytes,
                        discard_my_data,
                        node: String::new(),
                    }
                },
            )
    }

    /// Two sides with distinct node names.
    fn arb_pair(
        gens: impl Strategy<Value = Generations> + Clone,
    ) -> impl Strategy<Value = (Side, Side)> {
        (arb_side(gens.clone()), arb_side(gens), 0..3usize, 1..3usize).prop_map(
            |(mut a, mut b, i, k)| {
                a.node = NAMES[i].to_owned();
                b.node = NAMES[(i + k) % 3].to_owned();
                (a, b)
            },
        )
    }

    fn arb_policy() -> impl Strategy<Value = SplitBrainPolicy> {
        let p0 = prop_oneof![
            Just(AfterSb0Pri::Disconnect),
            Just(AfterSb0Pri::DiscardZeroChanges),
            Just(AfterSb0Pri::DiscardLeastChanges),
            Just(AfterSb0Pri::DiscardYoungerPrimary),
            prop::sample::select(vec!["alpha", "beta", "gamma", "delta"])
                .prop_map(|n| AfterSb0Pri::DiscardNode(n.to_owned())),
        ];
        let p1 = prop::sample::select(vec![
            AfterSb1Pri::Disconnect,
            AfterSb1Pri::Consensus,
            AfterSb1Pri::DiscardSecondary,
        ]);
        (p0, p1).prop_map(|(p0, p1)| policy(p0, p1))
    }

    fn check_mirrored(a: &Verdict, b: &Verdict) -> Result<(), TestCaseError> {
        match (a, b) {
            (Verdict::NoSync { .. }, Verdict::NoSync { .. }) => {}
            (Verdict::Refuse { .. }, Verdict::Refuse { .. }) => {}
            (Verdict::SplitBrain { rule: r1, .. }, Verdict::SplitBrain { rule: r2, .. }) => {
                prop_assert_eq!(*r1, r2.mirror())
            }
            (
                Verdict::Sync {
                    direction: d1,
                    full: f1,
                    basis: b1,
                },
                Verdict::Sync {
                    direction: d2,
                    full: f2,
                    basis: b2,
                },
            ) => {
                prop_assert_eq!(*d1, d2.mirror());
                prop_assert_eq!(f1, f2);
                prop_assert_eq!(&b1.decided_by, &b2.decided_by);
            }
            _ => prop_assert!(false, "not mirrored:\n  {}\n  {}", a, b),
        }
        Ok(())
    }

    /// Invariants every verdict keeps, whatever the inputs.
    fn check_safe(v: &Verdict, me: &Side, peer: &Side) -> Result<(), TestCaseError> {
        let b = v.basis();
        if let Verdict::Sync {
            direction,
            full,
            basis,
        } = v
        {
            let (source, target) = match direction {
                Direction::Source => (me, peer),
                Direction::Target => (peer, me),
            };
            prop_assert_ne!(source.disk, DiskState::Inconsistent, "{}", v);
            // A copy that lost its page cache is resynced whole, either way.
            if me.rolled_back || peer.rolled_back {
                prop_assert!(*full, "{}", v);
            }
            // Between two consistent copies, one that kept its cache wins.
            if source.rolled_back
                && !target.rolled_back
                && target.disk != DiskState::Inconsistent
                && me.gens.current & !P == peer.gens.current & !P
            {
                prop_assert!(
                    false,
                    "a rolled-back copy overwrites one that is not: {}",
                    v
                );
            }
            prop_assert!(
                target.role == Role::Secondary || target.disk == DiskState::Inconsistent,
                "{}",
                v
            );
            if basis.strategy.is_split_brain() {
                match &basis.decided_by {
                    DecidedBy::Policy(_) => {
                        let rolled_back = me.rolled_back || peer.rolled_back;
                        prop_assert_eq!(
                            *full,
                            basis.strategy == St::SplitBrainDisconnect || rolled_back,
                            "{}",
                            v
                        )
                    }
                    DecidedBy::DiscardMyData(_) | DecidedBy::DiskStates => {
                        prop_assert!(*full, "{}", v)
                    }
                    _ => prop_assert!(false, "split brain resolved by nothing: {}", v),
                }
            }
        }
        if b.strategy.is_split_brain() {
            prop_assert!(!matches!(v, Verdict::NoSync { .. }), "{}", v);
        } else {
            prop_assert!(!matches!(v, Verdict::SplitBrain { .. }), "{}", v);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn compare_is_mirrored((a, b) in arb_pair(arb_gens())) {
            let (s1, r1) = compare(&a, &b);
            let (s2, r2) = compare(&b, &a);
            prop_assert_eq!(s1, s2.mirror());
            prop_assert_eq!(r1, r2.mirror());
        }

        #[test]
        fn handshake_is_mirrored_and_safe((a, b) in arb_pair(arb_gens()), pol in arb_policy()) {
            let va = handshake(&a, &b, &pol);
            let vb = handshake(&b, &a, &pol);
            check_mirrored(&va, &vb)?;
            check_safe(&va, &a, &b)?;
            check_safe(&vb, &b, &a)?;
        }

        #[test]
        fn equal_current_never_split_brain(
            (a, mut b) in arb_pair(arb_gens()),
            bit in any::<bool>(),
            pol in arb_policy(),
        ) {
            b.gens.current = (a.gens.current & !P) | if bit { P } else { 0 };
            let (st, _) = compare(&a, &b);
            prop_assert!(!st.is_split_brain() && st != St::Unrelated);
            let v = handshake(&a, &b, &pol);
            prop_assert!(!v.split_brain_detected(), "{}", v);
            prop_assert!(!matches!(v, Verdict::SplitBrain { .. }), "{}", v);
        }

        /// Both sides start a new generation (or several) from one common tuple, the way a node
        /// does on its first write while disconnected: never a silent loss.
        #[test]
        fn diverged_sides_are_split_brain(
            common in (
                prop::sample::select(vec![JC, 0x10, 0x20, 0x30]),
                arb_value(),
                arb_value(),
                any::<bool>(),
            ).prop_map(|(c, h0, h1, pri)| g(if pri { c | P } else { c }, 0, h0, h1)),
            writes_a in prop::collection::vec(any::<bool>(), 1..4),
            writes_b in prop::collection::vec(any::<bool>(), 1..4),
            (mut a, mut b) in arb_pair(Just(Generations::default())),
            pol in arb_policy(),
        ) {
            a.gens = common;
            b.gens = common;
            for pri in writes_a {
                a.gens.new_current(pri);
            }
            for pri in writes_b {
                b.gens.new_current(pri);
            }
            let (st, rule) = compare(&a, &b);
            prop_assert_eq!((st, rule), (St::SplitBrainAutoRecover, Rule::BitmapBoth));

            let v = handshake(&a, &b, &pol);
            check_safe(&v, &a, &b)?;
            match &v {
                Verdict::SplitBrain { .. } | Verdict::Refuse { .. } => {}
                Verdict::NoSync { .. } => prop_assert!(false, "silent no-sync: {}", v),
                Verdict::Sync { basis, .. } => prop_assert!(
                    matches!(
                        basis.decided_by,
                        DecidedBy::Policy(_) | DecidedBy::DiscardMyData(_) | DecidedBy::DiskStates
                    ),
                    "{}",
                    v
                ),
            }

            // Without a policy, a discard flag or an Inconsistent side: always reported.
            for s in [&mut a, &mut b] {
                s.discard_my_data = false;
                if s.disk == DiskState::Inconsistent {
                    s.disk = DiskState::Outdated;
                }
            }
            let v = handshake(&a, &b, &default_policy());
            prop_assert!(matches!(v, Verdict::SplitBrain { rule: Rule::BitmapBoth, .. }), "{}", v);
        }
    }

    #[test]
    fn leftover_bits_never_let_an_outdated_copy_overwrite_an_up_to_date_one() {
        let gens = g(A, 0, H, 0);
        // The superseded primary (Outdated, with the ranges its peer had not flushed) meets
        // the node that took over (UpToDate, no bits): the UpToDate copy is the source.
        let old = alpha(gens).disk(DiskState::Outdated).changes(12 << 20);
        let new = beta(gens);
        assert_eq!(leftover_direction(&old, &new), Ok(Direction::Target));
        assert_eq!(leftover_direction(&new, &old), Ok(Direction::Source));
        // Both UpToDate: the side with the bits sends them.
        let sender = alpha(gens).changes(4096);
        assert_eq!(leftover_direction(&sender, &new), Ok(Direction::Source));
        assert_eq!(leftover_direction(&new, &sender), Ok(Direction::Target));
    }

    #[test]
    fn leftover_bits_follow_the_primary_and_refuse_two() {
        let gens = g(A, 0, H, 0);
        let p = alpha(gens).primary();
        let s = beta(gens).changes(4096);
        assert_eq!(leftover_direction(&p, &s), Ok(Direction::Source));
        assert_eq!(leftover_direction(&s, &p), Ok(Direction::Target));
        let p2 = beta(gens).primary().changes(4096);
        assert!(leftover_direction(&p, &p2).is_err());
        assert!(leftover_direction(&p2, &p).is_err());
    }

    #[test]
    fn leftover_bits_never_make_an_inconsistent_source() {
        let gens = g(A, 0, H, 0);
        let a = alpha(gens).disk(DiskState::Inconsistent).changes(4096);
        let b = beta(gens).disk(DiskState::Inconsistent);
        assert!(leftover_direction(&a, &b).is_err());
    }

    #[test]
    fn no_promotable_node_is_reported() {
        let gens = g(A, 0, H, 0);
        let a = alpha(gens).disk(DiskState::Outdated);
        let b = beta(gens).disk(DiskState::Outdated);
        let why = nobody_promotable(&a, &b).unwrap();
        assert!(
            why.contains("alpha is Outdated") && why.contains("--force"),
            "{why}"
        );
        assert_eq!(nobody_promotable(&a, &beta(gens)), None);
        assert_eq!(nobody_promotable(&a, &b.clone().primary()), None);
    }

    proptest! {
        #[test]
        fn leftover_direction_is_mirrored(
            (a, b) in arb_pair(arb_gens()),
        ) {
            let (x, y) = (leftover_direction(&a, &b), leftover_direction(&b, &a));
            if x == Ok(Direction::Source) && b.disk == DiskState::UpToDate {
                prop_assert_eq!(a.disk, DiskState::UpToDate);
            }
            match (x, y) {
                (Ok(d), Ok(e)) => prop_assert_eq!(d, e.mirror()),
                (Err(_), Err(_)) => {}
                (x, y) => prop_assert!(false, "{:?} vs {:?}", x, y),
            }
        }
    }

    #[test]
    fn a_primary_steps_down_for_a_newer_epoch_and_never_shares_a_link_with_another() {
        use Role::{Primary as P, Secondary as S};
        assert!(matches!(peer_claim(P, 1, P, 2), PeerClaim::Superseded(_)));
        assert!(matches!(peer_claim(P, 1, S, 2), PeerClaim::Superseded(_)));
        assert!(matches!(peer_claim(P, 2, P, 2), PeerClaim::TwoPrimaries(_)));
        assert!(matches!(peer_claim(P, 2, P, 1), PeerClaim::TwoPrimaries(_)));
        assert_eq!(peer_claim(P, 2, S, 2), PeerClaim::Fine);
        assert_eq!(peer_claim(S, 1, P, 2), PeerClaim::Fine);
        assert_eq!(peer_claim(S, 3, P, 2), PeerClaim::Fine);
    }

    proptest! {
        /// Two primaries of different epochs never get past the epoch check, the older of
        /// them steps down, and both sides agree on which one that is.
        #[test]
        fn the_handshake_lets_no_older_primary_through(
            a_primary: bool, b_primary: bool, ea in 0u64..4, eb in 0u64..4,
        ) {
            let role = |p| if p { Role::Primary } else { Role::Secondary };
            let (ra, rb) = (role(a_primary), role(b_primary));
            let x = handshake_epochs(ra, ea, rb, eb);
            let y = handshake_epochs(rb, eb, ra, ea);
            if a_primary && b_primary && ea != eb {
                // Neither side goes on to compare generations.
                prop_assert!(x != EpochCheck::Proceed && y != EpochCheck::Proceed);
                let older_steps_down = if ea < eb { &x } else { &y };
                prop_assert!(matches!(older_steps_down, EpochCheck::Superseded(_)));
            }
            if a_primary && eb > ea {
                prop_assert!(matches!(x, EpochCheck::Superseded(_)));
            }
            // Nothing else is held up: a secondary always proceeds.
            if !a_primary {
                prop_assert_eq!(x, EpochCheck::Proceed);
            }
        }
    }

    #[test]
    fn two_primaries_with_the_same_data_are_refused_not_connected() {
        let gens = g(A, 0, H, 0);
        let v = handshake(
            &alpha(gens).primary(),
            &beta(gens).primary(),
            &default_policy(),
        );
        assert!(matches!(v, Verdict::Refuse { .. }), "{v:?}");
    }

    fn view(holder: Option<&str>, outdated: &[&str]) -> WitnessView {
        WitnessView {
            epoch: 3,
            holder: holder.map(str::to_owned),
            outdated: outdated.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn only_the_witness_holder_reclaims_an_identical_outdated_copy() {
        let gens = g(A, 0, H, 0);
        let a = alpha(gens).disk(DiskState::Outdated);
        let b = beta(gens).disk(DiskState::Outdated);
        let w = view(Some("alpha"), &["beta"]);
        assert!(reclaim_identical_copy(&a, &b, &w).is_some());
        assert_eq!(reclaim_identical_copy(&b, &a, &w), None);
        // The primary bit does not make copies differ.
        let ap = alpha(g(A | P, 0, H, 0)).disk(DiskState::Outdated);
        assert!(reclaim_identical_copy(&ap, &b, &w).is_some());
        // Not the same data, or someone could still write, or already promotable.
        assert_eq!(
            reclaim_identical_copy(&a.clone().changes(4096), &b, &w),
            None
        );
        assert_eq!(
            reclaim_identical_copy(&a, &b.clone().changes(4096), &w),
            None
        );
        let newer = alpha(g(B, A, H, 0)).disk(DiskState::Outdated);
        assert_eq!(reclaim_identical_copy(&newer, &b, &w), None);
        assert_eq!(reclaim_identical_copy(&a, &b.clone().primary(), &w), None);
        assert_eq!(reclaim_identical_copy(&a, &beta(gens), &w), None);
        let inconsistent = alpha(gens).disk(DiskState::Inconsistent);
        assert_eq!(reclaim_identical_copy(&inconsistent, &b, &w), None);
        // The witness must name this node, and not as outdated.
        assert_eq!(reclaim_identical_copy(&a, &b, &view(None, &[])), None);
        assert_eq!(
            reclaim_identical_copy(&a, &b, &view(Some("beta"), &[])),
            None
        );
        assert_eq!(
            reclaim_identical_copy(&a, &b, &view(Some("alpha"), &["alpha"])),
            None
        );
    }

    proptest! {
        #[test]
        fn at_most_one_side_reclaims_and_never_a_differing_copy(
            (a, b) in arb_pair(arb_gens()),
            holder in prop::option::of(prop::sample::select(vec!["alpha", "beta", "gamma"])),
            marked in prop::sample::subsequence(vec!["alpha", "beta"], 0..=2),
        ) {
            let w = view(holder, &marked);
            let (x, y) = (reclaim_identical_copy(&a, &b, &w), reclaim_identical_copy(&b, &a, &w));
            prop_assert!(x.is_none() || y.is_none());
            if x.is_some() {
                prop_assert_eq!(a.out_of_sync_bytes + b.out_of_sync_bytes, 0);
                prop_assert_eq!(a.gens.current & !PRIMARY_BIT, b.gens.current & !PRIMARY_BIT);
                prop_assert!(nobody_promotable(&a, &b).is_some());
            }
        }
    }

    #[test]
    fn the_plan_resyncs_leftover_bits_and_proves_an_outdated_twin_current() {
        let same = g(A, 0, 0, 0);
        let d = SplitBrainPolicy::default();
        let plan_of = |me: Side, peer: Side| plan(&handshake(&me, &peer, &d), &me, &peer);
        // Same data, the peer UpToDate: this Outdated copy is current.
        assert_eq!(
            plan_of(alpha(same).disk(DiskState::Outdated), beta(same)),
            LinkPlan::InSync {
                proven_current: true
            }
        );
        assert_eq!(
            plan_of(alpha(same), beta(same)),
            LinkPlan::InSync {
                proven_current: false
            }
        );
        // Leftover bits: the UpToDate copy is the source, whoever holds them.
        assert_eq!(
            plan_of(
                alpha(same).disk(DiskState::Outdated).changes(4096),
                beta(same)
            ),
            LinkPlan::Resync {
                direction: Direction::Target,
                full: false
            }
        );
        // Two primaries never resync each other.
        assert!(matches!(
            plan_of(alpha(same).primary().changes(4096), beta(same).primary()),
            LinkPlan::Retry(_) | LinkPlan::Refuse(_)
        ));
    }
}
