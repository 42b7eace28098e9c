//! The failover decisions as plain functions of what the node knows, with no IO: the running
//! node (`failover`, `replicated`) and the deterministic simulator (`sim/`) take every one of
//! them here, so the simulator checks the decisions the node really makes.
//!
//! The one-writer rule (DESIGN.md invariant 2) rests on two facts. A write the peer
//! acknowledged is on both nodes, and the peer stops acknowledging before it ever asks to
//! promote (it drops the link first), so such writes are safe whatever the lease says. A write
//! acknowledged *without* the peer needs both a valid lease for the current epoch and the peer
//! proven outdated for that epoch (by the witness or the fence handler); until then it is held.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{DiskState, Role};
use crate::config::Fencing;
use crate::mutation::{active, Mutation};
use crate::witness::proto::{Refusal, Reply};

/// What a primary may do with a write the peer did not acknowledge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// The peer is connected (or this node is not primary): nothing to decide.
    Clear,
    /// The link is gone and fencing is in progress: hold the write.
    Pending(String),
    /// The peer is proven unable to acknowledge writes: go on without it (bitmap).
    PeerOutdated(String),
    /// This node may not acknowledge writes any more (superseded, outdated itself).
    Lost(String),
}

impl Fence {
    pub fn to_json(&self) -> Value {
        let (state, reason) = match self {
            Fence::Clear => ("clear", None),
            Fence::Pending(r) => ("pending", Some(r)),
            Fence::PeerOutdated(r) => ("peer-outdated", Some(r)),
            Fence::Lost(r) => ("lost", Some(r)),
        };
        json!({"state": state, "reason": reason})
    }
}

/// What a write the peer did not acknowledge does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldDecision {
    /// A usable link is up again: send the write to the peer.
    Retry,
    /// Acknowledge it without the peer.
    Degraded,
    /// Fail it: this node must not acknowledge it.
    Fail(String),
    /// Nothing decided yet: wait for the next change.
    Wait,
}

/// The rule for a held write. `usable_link`: a link is up that is not the one the write was
/// lost on and is not closing.
pub fn hold_decision(
    role: Role,
    usable_link: bool,
    fence: &Fence,
    fencing: Fencing,
    lease_valid: bool,
) -> HoldDecision {
    if role != Role::Primary {
        return HoldDecision::Fail("no longer primary".into());
    }
    if usable_link {
        return HoldDecision::Retry;
    }
    match fence {
        Fence::Lost(why) => HoldDecision::Fail(why.clone()),
        Fence::PeerOutdated(_)
            if fencing != Fencing::Witness || lease_valid || active(Mutation::LeaseCheck) =>
        {
            HoldDecision::Degraded
        }
        _ => HoldDecision::Wait,
    }
}

/// Lease timing shared by the node and the witness: the holder trusts its lease until
/// `sent + lease - margin`; the witness hands the epoch on only after `expiry + margin`.
pub fn lease_margin(lease: Duration) -> Duration {
    (lease / 10).max(Duration::from_millis(50))
}

/// Until when a lease granted (or renewed) for a request sent at `sent` may be trusted.
pub fn lease_until(sent: Instant, lease: Duration) -> Instant {
    sent + lease - lease_margin(lease)
}

/// A primary whose lease is no longer valid: `Some(stale)` if it must step down now (it has
/// no link to a peer that keeps its writes); `stale` says its copy must count as Outdated
/// (the peer is not marked outdated, so another node may take over and write).
pub fn lease_lapse(lease_valid: bool, linked: bool, peer_outdated: bool) -> Option<bool> {
    if active(Mutation::LeaseCheck) {
        return None;
    }
    (!lease_valid && !linked).then_some(!peer_outdated)
}

/// Why a secondary that lost its primary may not promote itself, or `None` if it may try.
pub fn auto_promotion_blocked(
    auto: bool,
    fencing: Fencing,
    disk: DiskState,
    role: Role,
    peer_was_primary: bool,
) -> Option<String> {
    if role == Role::Primary || !peer_was_primary {
        return Some("the lost peer was not primary".into());
    }
    if !auto {
        return Some("[failover] auto = false".into());
    }
    if fencing == Fencing::None {
        return Some(
            "fencing = \"none\": no automatic promotion (use tandem primary --force)".into(),
        );
    }
    if disk != DiskState::UpToDate {
        return Some(format!(
            "disk is {}: only UpToDate data is promoted automatically",
            disk.as_str()
        ));
    }
    None
}

/// What the node does when the link to its peer is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnLinkLost {
    /// A primary without fencing goes on alone (the fence state it takes).
    GoOnAlone(Fence),
    /// A primary holds writes (the fence state it takes) and fences the peer.
    FencePeer(Fence),
    /// A secondary whose primary was lost tries to take over.
    TakeOver,
    /// A secondary that may not take over says why in its status.
    Note(String),
    Nothing,
}

