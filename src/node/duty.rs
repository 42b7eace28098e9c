//! A node's standing business with the witness (or the fence handler) as one state machine:
//! fencing the peer a primary lost, keeping the lease, asking after a lapsed lease whether
//! anybody took over, lifting the peer's outdated mark once it is in sync again, taking
//! over from a primary that disappeared, an operator's `tandem primary [--force]`, and
//! settling two identical copies that nobody may promote. One promotion at a time: an
//! operator's request while another is under way is refused.
//!
//! `Duty::apply` takes one event and the node's `State`, changes the state with plain
//! synchronous code and returns what must happen next as effects: questions to the witness,
//! timers, and records that need the metadata. It does no IO and never waits. The node's
//! driver task (`failover::run_duty`) and the simulator (`sim/`) both run it, so the
//! simulator checks these decisions as the node makes them.

use std::time::{Duration, Instant};

use super::core::State;
use super::decide::{identical_and_stuck, reclaim_identical_copy, Side, WitnessView};
use super::rules::{
    acquire_outcome, lease_lapse, lease_until, witness_verdict, Acquire, Fence, WitnessVerdict,
};
use super::{DiskState, Role};
use crate::config::Fencing;
use crate::fence::handler::HandlerDecision;
use crate::witness::proto::{Reply, Request};

/// What a question to the witness is for; its answer comes back with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Outdate the peer this primary lost, for `epoch`.
    Outdate { epoch: u64 },
    /// Renew the lease of `epoch`.
    Renew { epoch: u64 },
    /// Lift the peer's mark: it is in sync on link `link`.
    InSync { epoch: u64, link: u64 },
    /// After a lapsed lease: does the witness still name this node the holder of `epoch`?
    Lapse { epoch: u64 },
    /// Two identical copies, neither promotable: may this one be called UpToDate again?
    Settle,
    /// Take over: the epoch after `have_epoch`, outdating the peer unless it is `in_sync`.
    Acquire {
        have_epoch: u64,
        lease_ms: u64,
        in_sync: bool,
        force: bool,
    },
}

impl Ask {
    /// The request that asks it; `peer` is the peer's node name.
    pub fn request(&self, peer: &str) -> Request {
        match *self {
            Ask::Outdate { epoch } => Request::Outdate {
                epoch,
                peer: peer.into(),
            },
            Ask::Renew { epoch } => Request::Renew { epoch },
            Ask::InSync { epoch, .. } => Request::InSync {
                epoch,
                peer: peer.into(),
            },
            Ask::Lapse { .. } | Ask::Settle => Request::Query,
            Ask::Acquire {
                have_epoch,
                lease_ms,
                in_sync,
                force,
            } => Request::Acquire {
                have_epoch,
                lease_ms,
                outdate_peer: (!in_sync).then(|| peer.into()),
                force,
            },
        }
    }
}

/// A timer the machine set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tick {
    /// Try fencing the peer again.
    Fence,
    /// Renew the lease of `epoch` (or give up the role if it ran out).
    Lease { epoch: u64 },
    /// Ask again: the witness was out of reach.
    Again(Ask),
    /// Try taking over again.
    TakeOver,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// This primary lost its peer and must fence it (`rules::OnLinkLost::FencePeer`).
    FencePeer,
    /// Promoted in `epoch` with witness fencing: keep the lease.
    Promoted { epoch: u64 },
    /// The peer is connected and UpToDate on link `link`.
    PeerInSync { link: u64 },
    /// A timer fired.
    Tick(Tick),
    /// The witness answered `ask`, sent at `sent` (this node's clock), or could not be asked.
    Answer {
        ask: Ask,
        sent: Instant,
        reply: Result<Reply, String>,
    },
    /// The fence handler's verdict (`Effect::RunHandler`).
    Handler {
        takeover: bool,
        verdict: HandlerDecision,
    },
    /// Take over from a primary that disappeared (or take back a role nobody took over).
    TakeOver,
    /// The operator's `tandem primary [--force]`; answered with `Effect::Reply` (or by the
    /// `BecomePrimary` it leads to) under the same `id`.
    Promote { id: u64, force: bool },
    /// `Effect::HoldLinks` could not hold them: a link to a primary is up.
    LinksNotHeld,
    /// `Effect::BecomePrimary` has run (whether or not the role could be recorded).
    PromotionEnded,
    /// A handshake or resync ended, or the peer's state changed: if the two copies are the
    /// same and nobody may promote, ask the witness whether this one is current.
    Settle,
}

/// What the node knows besides its `State` when an event is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub now: Instant,
    /// The epoch in the metadata.
    pub epoch: u64,
    /// The live link's id.
    pub link: Option<u64>,
    /// Connected (no resync) and the peer reported UpToDate.
    pub peer_connected_in_sync: bool,
    /// The metadata's `peer_outdated` flag.
    pub peer_outdated: bool,
    /// A link is up and the peer on it reported the primary role.
    pub peer_primary: bool,
    /// This side and the peer's, while connected without a resync.
    pub pair: Option<(Side, Side)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Ask the witness; the answer comes back as `Event::Answer`. `limit`: give up after it
    /// (`None`: the witness client's own timeout).
    Ask {
        ask: Ask,
        sent: Instant,
        limit: Option<Duration>,
    },
    /// Run the fence handler; its verdict comes back as `Event::Handler` with the same
    /// `takeover` (false: fencing the lost peer; true: taking over from it).
    RunHandler {
        takeover: bool,
    },
    /// No link may come up until `ReleaseLinks` or the end of `BecomePrimary`: one that came
    /// up during the witness's round trip would carry the old primary's writes to a node
    /// about to accept its own. If a link to a primary is up already, the driver runs none
    /// of the effects after this one and applies `Event::LinksNotHeld`.
    HoldLinks,
    ReleaseLinks,
    /// Take the primary role (persisted first); `Event::PromotionEnded` follows.
    /// `peer_fenced`: the fencing that granted the role fenced the peer too. `new_data`: the
    /// copy was not UpToDate and becomes the reference (flushed, then a new generation, and
    /// the link is dropped so the peer becomes its sync target). `reply`: an operator's
    /// request, answered with the outcome; `None`: a takeover, whose links are released
    /// once the role is taken.
    BecomePrimary {
        epoch: Option<u64>,
        why: String,
        peer_fenced: bool,
        forced: bool,
        new_data: bool,
        reply: Option<u64>,
    },
    /// Answer an operator's request: nothing to do.
    Reply {
        id: u64,
        text: String,
    },
    /// Refuse an operator's request.
    Refuse {
        id: u64,
        why: String,
    },
    /// Call this copy Outdated (persisted): it will not promote automatically.
    OutdateMyself(String),
    /// What status shows about an automatic takeover (`None`: nothing to say).
    Note(Option<String>),
    /// This copy, identical to the peer's, is current (`reclaim_identical_copy`): call it
    /// UpToDate, take the role back like a node that lost it, and drop the link so the next
    /// handshake lifts the peer too.
    Reclaim {
        why: String,
    },
    /// Deliver `Event::Tick` after the delay.
    After(Duration, Tick),
    /// Persist the peer's outdated mark.
    RecordPeerOutdated,
    /// The witness lifted the peer's mark: lift the metadata's too, if still primary.
    PeerMarkLifted,
    /// Give up the primary role (`stale`: and call this copy Outdated); then, if `lapsed`,
    /// record that the lease of that epoch lapsed (`State::lapsed_in`), which only a lapse
    /// sets and anything else that outdates the copy clears.
    StepDown {
        why: String,
        stale: bool,
        lapsed: Option<u64>,
    },
    /// This copy is UpToDate again (persist it, unless it changed meanwhile).
    UpToDateAgain {
        why: String,
    },
    /// The fence state changed to this (already in `State`): wake held writes, tell others.
    Fenced(Fence),
    /// The lease became valid again: wake writes held for it.
    Changed,
    /// Worth a line in the log.
    Log(String),
}