pub fn on_link_lost(
    role: Role,
    fencing: Fencing,
    auto: bool,
    disk: DiskState,
    peer_was_primary: bool,
    peer: &str,
) -> OnLinkLost {
    if role == Role::Primary && active(Mutation::LinkLossFencing) {
        return OnLinkLost::GoOnAlone(Fence::PeerOutdated("mutation: not fenced".into()));
    }
    if role == Role::Primary {
        return match fencing {
            Fencing::None => OnLinkLost::GoOnAlone(Fence::PeerOutdated(
                "fencing = \"none\": going on without the peer".into(),
            )),
            _ => OnLinkLost::FencePeer(Fence::Pending(format!(
                "lost {peer}: writes held until it is fenced"
            ))),
        };
    }
    match auto_promotion_blocked(auto, fencing, disk, role, peer_was_primary) {
        Some(why) if peer_was_primary => OnLinkLost::Note(format!("not promoting: {why}")),
        Some(_) => OnLinkLost::Nothing,
        None => OnLinkLost::TakeOver,
    }
}

/// What a node that just became primary may do with writes its peer does not acknowledge.
/// `peer_fenced`: the fencing that granted the role also fenced the peer (the witness was
/// asked to outdate it, the handler proved it, or the operator forced the promotion).
/// Without that, a peer lost during the promotion is fenced now, like a link lost by a
/// primary: a promotion asked for while the peer was connected and in sync did not outdate
/// it, so it may take over later and must not miss writes (found by the simulator, seed
/// 194746).
pub fn promotion_fence(linked: bool, peer_fenced: bool, peer: &str, why: &str) -> OnLinkLost {
    if linked {
        return OnLinkLost::GoOnAlone(Fence::Clear);
    }
    if peer_fenced || active(Mutation::PromotionFence) {
        return OnLinkLost::GoOnAlone(Fence::PeerOutdated(format!(
            "promoted without {peer}: {why}"
        )));
    }
    OnLinkLost::FencePeer(Fence::Pending(format!(
        "lost {peer} during the promotion: writes held until it is fenced"
    )))
}

/// Why the witness did not grant an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This node is outdated: it must never promote automatically.
    Outdated(String),
    /// Not yet (the old lease is still valid) or not now; try again.
    /// `Some`: when the old lease may be taken over.
    Wait(String, Option<Duration>),
    Unreachable(String),
}

/// The witness's answer to `Acquire`: the granted epoch, or why not.
pub fn acquire_outcome(reply: Reply, lease: Duration) -> Result<u64, Acquire> {
    match reply {
        Reply::Granted { epoch } => Ok(epoch),
        Reply::Refused(r @ Refusal::Outdated { .. }) => Err(Acquire::Outdated(r.to_string())),
        Reply::Refused(r @ Refusal::LeaseHeld { remaining_ms, .. }) => Err(Acquire::Wait(
            r.to_string(),
            Some(Duration::from_millis(remaining_ms).min(lease)),
        )),
        Reply::Refused(r) => Err(Acquire::Wait(r.to_string(), None)),
        other => Err(Acquire::Wait(
            format!("unexpected witness reply {other:?}"),
            None,
        )),
    }
}

/// The witness's answer to `Outdate` (fencing the lost peer) or `Renew`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WitnessVerdict {
    /// The peer is outdated (or the lease renewed): the lease holds from the request's send.
    Yes,
    /// Another node holds a newer epoch: this one must stop being primary.
    Superseded(String),
    /// No decision: ask again.
    Undecided(String),
}

pub fn witness_verdict(reply: &Reply) -> WitnessVerdict {
    match reply {
        Reply::PeerOutdated { .. } | Reply::Renewed { .. } => WitnessVerdict::Yes,
        Reply::Refused(Refusal::Superseded { epoch, holder }) => {
            WitnessVerdict::Superseded(superseded(*epoch, holder.as_deref()))
        }
        other => WitnessVerdict::Undecided(format!("witness answered {other:?}")),
    }
}

pub fn superseded(epoch: u64, holder: Option<&str>) -> String {
    format!(
        "superseded: the witness has epoch {epoch} held by {}",
        holder.unwrap_or("nobody")
    )
}