/// The machine. Besides the node's `State` it keeps only what is under way.
#[derive(Debug)]
pub struct Duty {
    me: String,
    peer: String,
    fencing: Fencing,
    lease: Duration,
    retry: Duration,
    /// Fencing the peer is under way for this epoch.
    fencing_for: Option<u64>,
    /// The epoch whose lease is kept.
    keeping: Option<u64>,
    /// A promotion under way.
    promoting: Option<Promotion>,
}

/// A promotion under way: a takeover (links held) or an operator's request `reply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promotion {
    reply: Option<u64>,
    force: bool,
    /// The copy's state when it was asked for.
    disk: DiskState,
}

/// Below this, a renewal without the peer is not worth sending.
const LEAST_RENEWAL: Duration = Duration::from_millis(50);

impl Duty {
    pub fn new(me: &str, peer: &str, fencing: Fencing, lease: Duration, retry: Duration) -> Self {
        Duty {
            me: me.into(),
            peer: peer.into(),
            fencing,
            lease,
            retry,
            fencing_for: None,
            keeping: None,
            promoting: None,
        }
    }

    /// A promotion is under way.
    pub fn promoting(&self) -> bool {
        self.promoting.is_some()
    }

    /// Fencing the peer is under way.
    pub fn fencing(&self) -> bool {
        self.fencing_for.is_some()
    }

    pub fn apply(&mut self, st: &mut State, v: &View, ev: Event) -> Vec<Effect> {
        let mut out = Vec::new();
        match ev {
            Event::FencePeer => {
                // A round under way goes on, for the current epoch.
                if self.fencing_for.replace(v.epoch).is_none() {
                    self.fence_step(st, v, &mut out);
                }
            }
            Event::Tick(Tick::Fence) => {
                if self.fencing_for.is_some() {
                    self.fence_step(st, v, &mut out);
                }
            }
            Event::Promoted { epoch } => {
                if self.fencing == Fencing::Witness && self.keeping != Some(epoch) {
                    self.keeping = Some(epoch);
                    self.next_renewal(st, v, epoch, &mut out);
                }
            }
            Event::Tick(Tick::Lease { epoch }) => self.renew(st, v, epoch, &mut out),
            Event::PeerInSync { link } => self.peer_in_sync(st, v, link, &mut out),
            Event::Tick(Tick::Again(ask)) => self.ask_again(st, v, ask, &mut out),
            Event::Answer { ask, sent, reply } => self.answer(st, v, ask, sent, reply, &mut out),
            Event::Handler {
                takeover: true,
                verdict,
            } => self.takeover_verdict(st, v, verdict, &mut out),
            Event::Handler { verdict, .. } => self.handler_verdict(st, v, verdict, &mut out),
            Event::TakeOver | Event::Tick(Tick::TakeOver) => self.take_over(st, v, &mut out),
            Event::Promote { id, force } => self.promote(st, v, id, force, &mut out),
            Event::LinksNotHeld => {
                self.promoting = None;
                out.push(Effect::Note(None));
            }
            Event::PromotionEnded => self.promoting = None,
            Event::Settle => self.ask_again(st, v, Ask::Settle, &mut out),
        }
        out
    }

    /// The two sides, if they are connected, the same, and neither promotable.
    fn stuck_pair(v: &View) -> Option<&(Side, Side)> {
        v.pair
            .as_ref()
            .filter(|(me, peer)| identical_and_stuck(me, peer))
    }

    /// A secondary whose primary disappeared asks for the next epoch (or runs the handler)
    /// until promoted, refused for good, or the primary is back.
    fn take_over(&mut self, st: &mut State, v: &View, out: &mut Vec<Effect>) {
        if self.promoting.is_some() {
            return;
        }
        if st.role() == Role::Primary || v.peer_primary {
            out.push(Effect::Note(None));
            return;
        }
        if st.disk() != DiskState::UpToDate {
            let why = format!("not promoting: disk is {}", st.disk().as_str());
            out.push(Effect::Note(Some(why)));
            return;
        }
        if self.fencing == Fencing::None {
            return;
        }
        self.promoting = Some(Promotion {
            reply: None,
            force: false,
            disk: st.disk(),
        });
        out.push(Effect::HoldLinks);
        match self.fencing {
            Fencing::Witness => self.acquire(v, false, out),
            // The old primary is back as a secondary: nothing to fence.
            Fencing::Handler if v.link.is_some() => self.grant(
                st,
                v,
                None,
                format!("{} stepped down", self.peer),
                false,
                out,
            ),
            _ => out.push(Effect::RunHandler { takeover: true }),
        }
    }

    /// `tandem primary [--force]`: fencing first (the witness's epoch, or the handler's
    /// proof); nothing changes locally if it refuses.
    fn promote(&mut self, st: &mut State, v: &View, id: u64, force: bool, out: &mut Vec<Effect>) {
        let refuse = |why: String, out: &mut Vec<Effect>| out.push(Effect::Refuse { id, why });
        if self.promoting.is_some() {
            return refuse("another promotion is under way; try again".into(), out);
        }
        if st.role() == Role::Primary {
            return out.push(Effect::Reply {
                id,
                text: "already primary".into(),
            });
        }
        if v.peer_primary {
            let p = &self.peer;
            return refuse(
                format!("peer {p} is primary; demote it first (tandem secondary on {p})"),
                out,
            );
        }
        if st.disk() != DiskState::UpToDate && !force {
            let why = format!(
                "disk is {}; promoting would serve data that may be stale (use --force to \
                 override)",
                st.disk().as_str()
            );
            return refuse(why, out);
        }
        self.promoting = Some(Promotion {
            reply: Some(id),
            force,
            disk: st.disk(),
        });
        match self.fencing {
            Fencing::Witness => self.acquire(v, force, out),
            Fencing::Handler if v.link.is_none() => out.push(Effect::RunHandler { takeover: true }),
            Fencing::None if force && v.link.is_none() => self.grant(
                st,
                v,
                None,
                "forced, peer not connected: its data is not known to be outdated".into(),
                true,
                out,
            ),
            // Linked (a link lost later is fenced as a primary's), or no fencing at all.
            _ => self.grant(
                st,
                v,
                None,
                "operator request".into(),
                self.fencing == Fencing::None,
                out,
            ),
        }
    }