/// The first write a primary acknowledges without its peer starts a new data generation
/// (persisted before the acknowledgement): the peer's copy then no longer matches this one's
/// current generation, which is how the next handshake knows who resyncs and how a split
/// brain is seen. True while this node's generation is still the one the peer also has.
pub fn needs_split_generation(bitmap_generation: u64) -> bool {
    bitmap_generation == 0 && !active(Mutation::NewGeneration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_up_to_date_secondary_that_lost_a_primary_promotes() {
        use DiskState::*;
        use Fencing::*;
        let ok = |auto, f, d, r, p| auto_promotion_blocked(auto, f, d, r, p).is_none();
        assert!(ok(true, Witness, UpToDate, Role::Secondary, true));
        assert!(ok(true, Handler, UpToDate, Role::Secondary, true));
        assert!(!ok(false, Witness, UpToDate, Role::Secondary, true));
        assert!(!ok(true, None, UpToDate, Role::Secondary, true));
        assert!(!ok(true, Witness, Outdated, Role::Secondary, true));
        assert!(!ok(true, Witness, Inconsistent, Role::Secondary, true));
        assert!(!ok(true, Witness, UpToDate, Role::Secondary, false));
        assert!(!ok(true, Witness, UpToDate, Role::Primary, true));
    }

    #[test]
    fn the_margin_is_a_tenth_of_the_lease_but_at_least_50ms() {
        assert_eq!(
            lease_margin(Duration::from_secs(2)),
            Duration::from_millis(200)
        );
        assert_eq!(
            lease_margin(Duration::from_millis(300)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn a_held_write_goes_on_alone_only_with_the_peer_outdated_and_a_lease() {
        use HoldDecision::*;
        let out = Fence::PeerOutdated("x".into());
        let pending = Fence::Pending("p".into());
        let (w, h) = (Fencing::Witness, Fencing::Handler);
        let primary =
            |link, f: &Fence, fencing, lease| hold_decision(Role::Primary, link, f, fencing, lease);
        assert_eq!(primary(false, &out, w, true), Degraded);
        assert_eq!(primary(false, &out, w, false), Wait);
        assert_eq!(primary(false, &out, h, false), Degraded);
        assert_eq!(primary(false, &pending, w, true), Wait);
        assert_eq!(primary(true, &pending, w, false), Retry);
        assert!(matches!(
            primary(false, &Fence::Lost("l".into()), w, true),
            Fail(_)
        ));
        assert!(matches!(
            hold_decision(Role::Secondary, true, &out, w, true),
            Fail(_)
        ));
    }

    #[test]
    fn a_lapsed_lease_stops_a_primary_only_without_its_peer() {
        assert_eq!(lease_lapse(true, false, false), None);
        assert_eq!(lease_lapse(false, true, false), None);
        assert_eq!(lease_lapse(false, false, false), Some(true));
        assert_eq!(lease_lapse(false, false, true), Some(false));
    }

    #[test]
    fn a_lost_primary_fences_unless_fencing_is_off() {
        let r = |f| on_link_lost(Role::Primary, f, true, DiskState::UpToDate, false, "b");
        assert!(matches!(r(Fencing::Witness), OnLinkLost::FencePeer(_)));
        assert!(matches!(r(Fencing::None), OnLinkLost::GoOnAlone(_)));
        let s = |d, p| on_link_lost(Role::Secondary, Fencing::Witness, true, d, p, "a");
        assert_eq!(s(DiskState::UpToDate, true), OnLinkLost::TakeOver);
        assert!(matches!(s(DiskState::Outdated, true), OnLinkLost::Note(_)));
        assert_eq!(s(DiskState::UpToDate, false), OnLinkLost::Nothing);
    }

    #[test]
    fn a_promotion_goes_on_alone_only_with_the_peer_fenced() {
        assert_eq!(
            promotion_fence(true, false, "b", "x"),
            OnLinkLost::GoOnAlone(Fence::Clear)
        );
        assert!(matches!(
            promotion_fence(false, true, "b", "x"),
            OnLinkLost::GoOnAlone(Fence::PeerOutdated(_))
        ));
        assert!(matches!(
            promotion_fence(false, false, "b", "x"),
            OnLinkLost::FencePeer(Fence::Pending(_))
        ));
    }

    #[test]
    fn the_witness_answers_map_to_decisions() {
        let lease = Duration::from_secs(2);
        assert_eq!(acquire_outcome(Reply::Granted { epoch: 4 }, lease), Ok(4));
        assert!(matches!(
            acquire_outcome(Reply::Refused(Refusal::Outdated { epoch: 3 }), lease),
            Err(Acquire::Outdated(_))
        ));
        let held = Reply::Refused(Refusal::LeaseHeld {
            holder: "a".into(),
            epoch: 3,
            remaining_ms: 60_000,
        });
        assert!(matches!(
            acquire_outcome(held, lease),
            Err(Acquire::Wait(_, Some(d))) if d == lease
        ));
        assert_eq!(
            witness_verdict(&Reply::PeerOutdated { epoch: 2 }),
            WitnessVerdict::Yes
        );
        assert!(matches!(
            witness_verdict(&Reply::Refused(Refusal::Superseded {
                epoch: 5,
                holder: None
            })),
            WitnessVerdict::Superseded(_)
        ));
        assert!(matches!(
            witness_verdict(&Reply::Ok),
            WitnessVerdict::Undecided(_)
        ));
    }
}