    fn acquire(&self, v: &View, force: bool, out: &mut Vec<Effect>) {
        let ask = Ask::Acquire {
            have_epoch: v.epoch,
            lease_ms: self.lease.as_millis() as u64,
            in_sync: v.peer_connected_in_sync,
            force,
        };
        self.ask(v, ask, None, out);
    }

    /// Fencing allowed the promotion under way: take the role, if the copy is still what it
    /// was when the promotion was asked for. A handshake that ended during the witness's
    /// round trip may have made it a sync target, or the peer a primary; taking the role then
    /// made an Inconsistent copy primary without making it the reference (the simulator,
    /// seed 11981, once it ran this code instead of its own copy).
    fn grant(
        &mut self,
        st: &mut State,
        v: &View,
        epoch: Option<u64>,
        why: String,
        peer_fenced: bool,
        out: &mut Vec<Effect>,
    ) {
        let Some(p) = self.promoting else {
            return;
        };
        let changed = st.disk() != p.disk || v.peer_primary;
        if changed && !crate::mutation::active(crate::mutation::Mutation::PromotionRecheck) {
            st.lease_dropped();
            let now = if v.peer_primary {
                format!("{} is primary now", self.peer)
            } else {
                format!("the disk is {} now", st.disk().as_str())
            };
            let why = format!("not promoted: the copy changed during the promotion ({now})");
            return self.not_promoted(why, Some(self.retry), out);
        }
        let new_data = p.disk != DiskState::UpToDate;
        let why = if new_data {
            format!("{why} (forced: disk was {})", p.disk.as_str())
        } else {
            why
        };
        out.push(Effect::BecomePrimary {
            epoch,
            why,
            peer_fenced,
            forced: p.force,
            new_data,
            reply: p.reply,
        });
    }

    /// The promotion under way did not happen. An operator's request is refused; a takeover
    /// releases the links, says why in the status and may try again later.
    fn not_promoted(&mut self, why: String, retry: Option<Duration>, out: &mut Vec<Effect>) {
        match self.promoting.take().and_then(|p| p.reply) {
            Some(id) => out.push(Effect::Refuse { id, why }),
            None => self.takeover_failed(why, retry, out),
        }
    }

    /// The end of one attempt that did not promote: links come back, and maybe a retry.
    fn takeover_failed(&mut self, note: String, retry: Option<Duration>, out: &mut Vec<Effect>) {
        self.promoting = None;
        out.push(Effect::ReleaseLinks);
        out.push(Effect::Note(Some(note)));
        if let Some(d) = retry {
            out.push(Effect::After(d, Tick::TakeOver));
        }
    }

    fn takeover_verdict(
        &mut self,
        st: &mut State,
        v: &View,
        d: HandlerDecision,
        out: &mut Vec<Effect>,
    ) {
        let Some(p) = self.promoting else {
            return;
        };
        let operator = p.reply.is_some();
        match d {
            HandlerDecision::PeerFenced(why) => {
                out.push(Effect::RecordPeerOutdated);
                self.grant(st, v, None, why, true, out);
            }
            HandlerDecision::OutdateMyself(why) => {
                out.push(Effect::OutdateMyself(why.clone()));
                let why = if operator {
                    why
                } else {
                    format!("not promoting: {why}")
                };
                self.not_promoted(why, None, out);
            }
            HandlerDecision::Hold(why) if p.force => self.grant(
                st,
                v,
                None,
                format!("forced although the peer is not fenced: {why}"),
                true,
                out,
            ),
            HandlerDecision::Hold(why) if operator => self.not_promoted(
                format!("the peer is not proven outdated: {why} (use --force to override)"),
                None,
                out,
            ),
            HandlerDecision::Hold(why) => {
                self.not_promoted(format!("not promoting: {why}"), Some(self.retry), out)
            }
        }
    }

    fn acquire_answer(
        &mut self,
        st: &mut State,
        v: &View,
        in_sync: bool,
        sent: Instant,
        reply: Result<Reply, String>,
        out: &mut Vec<Effect>,
    ) {
        let Some(p) = self.promoting else {
            return;
        };
        let outcome = reply
            .map_err(Acquire::Unreachable)
            .and_then(|r| acquire_outcome(r, self.lease));
        if p.reply.is_some() {
            return match outcome {
                Ok(epoch) => {
                    self.renewed(st, v, sent, out);
                    if !in_sync {
                        out.push(Effect::RecordPeerOutdated);
                    }
                    let why = format!("operator request; the witness granted epoch {epoch}");
                    self.grant(st, v, Some(epoch), why, !in_sync, out);
                }
                Err(Acquire::Outdated(why) | Acquire::Wait(why, _)) => {
                    self.not_promoted(format!("the witness refused: {why}"), None, out)
                }
                Err(Acquire::Unreachable(why)) => self.not_promoted(
                    format!(
                        "cannot reach the witness ({why}); promotion needs it (fencing = \"witness\")"
                    ),
                    None,
                    out,
                ),
            };
        }
        match outcome {
            Ok(epoch) => {
                self.renewed(st, v, sent, out);
                if !in_sync {
                    out.push(Effect::RecordPeerOutdated);
                }
                let why = format!("{} was lost; the witness granted epoch {epoch}", self.peer);
                self.grant(st, v, Some(epoch), why, !in_sync, out);
            }
            Err(Acquire::Outdated(why)) => {
                // Connected, the handshake (or resync) already made this copy what the peer
                // has; only a lost peer leaves it possibly stale.
                if v.link.is_none() {
                    out.push(Effect::OutdateMyself(why.clone()));
                }
                self.takeover_failed(format!("not promoting: {why}"), None, out);
            }
            // Ask again the moment the old lease may be taken over.
            Err(Acquire::Wait(why, until)) => {
                let retry = until.map_or(self.retry, |d| d + Duration::from_millis(2));
                self.takeover_failed(format!("waiting to promote: {why}"), Some(retry), out);
            }
            Err(Acquire::Unreachable(why)) => self.takeover_failed(
                format!("not promoting: witness unreachable ({why}); nobody promotes without it"),
                Some(self.retry),
                out,
            ),
        }
    }

    fn set_fence(st: &mut State, f: Fence, out: &mut Vec<Effect>) {
        if st.set_fence(f.clone()) {
            out.push(Effect::Fenced(f));
        }
    }

    fn ask(&self, v: &View, ask: Ask, limit: Option<Duration>, out: &mut Vec<Effect>) {
        out.push(Effect::Ask {
            ask,
            sent: v.now,
            limit,
        });
    }

    /// One round of fencing: done when a link is back or the role is gone.
    fn fence_step(&mut self, st: &mut State, v: &View, out: &mut Vec<Effect>) {
        let Some(epoch) = self.fencing_for else {
            return;
        };
        if v.link.is_some() {
            out.push(Effect::Log(
                "peer reconnected before fencing finished: held writes are resent".into(),
            ));
            Self::set_fence(st, Fence::Clear, out);
            self.fencing_for = None;
            return;
        }
        if st.role() != Role::Primary {
            self.fencing_for = None;
            return;
        }
        match self.fencing {
            Fencing::Witness => self.ask(v, Ask::Outdate { epoch }, None, out),
            Fencing::Handler => out.push(Effect::RunHandler { takeover: false }),
            Fencing::None => self.fencing_for = None,
        }
    }

    fn handler_verdict(
        &mut self,
        st: &mut State,
        v: &View,
        d: HandlerDecision,
        out: &mut Vec<Effect>,
    ) {
        if self.fencing_for.is_none() {
            return;
        }
        match d {
            // DRBD 9: a link that came back meanwhile makes the result moot.
            HandlerDecision::PeerFenced(_) if v.link.is_some() => self.fence_step(st, v, out),
            HandlerDecision::PeerFenced(why) => {
                self.fencing_for = None;
                out.push(Effect::RecordPeerOutdated);
                Self::set_fence(st, Fence::PeerOutdated(why), out);
            }
            HandlerDecision::OutdateMyself(why) => {
                self.fencing_for = None;
                self.step_down(st, why, true, None, out);
            }
            HandlerDecision::Hold(why) => {
                Self::set_fence(st, Fence::Pending(why), out);
                out.push(Effect::After(self.retry, Tick::Fence));
            }
        }
    }

    /// The next renewal: at a third of the lease, or when it runs out if that is sooner.
    fn next_renewal(&self, st: &State, v: &View, epoch: u64, out: &mut Vec<Effect>) {
        let next = v.now + self.lease / 3;
        let at = st.lease_until().map_or(next, |u| u.min(next));
        out.push(Effect::After(
            at.saturating_duration_since(v.now),
            Tick::Lease { epoch },
        ));
    }

    fn renew(&mut self, st: &mut State, v: &View, epoch: u64, out: &mut Vec<Effect>) {
        if self.keeping != Some(epoch) {
            return;
        }
        if st.role() != Role::Primary || v.epoch != epoch {
            self.keeping = None;
            return;
        }
        if self.lease_ran_out(st, v, out) {
            return;
        }
        // Without the peer, a renewal that cannot finish before the lease runs out is given
        // up then (and tried again at once if the lease is still useful).
        let limit = match v.link {
            Some(_) => None,
            None => Some(
                st.lease_until()
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(v.now))
                    .max(LEAST_RENEWAL),
            ),
        };
        self.ask(v, Ask::Renew { epoch }, limit, out);
    }

    /// A primary without a valid lease and without the peer stops (true). Its data stays
    /// UpToDate if the peer is marked outdated: the witness refuses the peer any epoch (short
    /// of an operator's force), so nobody can have written what this copy lacks.
    fn lease_ran_out(&mut self, st: &mut State, v: &View, out: &mut Vec<Effect>) -> bool {
        let Some(stale) = lease_lapse(st.lease_valid(v.now), v.link.is_some(), v.peer_outdated)
        else {
            return false;
        };
        let why = "the lease expired and the peer is not connected".to_string();
        let lapsed = stale.then_some(v.epoch);
        self.step_down(st, why, stale, lapsed, out);
        if let Some(epoch) = lapsed {
            self.ask(v, Ask::Lapse { epoch }, None, out);
        }
        true
    }

    fn step_down(
        &mut self,
        st: &mut State,
        why: String,
        stale: bool,
        lapsed: Option<u64>,
        out: &mut Vec<Effect>,
    ) {
        self.keeping = None;
        st.lease_dropped();
        Self::set_fence(st, Fence::Lost(why.clone()), out);
        out.push(Effect::StepDown { why, stale, lapsed });
    }

    fn peer_in_sync(&mut self, st: &mut State, v: &View, link: u64, out: &mut Vec<Effect>) {
        Self::set_fence(st, Fence::Clear, out);
        if self.fencing == Fencing::Witness {
            self.ask_again(
                st,
                v,
                Ask::InSync {
                    epoch: v.epoch,
                    link,
                },
                out,
            );
        } else {
            out.push(Effect::PeerMarkLifted);
        }
    }

    /// Whether an outstanding question is still worth asking.
    fn still_wanted(&self, st: &State, v: &View, ask: &Ask) -> bool {
        match *ask {
            Ask::Outdate { .. } => self.fencing_for.is_some(),
            Ask::Renew { epoch } => self.keeping == Some(epoch),
            // Only for the link the peer was found in sync on: after a new handshake it may
            // be behind again, and lifting its mark then lets it take over without the
            // writes it lacks (simulator seeds 1449178 and 1590153).
            Ask::InSync { epoch, link } => {
                st.role() == Role::Primary && v.link == Some(link) && v.epoch == epoch
            }
            // Given up if the copy changed meanwhile (a resync, another reason to be Outdated).
            Ask::Lapse { epoch } => {
                st.lapsed_in == Some(epoch) && st.disk() == DiskState::Outdated && v.epoch == epoch
            }
            Ask::Acquire { .. } => self.promoting.is_some(),
            Ask::Settle => self.fencing == Fencing::Witness && Self::stuck_pair(v).is_some(),
        }
    }

    fn ask_again(&mut self, st: &mut State, v: &View, ask: Ask, out: &mut Vec<Effect>) {
        match ask {
            Ask::Outdate { .. } => self.fence_step(st, v, out),
            Ask::Renew { epoch } => self.renew(st, v, epoch, out),
            _ if self.still_wanted(st, v, &ask) => self.ask(v, ask, None, out),
            _ => {}
        }
    }

    fn answer(
        &mut self,
        st: &mut State,
        v: &View,
        ask: Ask,
        sent: Instant,
        reply: Result<Reply, String>,
        out: &mut Vec<Effect>,
    ) {
        match ask {
            Ask::Outdate { epoch } => self.outdate_answer(st, v, epoch, sent, reply, out),
            Ask::Renew { epoch } => self.renew_answer(st, v, epoch, sent, reply, out),
            Ask::Acquire { in_sync, .. } => self.acquire_answer(st, v, in_sync, sent, reply, out),
            Ask::Settle => match reply {
                Ok(Reply::State {
                    epoch,
                    holder,
                    outdated,
                    ..
                }) => {
                    let w = WitnessView {
                        epoch,
                        holder,
                        outdated,
                    };
                    // Still the same pair after the round trip.
                    if let Some((me, peer)) = Self::stuck_pair(v) {
                        if let Some(why) = reclaim_identical_copy(me, peer, &w) {
                            out.push(Effect::Reclaim { why });
                        }
                    }
                }
                Ok(other) => out.push(Effect::Log(format!(
                    "unexpected witness reply to a query: {other:?}"
                ))),
                Err(_) => out.push(Effect::After(self.retry, Tick::Again(ask))),
            },
            Ask::InSync { .. } => match reply {
                Ok(Reply::Ok) => out.push(Effect::PeerMarkLifted),
                Ok(other) => out.push(Effect::Log(format!(
                    "the witness did not clear the peer's outdated mark: {other:?}"
                ))),
                Err(e) => {
                    if self.still_wanted(st, v, &ask) {
                        out.push(Effect::Log(format!(
                            "cannot tell the witness the peer is in sync (retrying): {e}"
                        )));
                    }
                    out.push(Effect::After(self.retry, Tick::Again(ask)));
                }
            },
            Ask::Lapse { epoch } => match reply {
                Ok(Reply::State {
                    epoch: we,
                    holder,
                    outdated,
                    ..
                }) => {
                    let w = WitnessView {
                        epoch: we,
                        holder,
                        outdated,
                    };
                    if we == epoch && w.names_holder(&self.me) && self.still_wanted(st, v, &ask) {
                        out.push(Effect::UpToDateAgain {
                            why: format!(
                                "the witness still names this node the holder of epoch \
                                 {epoch}: nobody took over after its lease ran out"
                            ),
                        });
                    }
                }
                Ok(other) => out.push(Effect::Log(format!(
                    "unexpected witness reply to a query: {other:?}"
                ))),
                Err(_) => out.push(Effect::After(self.retry, Tick::Again(ask))),
            },
        }
    }

    fn outdate_answer(
        &mut self,
        st: &mut State,
        v: &View,
        epoch: u64,
        sent: Instant,
        reply: Result<Reply, String>,
        out: &mut Vec<Effect>,
    ) {
        match self.fencing_for {
            None => return,
            // Promoted again meanwhile: fence for the new epoch.
            Some(e) if e != epoch => return self.fence_step(st, v, out),
            Some(_) => {}
        }
        match reply.as_ref().map(witness_verdict) {
            Ok(WitnessVerdict::Yes) => {
                self.fencing_for = None;
                out.push(Effect::RecordPeerOutdated);
                // The lease ran out during the round trip: the mark is all that is left.
                if st.role() != Role::Primary {
                    return;
                }
                self.renewed(st, v, sent, out);
                if let Some(link) = v.link {
                    // The peer came back during the round trip: writes go to it again, and
                    // the mark the witness just set is lifted as soon as it is in sync (the
                    // handshake's lift may have run first).
                    if v.peer_connected_in_sync {
                        self.peer_in_sync(st, v, link, out);
                    }
                    return;
                }
                let f = Fence::PeerOutdated(format!(
                    "witness outdated {} for epoch {epoch}",
                    self.peer
                ));
                Self::set_fence(st, f, out);
            }
            Ok(WitnessVerdict::Superseded(why)) => {
                self.fencing_for = None;
                self.step_down(st, why, true, None, out);
            }
            Ok(WitnessVerdict::Undecided(what)) => {
                Self::set_fence(
                    st,
                    Fence::Pending(format!("{what} to outdate; writes held")),
                    out,
                );
                out.push(Effect::After(self.retry, Tick::Fence));
            }
            Err(e) => {
                let f = Fence::Pending(format!(
                    "cannot reach the witness to fence {} ({e}); writes held",
                    self.peer
                ));
                Self::set_fence(st, f, out);
                out.push(Effect::After(self.retry, Tick::Fence));
            }
        }
    }

    fn renew_answer(
        &mut self,
        st: &mut State,
        v: &View,
        epoch: u64,
        sent: Instant,
        reply: Result<Reply, String>,
        out: &mut Vec<Effect>,
    ) {
        if self.keeping != Some(epoch) {
            return;
        }
        match reply.as_ref().map(witness_verdict) {
            Ok(WitnessVerdict::Yes) => self.renewed(st, v, sent, out),
            Ok(WitnessVerdict::Superseded(why)) => {
                self.step_down(st, why, true, None, out);
                return;
            }
            Ok(WitnessVerdict::Undecided(what)) => {
                st.lease_trouble(what);
            }
            Err(e) => {
                if st.lease_trouble(format!("cannot renew: {e}")) {
                    out.push(Effect::Log(format!("cannot renew the lease: {e}")));
                }
            }
        }
        if self.lease_ran_out(st, v, out) {
            return;
        }
        self.next_renewal(st, v, epoch, out);
    }

    /// The witness (re)granted the lease for a request sent at `sent`.
    fn renewed(&self, st: &mut State, v: &View, sent: Instant, out: &mut Vec<Effect>) {
        if st.lease_renewed(lease_until(sent, self.lease), v.now) {
            // Writes held for a valid lease look again.
            out.push(Effect::Changed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::witness::proto::Refusal;

    const LEASE: Duration = Duration::from_secs(2);
    const RETRY: Duration = Duration::from_millis(200);

    fn duty() -> Duty {
        Duty::new("alpha", "beta", Fencing::Witness, LEASE, RETRY)
    }

    fn primary() -> State {
        let mut st = State::new(DiskState::UpToDate);
        st.promoted();
        st
    }

    fn view(now: Instant) -> View {
        View {
            now,
            epoch: 3,
            link: None,
            peer_connected_in_sync: false,
            peer_outdated: false,
            peer_primary: false,
            pair: None,
        }
    }

    fn answer(ask: Ask, sent: Instant, reply: Result<Reply, String>) -> Event {
        Event::Answer { ask, sent, reply }
    }

    fn asks(out: &[Effect]) -> Vec<Ask> {
        out.iter()
            .filter_map(|e| match e {
                Effect::Ask { ask, .. } => Some(ask.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lost_peer_is_fenced_once_and_writes_go_on_when_the_witness_outdates_it() {
        let t = Instant::now();
        let (mut d, mut st, v) = (duty(), primary(), view(t));
        let out = d.apply(&mut st, &v, Event::FencePeer);
        assert_eq!(asks(&out), vec![Ask::Outdate { epoch: 3 }]);
        // A second loss while the first round is under way asks nothing more.
        assert!(d.apply(&mut st, &v, Event::FencePeer).is_empty());
        // Out of reach: writes stay held, and it is asked again later.
        let out = d.apply(
            &mut st,
            &v,
            answer(Ask::Outdate { epoch: 3 }, t, Err("timeout".into())),
        );
        assert!(matches!(st.fence(), Fence::Pending(_)));
        assert!(out.contains(&Effect::After(RETRY, Tick::Fence)));
        let out = d.apply(&mut st, &v, Event::Tick(Tick::Fence));
        assert_eq!(asks(&out), vec![Ask::Outdate { epoch: 3 }]);
        let out = d.apply(
            &mut st,
            &v,
            answer(
                Ask::Outdate { epoch: 3 },
                t,
                Ok(Reply::PeerOutdated { epoch: 3 }),
            ),
        );
        assert!(out.contains(&Effect::RecordPeerOutdated));
        assert!(matches!(st.fence(), Fence::PeerOutdated(_)));
        assert!(st.lease_valid(t), "the answer renewed the lease");
        assert!(!d.fencing());
    }

    #[test]
    fn a_superseded_primary_steps_down_and_a_returning_link_ends_fencing() {
        let t = Instant::now();
        let (mut d, mut st, v) = (duty(), primary(), view(t));
        d.apply(&mut st, &v, Event::FencePeer);
        let out = d.apply(
            &mut st,
            &v,
            answer(
                Ask::Outdate { epoch: 3 },
                t,
                Ok(Reply::Refused(Refusal::Superseded {
                    epoch: 4,
                    holder: Some("beta".into()),
                })),
            ),
        );
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::StepDown { stale: true, .. })));
        assert!(matches!(st.fence(), Fence::Lost(_)));

        let (mut d, mut st) = (duty(), primary());
        d.apply(&mut st, &v, Event::FencePeer);
        let back = View {
            link: Some(9),
            ..v.clone()
        };
        let out = d.apply(&mut st, &back, Event::Tick(Tick::Fence));
        assert!(asks(&out).is_empty());
        assert_eq!(st.fence(), &Fence::Clear);
        assert!(!d.fencing());
    }

    #[test]
    fn a_lease_that_runs_out_without_the_peer_gives_up_the_role_and_asks_who_took_over() {
        let t = Instant::now();
        let (mut d, mut st) = (duty(), primary());
        let out = d.apply(&mut st, &view(t), Event::Promoted { epoch: 3 });
        assert_eq!(
            out,
            vec![Effect::After(LEASE / 3, Tick::Lease { epoch: 3 })]
        );
        // No lease was ever granted here: the first tick finds it run out.
        let later = view(t + LEASE);
        let out = d.apply(&mut st, &later, Event::Tick(Tick::Lease { epoch: 3 }));
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::StepDown { stale: true, .. })));
        assert_eq!(asks(&out), vec![Ask::Lapse { epoch: 3 }]);
        // The effect, run: a secondary with an Outdated copy whose lease lapsed. The witness
        // still names it.
        st.stepped_down();
        st.outdated();
        st.lapsed_in = Some(3);
        let out = d.apply(
            &mut st,
            &later,
            answer(
                Ask::Lapse { epoch: 3 },
                t,
                Ok(Reply::State {
                    epoch: 3,
                    holder: Some("alpha".into()),
                    outdated: vec![],
                    lease_remaining_ms: Some(0),
                }),
            ),
        );
        assert!(out
            .iter()
            .any(|e| matches!(e, Effect::UpToDateAgain { .. })));
    }

    #[test]
    fn a_renewal_keeps_the_role_and_schedules_the_next() {
        let t = Instant::now();
        let (mut d, mut st) = (duty(), primary());
        st.lease_renewed(t + LEASE, t);
        d.apply(&mut st, &view(t), Event::Promoted { epoch: 3 });
        let v = view(t + LEASE / 3);
        let out = d.apply(&mut st, &v, Event::Tick(Tick::Lease { epoch: 3 }));
        assert_eq!(asks(&out), vec![Ask::Renew { epoch: 3 }]);
        let out = d.apply(
            &mut st,
            &v,
            answer(
                Ask::Renew { epoch: 3 },
                v.now,
                Ok(Reply::Renewed { epoch: 3 }),
            ),
        );
        assert!(matches!(
            out.last(),
            Some(Effect::After(_, Tick::Lease { epoch: 3 }))
        ));
        assert_eq!(st.role(), Role::Primary);
        // A tick of an older epoch's lease is ignored.
        assert!(d
            .apply(&mut st, &v, Event::Tick(Tick::Lease { epoch: 2 }))
            .is_empty());
    }

    #[test]
    fn the_peer_mark_is_lifted_only_for_the_link_it_was_found_in_sync_on() {
        let t = Instant::now();
        let (mut d, mut st) = (duty(), primary());
        let v = View {
            link: Some(5),
            ..view(t)
        };
        let out = d.apply(&mut st, &v, Event::PeerInSync { link: 5 });
        let ask = Ask::InSync { epoch: 3, link: 5 };
        assert_eq!(asks(&out), vec![ask.clone()]);
        let out = d.apply(&mut st, &v, answer(ask.clone(), t, Err("timeout".into())));
        assert!(out.contains(&Effect::After(RETRY, Tick::Again(ask.clone()))));
        // A new link came up meanwhile: the retry asks nothing.
        let relinked = View {
            link: Some(6),
            ..v.clone()
        };
        assert!(d
            .apply(&mut st, &relinked, Event::Tick(Tick::Again(ask.clone())))
            .is_empty());
        let out = d.apply(&mut st, &v, answer(ask, t, Ok(Reply::Ok)));
        assert_eq!(out, vec![Effect::PeerMarkLifted]);
    }

    #[test]
    fn a_secondary_takes_over_only_with_an_epoch_and_holds_links_meanwhile() {
        let t = Instant::now();
        let mut d = duty();
        let mut st = State::new(DiskState::UpToDate);
        let v = view(t);
        let out = d.apply(&mut st, &v, Event::TakeOver);
        let ask = Ask::Acquire {
            have_epoch: 3,
            lease_ms: 2000,
            in_sync: false,
            force: false,
        };
        assert_eq!(out[0], Effect::HoldLinks);
        assert_eq!(asks(&out), vec![ask.clone()]);
        assert!(
            d.apply(&mut st, &v, Event::TakeOver).is_empty(),
            "one attempt at a time"
        );
        // The old lease still runs: links come back, and it asks again when it may.
        let held = Reply::Refused(Refusal::LeaseHeld {
            holder: "beta".into(),
            epoch: 3,
            remaining_ms: 700,
        });
        let out = d.apply(&mut st, &v, answer(ask.clone(), t, Ok(held)));
        assert_eq!(out[0], Effect::ReleaseLinks);
        assert!(out.contains(&Effect::After(Duration::from_millis(702), Tick::TakeOver)));
        let out = d.apply(&mut st, &v, Event::Tick(Tick::TakeOver));
        assert_eq!(asks(&out), vec![ask.clone()]);
        let out = d.apply(&mut st, &v, answer(ask, t, Ok(Reply::Granted { epoch: 4 })));
        assert!(out.contains(&Effect::RecordPeerOutdated));
        assert!(out.iter().any(|e| matches!(
            e,
            Effect::BecomePrimary {
                epoch: Some(4),
                peer_fenced: true,
                ..
            }
        )));
        assert!(st.lease_valid(t));
        d.apply(&mut st, &v, Event::PromotionEnded);

        // The primary is back on a link, or this copy is not UpToDate: nothing to ask.
        let back = View {
            link: Some(2),
            peer_primary: true,
            ..v.clone()
        };
        assert_eq!(
            d.apply(&mut st, &back, Event::TakeOver),
            vec![Effect::Note(None)]
        );
        let mut outdated = State::new(DiskState::Outdated);
        let out = d.apply(&mut outdated, &v, Event::TakeOver);
        assert!(asks(&out).is_empty() && !out.contains(&Effect::HoldLinks));
        // Refused for good: this copy is outdated, and it stops trying.
        let out = d.apply(&mut st, &v, Event::TakeOver);
        let ask = asks(&out).remove(0);
        let out = d.apply(
            &mut st,
            &v,
            answer(ask, t, Ok(Reply::Refused(Refusal::Outdated { epoch: 3 }))),
        );
        assert!(out.iter().any(|e| matches!(e, Effect::OutdateMyself(_))));
        assert!(!out.iter().any(|e| matches!(e, Effect::After(..))));
    }

    #[test]
    fn two_identical_stuck_copies_ask_the_witness_and_only_its_holder_reclaims() {
        use crate::meta::Generations;
        let t = Instant::now();
        let mut d = duty();
        let mut st = State::new(DiskState::Outdated);
        let side = |node: &str| {
            Side::plain(
                node,
                Generations::default(),
                Role::Secondary,
                DiskState::Outdated,
            )
        };
        let v = View {
            link: Some(1),
            pair: Some((side("alpha"), side("beta"))),
            ..view(t)
        };
        let out = d.apply(&mut st, &v, Event::Settle);
        assert_eq!(asks(&out), vec![Ask::Settle]);
        let state = |holder: &str| Reply::State {
            epoch: 3,
            holder: Some(holder.into()),
            lease_remaining_ms: Some(0),
            outdated: vec![],
        };
        let out = d.apply(&mut st, &v, answer(Ask::Settle, t, Ok(state("alpha"))));
        assert!(matches!(out[..], [Effect::Reclaim { .. }]), "{out:?}");
        assert!(d
            .apply(&mut st, &v, answer(Ask::Settle, t, Ok(state("beta"))))
            .is_empty());
        // Out of reach: asked again only while the pair is still stuck.
        let out = d.apply(&mut st, &v, answer(Ask::Settle, t, Err("timeout".into())));
        assert_eq!(out, vec![Effect::After(RETRY, Tick::Again(Ask::Settle))]);
        let mut behind = v.clone();
        behind.pair.as_mut().unwrap().1.out_of_sync_bytes = 4096;
        assert!(d
            .apply(&mut st, &behind, Event::Tick(Tick::Again(Ask::Settle)))
            .is_empty());
        assert!(d
            .apply(&mut st, &behind, answer(Ask::Settle, t, Ok(state("alpha"))))
            .is_empty());
    }

    #[test]
    fn an_operator_promotion_is_refused_or_granted_and_one_runs_at_a_time() {
        let t = Instant::now();
        let mut d = duty();
        let v = view(t);
        let mut inconsistent = State::new(DiskState::Inconsistent);
        let out = d.apply(
            &mut inconsistent,
            &v,
            Event::Promote {
                id: 1,
                force: false,
            },
        );
        assert!(
            matches!(&out[..], [Effect::Refuse { id: 1, why }] if why.contains("--force")),
            "{out:?}"
        );
        let mut st = State::new(DiskState::UpToDate);
        let out = d.apply(
            &mut st,
            &v,
            Event::Promote {
                id: 2,
                force: false,
            },
        );
        assert!(
            !out.contains(&Effect::HoldLinks),
            "an operator's promotion holds no links"
        );
        let ask = asks(&out).remove(0);
        let out = d.apply(
            &mut st,
            &v,
            Event::Promote {
                id: 3,
                force: false,
            },
        );
        assert!(matches!(&out[..], [Effect::Refuse { id: 3, .. }]));
        assert!(d.apply(&mut st, &v, Event::TakeOver).is_empty());
        // The witness says wait: the operator hears it at once (no retry behind its back).
        let held = Reply::Refused(Refusal::LeaseHeld {
            holder: "beta".into(),
            epoch: 3,
            remaining_ms: 700,
        });
        let out = d.apply(&mut st, &v, answer(ask.clone(), t, Ok(held)));
        assert!(
            matches!(&out[..], [Effect::Refuse { id: 2, why }] if why.contains("the witness refused")),
            "{out:?}"
        );
        assert!(!d.promoting());
        // Granted: the role is taken and the request answered by it.
        let out = d.apply(&mut st, &v, Event::Promote { id: 4, force: true });
        let ask = asks(&out).remove(0);
        let out = d.apply(&mut st, &v, answer(ask, t, Ok(Reply::Granted { epoch: 4 })));
        assert!(out.iter().any(|e| matches!(
            e,
            Effect::BecomePrimary {
                epoch: Some(4),
                forced: true,
                new_data: false,
                reply: Some(4),
                ..
            }
        )));
    }

    #[test]
    fn a_copy_that_changed_during_the_round_trip_is_not_promoted() {
        let t = Instant::now();
        let mut d = duty();
        let v = view(t);
        let mut st = State::new(DiskState::UpToDate);
        let out = d.apply(&mut st, &v, Event::Promote { id: 1, force: true });
        let ask = asks(&out).remove(0);
        // A handshake ended meanwhile and made this copy a sync target.
        st.invalidated();
        let out = d.apply(&mut st, &v, answer(ask, t, Ok(Reply::Granted { epoch: 4 })));
        assert!(
            matches!(out.last(), Some(Effect::Refuse { id: 1, why }) if why.contains("Inconsistent")),
            "{out:?}"
        );
        assert!(!out
            .iter()
            .any(|e| matches!(e, Effect::BecomePrimary { .. })));
        assert!(
            !st.lease_valid(t),
            "the lease of an epoch not taken is not kept"
        );
    }

    #[test]
    fn handler_fencing_waits_for_proof_and_a_returning_link_makes_it_moot() {
        let t = Instant::now();
        let mut d = Duty::new("alpha", "beta", Fencing::Handler, LEASE, RETRY);
        let mut st = primary();
        let v = view(t);
        assert_eq!(
            d.apply(&mut st, &v, Event::FencePeer),
            vec![Effect::RunHandler { takeover: false }]
        );
        let out = d.apply(
            &mut st,
            &v,
            Event::Handler {
                takeover: false,
                verdict: HandlerDecision::Hold("no".into()),
            },
        );
        assert!(out.contains(&Effect::After(RETRY, Tick::Fence)));
        assert_eq!(
            d.apply(&mut st, &v, Event::Tick(Tick::Fence)),
            vec![Effect::RunHandler { takeover: false }]
        );
        let back = View {
            link: Some(1),
            ..v.clone()
        };
        let out = d.apply(
            &mut st,
            &back,
            Event::Handler {
                takeover: false,
                verdict: HandlerDecision::PeerFenced("stonith".into()),
            },
        );
        assert!(!out.contains(&Effect::RecordPeerOutdated));
        assert_eq!(st.fence(), &Fence::Clear);
        assert!(!d.fencing());
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Promote {
            force: bool,
        },
        TakeOver,
        Retry,
        /// Answer the oldest question: granted, lease held, outdated, or no answer.
        Answer(u8),
        /// The promotion's role change ran (the executor's side of `BecomePrimary`).
        Promoted,
        /// A handshake made this copy a sync target.
        BecameTarget,
        /// A resync ended: UpToDate again.
        Resynced,
        Link(bool),
        PeerPrimary(bool),
        StepDown,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<bool>().prop_map(|force| Op::Promote { force }),
            Just(Op::TakeOver),
            Just(Op::Retry),
            (0u8..4).prop_map(Op::Answer),
            Just(Op::Promoted),
            Just(Op::BecameTarget),
            Just(Op::Resynced),
            any::<bool>().prop_map(Op::Link),
            any::<bool>().prop_map(Op::PeerPrimary),
            Just(Op::StepDown),
        ]
    }

    proptest! {
        /// Whatever happens around it: one promotion at a time; a role is taken only by a
        /// secondary whose copy is UpToDate (or by force, and then as the new reference);
        /// every operator's request is answered exactly once; takeovers hold the links.
        #[test]
        fn promotions_are_one_at_a_time_and_every_request_is_answered_once(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let t = Instant::now();
            let mut d = duty();
            let mut st = State::new(DiskState::UpToDate);
            let mut v = view(t);
            let mut asks: std::collections::VecDeque<(Ask, Instant)> = Default::default();
            let mut answered = std::collections::HashMap::<u64, u32>::new();
            let mut asked = 0u64;
            // The role change a BecomePrimary asked for, not yet run.
            let mut becoming: Option<bool> = None;
            let mut held = false;
            let mut epoch = 3;
            for op in ops {
                let ev = match op {
                    Op::Promote { force } => {
                        asked += 1;
                        Event::Promote { id: asked, force }
                    }
                    Op::TakeOver => Event::TakeOver,
                    Op::Retry => Event::Tick(Tick::TakeOver),
                    Op::Answer(k) => {
                        let Some((ask, sent)) = asks.pop_front() else { continue };
                        let reply = match k {
                            0 => {
                                epoch += 1;
                                Ok(Reply::Granted { epoch })
                            }
                            1 => Ok(Reply::Refused(Refusal::LeaseHeld {
                                holder: "beta".into(),
                                epoch,
                                remaining_ms: 300,
                            })),
                            2 => Ok(Reply::Refused(Refusal::Outdated { epoch })),
                            _ => Err("timeout".into()),
                        };
                        answer(ask, sent, reply)
                    }
                    Op::Promoted => {
                        let Some(new_data) = becoming.take() else { continue };
                        if new_data {
                            st.forced_up_to_date();
                        }
                        if st.role() == Role::Secondary {
                            st.promoted();
                        }
                        held = false;
                        Event::PromotionEnded
                    }
                    Op::BecameTarget => {
                        if st.role() == Role::Secondary && st.disk() == DiskState::UpToDate {
                            st.invalidated();
                        }
                        continue;
                    }
                    Op::Resynced => {
                        if st.disk() == DiskState::Inconsistent {
                            st.resync_done_as_target(DiskState::UpToDate);
                        }
                        continue;
                    }
                    Op::Link(up) => {
                        v.link = up.then_some(1);
                        v.peer_primary &= up;
                        continue;
                    }
                    Op::PeerPrimary(p) => {
                        v.peer_primary = p && v.link.is_some();
                        continue;
                    }
                    Op::StepDown => {
                        st.stepped_down();
                        continue;
                    }
                };
                let mut effects: std::collections::VecDeque<Effect> =
                    d.apply(&mut st, &v, ev).into();
                while let Some(e) = effects.pop_front() {
                    match e {
                        Effect::Ask { ask, sent, .. } => asks.push_back((ask, sent)),
                        Effect::HoldLinks => {
                            prop_assert!(!held, "links held twice");
                            if v.peer_primary {
                                effects = d.apply(&mut st, &v, Event::LinksNotHeld).into();
                            } else {
                                held = true;
                            }
                        }
                        Effect::ReleaseLinks => held = false,
                        Effect::BecomePrimary { new_data, forced, reply, .. } => {
                            prop_assert!(becoming.is_none(), "two promotions at once");
                            prop_assert_eq!(st.role(), Role::Secondary);
                            prop_assert!(!v.peer_primary, "promoted beside a primary peer");
                            prop_assert!(
                                st.disk() == DiskState::UpToDate || (forced && new_data),
                                "a {:?} copy promoted without becoming the reference",
                                st.disk()
                            );
                            prop_assert_eq!(reply.is_none(), held, "a takeover holds the links");
                            if let Some(id) = reply {
                                *answered.entry(id).or_default() += 1;
                            }
                            becoming = Some(new_data);
                        }
                        Effect::Reply { id, .. } | Effect::Refuse { id, .. } => {
                            *answered.entry(id).or_default() += 1;
                        }
                        Effect::StepDown { .. } => {
                            st.stepped_down();
                        }
                        Effect::OutdateMyself(_) => {
                            st.outdated();
                        }
                        _ => {}
                    }
                }
                prop_assert!(answered.values().all(|&n| n == 1), "{:?}", answered);
            }
            // Every question answered (no witness) ends every request.
            while let Some((ask, sent)) = asks.pop_front() {
                let reply = Err("timeout".into());
                for e in d.apply(&mut st, &v, answer(ask, sent, reply)) {
                    match e {
                        Effect::Reply { id, .. } | Effect::Refuse { id, .. } => {
                            *answered.entry(id).or_default() += 1;
                        }
                        Effect::BecomePrimary { reply: Some(id), .. } => {
                            *answered.entry(id).or_default() += 1;
                        }
                        _ => {}
                    }
                }
            }
            prop_assert!(answered.values().all(|&n| n == 1), "{:?}", answered);
            prop_assert_eq!(answered.len() as u64, asked, "a request was never answered");
        }
    }
}
