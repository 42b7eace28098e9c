//! Failover: the lease a witness-fenced primary holds, fencing the peer when the link is lost,
//! automatic promotion of a secondary whose primary disappeared, and switchover.
//!
//! Every decision is taken by a plain function of `rules` (which the simulator runs too);
//! this file does the IO around them: witness requests, the handler, metadata, timers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::decide::Side;
use super::duty::{Duty, Effect, Event as DutyEvent, Tick, View};
use super::records;
pub use super::rules::{auto_promotion_blocked, lease_margin, Acquire, Fence};
use super::rules::{hold_decision, HoldDecision, OnLinkLost};
use super::runtime::Node;
use super::{DiskState, Role};
use crate::config::Fencing;
use crate::failure::Failure;
use crate::fence::handler;
use crate::fence::witness_client::{Reply as WReply, Request as WRequest, WitnessClient};
use crate::repl::link::Link;

/// How long a fence handler may run before it counts as broken.
const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an unreachable witness is asked again while a fence or promotion is undecided.
const FENCE_RETRY: Duration = Duration::from_millis(250);
/// How often a fence handler that proved nothing is run again.
const HANDLER_RETRY: Duration = Duration::from_secs(2);

/// What a held write does next.
pub enum Hold {
    /// A link is up again: send the write to the peer.
    Retry(Arc<Link>),
    /// Acknowledge it without the peer.
    Degraded,
    /// Fail it: this node must not acknowledge it.
    Fail(String),
}

impl Node {
    fn witness_client(&self) -> Option<WitnessClient> {
        let addr = self.cfg.failover.witness.clone()?;
        Some(WitnessClient::new(
            addr,
            self.cfg.resource.name.clone(),
            self.me.name.clone(),
            self.secret.clone(),
            self.cfg.net.ping_timeout.max(Duration::from_millis(500)),
        ))
    }

    /// One request to the witness on this node's persistent client connection.
    async fn witness(
        &self,
        req: WRequest,
    ) -> Result<WReply, crate::fence::witness_client::WitnessError> {
        self.witness_within(req, Duration::MAX).await
    }

    /// `witness`, giving up after `limit`.
    async fn witness_within(
        &self,
        req: WRequest,
        limit: Duration,
    ) -> Result<WReply, crate::fence::witness_client::WitnessError> {
        let mut guard = self.witness.lock().await;
        if guard.is_none() {
            *guard = self.witness_client();
        }
        let client = guard
            .as_mut()
            .expect("witness fencing has a witness address");
        client.call_within(req, limit).await
    }

    pub fn fence(&self) -> Fence {
        self.state().fence().clone()
    }

    pub(crate) fn set_fence(&self, f: Fence) {
        if self.state().set_fence(f.clone()) {
            self.fence_changed(&f);
        }
    }

    /// Log and publish a new fence state.
    fn fence_changed(&self, f: &Fence) {
        match f {
            Fence::Clear => {}
            Fence::Pending(r) | Fence::PeerOutdated(r) => tracing::warn!("fencing: {r}"),
            Fence::Lost(r) => tracing::error!("fencing: {r}"),
        }
        // Writes held for fencing look again.
        self.bump();
        self.event("fencing", f.to_json());
    }

    pub fn lease_valid(&self) -> bool {
        self.state().lease_valid(Instant::now())
    }

    pub fn lease_json(&self) -> Value {
        if self.cfg.failover.fencing != Fencing::Witness || self.role() != Role::Primary {
            return Value::Null;
        }
        let st = self.state();
        let remaining = st
            .lease_until()
            .map(|t| t.saturating_duration_since(Instant::now()));
        json!({
            "valid": remaining.is_some_and(|r| !r.is_zero()),
            "remaining_ms": remaining.map(|r| r.as_millis() as u64),
            "problem": st.lease_problem(),
        })
    }

    fn set_note(&self, note: Option<String>) {
        if !self.state().set_failover_note(note.clone()) {
            return;
        }
        if let Some(n) = &note {
            tracing::warn!("failover: {n}");
        }
        self.event("failover", json!({"note": note}));
    }

    /// A write the peer did not acknowledge waits here until it may be acknowledged without
    /// the peer, must go to a new link, or must fail. `failed` is the link it was lost on: a
    /// link that is closing (quiesced for a goodbye) is still installed, and retrying on it
    /// would fail at once, forever.
    pub async fn hold_for_fencing(&self, failed: Option<&Arc<Link>>) -> Hold {
        let mut changes = self.watch_changes();
        loop {
            // Marked seen before the checks, so a change after them wakes the wait below.
            changes.borrow_and_update();
            let usable = self
                .link()
                .filter(|l| !l.is_quiet() && !failed.is_some_and(|f| Arc::ptr_eq(f, l)));
            // Role, fence and lease read in one step: no change can fall between them.
            let decision = {
                let st = self.state();
                hold_decision(
                    st.role(),
                    usable.is_some(),
                    st.fence(),
                    self.cfg.failover.fencing,
                    st.lease_valid(Instant::now()),
                )
            };
            match (decision, usable) {
                (HoldDecision::Retry, Some(link)) => return Hold::Retry(link),
                (HoldDecision::Degraded, _) => return Hold::Degraded,
                (HoldDecision::Fail(why), _) => return Hold::Fail(why),
                _ => {}
            }
            // Woken by a fence decision, a new link, a role change or a renewed lease (each
            // publishes a change). The node owns the sender, so this never ends early.
            let _ = changes.changed().await;
        }
    }

    /// The link to the peer went away (called by `link_lost`).
    pub(crate) fn on_link_lost(self: &Arc<Self>, peer_was_primary: bool) {
        let st = self.state();
        let action = super::rules::on_link_lost(
            st.role(),
            self.cfg.failover.fencing,
            self.cfg.failover.auto,
            st.disk(),
            peer_was_primary,
            &self.peer_cfg.name,
        );
        drop(st);
        match action {
            OnLinkLost::GoOnAlone(fence) => self.set_fence(fence),
            OnLinkLost::FencePeer(fence) => {
                self.set_fence(fence);
                self.duty(DutyEvent::FencePeer);
            }
            OnLinkLost::TakeOver => self.duty(DutyEvent::TakeOver),
            OnLinkLost::Note(note) => self.set_note(Some(note)),
            OnLinkLost::Nothing => {}
        }
    }

    fn fence_retry(&self) -> Duration {
        match self.cfg.failover.fencing {
            Fencing::Handler => HANDLER_RETRY,
            _ => FENCE_RETRY,
        }
    }

    async fn run_handler(&self) -> handler::HandlerOutcome {
        let path = self
            .cfg
            .failover
            .fence_handler
            .clone()
            .expect("handler fencing has a handler");
        let outcome = handler::run(
            &path,
            &self.cfg.resource.name,
            &self.me.name,
            &self.peer_cfg.name,
            &self.peer_cfg.replication,
            HANDLER_TIMEOUT,
        )
        .await;
        self.event(
            "fence-handler",
            json!({"handler": path, "outcome": format!("{outcome:?}")}),
        );
        outcome
    }

    fn record_peer_outdated(&self) {
        if let Err(e) = self.meta().update(|sb| sb.flags.peer_outdated = true) {
            tracing::error!("recording the outdated peer failed: {e}");
        }
    }

    /// `auto_promotion_blocked` for this node as it stands.
    fn takeover_blocked(&self, peer_was_primary: bool) -> Option<String> {
        let st = self.state();
        auto_promotion_blocked(
            self.cfg.failover.auto,
            self.cfg.failover.fencing,
            st.disk(),
            st.role(),
            peer_was_primary,
        )
    }

    /// Connected to a secondary peer, UpToDate, and this node lost the primary role without
    /// an operator asking while nobody took it over (e.g. its lease ran out during a link cut
    /// while the witness was down, and the peer's promotion was refused): take it back, the
    /// way a secondary takes over a lost primary. Called when a handshake or resync ends.
    pub(crate) fn retake_lost_role(self: &Arc<Self>) {
        let peer_secondary = self
            .link()
            .is_some_and(|l| l.peer.lock().unwrap().role == Role::Secondary);
        if peer_secondary && self.takeover_blocked(true).is_none() && self.state().lost_primary_role
        {
            tracing::warn!("nobody took over the primary role this node lost: taking it back");
            self.duty(DutyEvent::TakeOver);
        }
    }

    /// Connected to a peer whose copy is the same as this one, with neither UpToDate and
    /// nobody primary: nobody may promote without `--force`, forever. Ask the witness whether
    /// this node is the one whose copy no other can be newer than
    /// (`decide::reclaim_identical_copy`); if so, call it UpToDate again, take the role back
    /// like a node that lost it, and drop the link so the next handshake lifts the peer too.
    /// Called when a handshake or a resync ends; retries while the witness is unreachable.
    pub(crate) fn settle_identical_pair(self: &Arc<Self>) {
        if self.cfg.failover.fencing == Fencing::Witness {
            self.duty(DutyEvent::Settle);
        }
    }

    async fn reclaim_copy(self: &Arc<Self>, why: &str) {
        if !self.outdated_no_more(why) {
            return;
        }
        // The witness's holder: nobody took over from it, so it takes the role back.
        self.state().lost_primary_role = true;
        self.drop_link(
            "reconnecting: my copy is UpToDate again",
            "reconnecting: this copy is UpToDate again",
        )
        .await;
    }

    /// The peer is connected, UpToDate and not resyncing: it keeps every write of a new epoch.
    fn peer_connected_in_sync(&self) -> bool {
        self.link()
            .is_some_and(|l| l.peer.lock().unwrap().disk == DiskState::UpToDate)
            && self.state().conn() == super::runtime::Conn::Connected
    }

    /// Mark this node's data Outdated (persisted): it will not promote automatically.
    pub(crate) fn outdate_myself(&self, why: &str) {
        let (changed, failed) = {
            let mut st = self.state();
            records::outdated(&mut self.meta(), &mut st)
        };
        if let Some(e) = failed {
            tracing::error!("recording the outdated disk failed: {e}");
        }
        if changed {
            self.event("disk", json!({"disk": "Outdated", "reason": why}));
        }
    }

    /// Undo `outdate_myself` (persisted first); false if that failed, or if the copy is no
    /// longer Outdated (e.g. it became a sync target while the witness was asked).
    fn outdated_no_more(&self, why: &str) -> bool {
        let r = {
            let mut st = self.state();
            records::proven_current(&mut self.meta(), &mut st)
        };
        match r {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                tracing::error!("recording the UpToDate copy failed: {e}");
                return false;
            }
        }
        tracing::warn!("data UpToDate again: {why}");
        self.event("disk", json!({"disk": "UpToDate", "reason": why}));
        true
    }

    /// `become_primary` for an automatic promotion: a failure is what status shows.
    async fn auto_become_primary(
        self: &Arc<Self>,
        epoch: Option<u64>,
        why: &str,
        peer_fenced: bool,
    ) {
        let failed = self
            .become_primary(epoch, why, false, peer_fenced)
            .await
            .err();
        self.set_note(failed.map(|e| format!("not promoting: {e}")));
    }

    /// Take the primary role for `epoch` (persisted first). The new data generation is made
    /// lazily, before the first write acknowledged without the peer. `peer_fenced`: the
    /// fencing that granted the role fenced the peer too (see `rules::promotion_fence`).
    pub(crate) async fn become_primary(
        self: &Arc<Self>,
        epoch: Option<u64>,
        why: &str,
        forced: bool,
        peer_fenced: bool,
    ) -> Result<(), String> {
        let r = {
            let mut st = self.state();
            records::promotion(&mut self.meta(), &mut st, epoch)
        };
        if let Err(e) = r {
            // Not primary: a node that cannot persist its epoch and generation must not
            // acknowledge writes under them.
            let why = format!("cannot record the promotion: {e}");
            tracing::error!("{why}");
            self.event(
                "role",
                json!({"role": "secondary", "promotion_failed": why}),
            );
            return Err(why);
        }
        // Decided once the role is taken: a link lost from here on is fenced by `link_lost`
        // as a primary's, one lost before is seen here.
        match super::rules::promotion_fence(
            self.link().is_some(),
            peer_fenced,
            &self.peer_cfg.name,
            why,
        ) {
            OnLinkLost::FencePeer(fence) => {
                self.set_fence(fence);
                self.duty(DutyEvent::FencePeer);
            }
            OnLinkLost::GoOnAlone(fence) => self.set_fence(fence),
            _ => {}
        }
        let msg = format!("promoted to primary: {why}");
        if forced {
            tracing::warn!("{msg}");
        } else {
            tracing::info!("{msg}");
        }
        self.event(
            "role",
            json!({"role": "primary", "forced": forced, "epoch": self.meta().superblock().epoch, "reason": why}),
        );
        if let Some(epoch) = epoch {
            self.duty(DutyEvent::Promoted { epoch });
        }
        self.announce().await;
        // The peer was marked outdated on the way here but caught up meanwhile (its resync
        // ended before this node was primary, so that lift was not this node's to do).
        // The witness may hold a mark this node's metadata does not know of (an outdate
        // request that timed out here but reached the witness later): always clear it.
        if let Some(link) = self.link().filter(|_| self.peer_connected_in_sync()) {
            if self.meta().superblock().flags.peer_outdated
                || self.cfg.failover.fencing == Fencing::Witness
            {
                self.peer_in_sync(link.id);
            }
        }
        Ok(())
    }

    /// Stop being primary because this node may no longer acknowledge writes: held writes
    /// fail, NBD clients are disconnected, and the local data counts as Outdated (another node
    /// may hold the epoch now and have written what this copy lacks).
    pub(crate) fn lose_primary(&self, why: String) {
        self.step_down(why, true);
    }

    /// `lose_primary`; `stale`: mark the data Outdated.
    fn step_down(&self, why: String, stale: bool) {
        self.state().lease_dropped();
        self.set_fence(Fence::Lost(why.clone()));
        self.record_step_down(why, stale);
    }

    /// The role change of `step_down`, once the lease and the fence are given up.
    fn record_step_down(&self, why: String, stale: bool) {
        let (changed, failed) = {
            let mut st = self.state();
            records::stepped_down(&mut self.meta(), &mut st)
        };
        if !changed {
            return;
        }
        if let Some(e) = failed {
            tracing::error!("recording the demotion failed: {e}");
        }
        if stale {
            self.outdate_myself(&why);
        }
        tracing::error!("demoted to secondary: {why}");
        self.event("role", json!({"role": "secondary", "reason": why}));
        if let Some(kick) = self.kick_clients.get() {
            kick();
        }
        // Someone else holds a newer epoch: the link this node still has was made under the
        // old one. Drop it as a crash would, so the peer takes over if it may, and the next
        // handshake sorts out the copies under the new epoch.
        if let Some(link) = self.link() {
            tracing::warn!("dropping the link to {}: {why}", self.peer_cfg.name);
            link.close();
        }
    }

    /// Adopt a higher epoch the peer reported.
    pub(crate) fn adopt_epoch(&self, epoch: u64) {
        if epoch > self.meta().superblock().epoch {
            if let Err(e) = self.meta().update(|sb| sb.epoch = epoch) {
                tracing::error!("recording epoch {epoch} failed: {e}");
            }
        }
    }

    /// The peer is connected and UpToDate again on link `link`: lift its outdated mark
    /// (witness, then metadata) so it may take over if this node fails. Until the witness has
    /// cleared the mark, the peer cannot take over; status shows `failover.peer_outdated`
    /// meanwhile.
    pub(crate) fn peer_in_sync(self: &Arc<Self>, link: u64) {
        self.duty(DutyEvent::PeerInSync { link });
    }

    /// The witness lifted the peer's mark (or there is no witness): lift the metadata's.
    fn peer_mark_lifted(&self) {
        let lifted = {
            let st = self.state();
            records::peer_mark_lifted(&mut self.meta(), &st)
        };
        if matches!(lifted, Ok(true)) {
            self.event(
                "fencing",
                json!({"decision": "peer in sync", "peer": self.peer_cfg.name}),
            );
        }
    }

    /// Give up the lease after an orderly demotion, so the peer may take over at once.
    pub(crate) async fn release_lease(&self) {
        self.state().lease_dropped();
        if self.cfg.failover.fencing != Fencing::Witness {
            return;
        }
        let epoch = self.meta().superblock().epoch;
        if let Err(e) = self.witness(WRequest::Release { epoch }).await {
            tracing::warn!("cannot release the lease (it will expire): {e}");
        }
    }

    /// `switchover --to NAME` on the primary: drain, demote, hand the role to the peer.
    pub async fn switchover(self: &Arc<Self>, to: &str) -> Result<String, Failure> {
        if to == self.me.name && self.role() == Role::Primary {
            return Ok(format!("{to} is already primary"));
        }
        let Some(link) = self.link() else {
            return Err(Failure::refused(format!(
                "{} is not connected; switchover needs it Connected and UpToDate",
                self.peer_cfg.name
            )));
        };
        if to == self.me.name {
            // Asked on the secondary: the primary runs the switchover.
            let seq = link.next_seq();
            return match link
                .request(seq, &crate::repl::proto::Message::HandOver { seq })
                .await
            {
                Ok(crate::repl::link::Reply::Done) => Ok(format!("{to} is primary")),
                Ok(crate::repl::link::Reply::Error(e)) => Err(Failure::refused(e)),
                Ok(other) => Err(Failure::error(format!("unexpected reply {other:?}"))),
                Err(_) => Err(Failure::error("the link to the primary was lost")),
            };
        }
        if to != self.peer_cfg.name {
            return Err(Failure::error(format!(
                "no node {to:?} in resource {}",
                self.cfg.resource.name
            )));
        }
        if self.role() != Role::Primary {
            return Err(Failure::refused(format!(
                "{} is not primary; run switchover where the primary is",
                self.me.name
            )));
        }
        let (peer_disk, conn) = (link.peer.lock().unwrap().disk, self.state().conn());
        if peer_disk != DiskState::UpToDate || conn != super::runtime::Conn::Connected {
            return Err(Failure::refused(format!(
                "{to} is {} and the link is {}; switchover needs it Connected and UpToDate",
                peer_disk.as_str(),
                conn.as_str()
            )));
        }
        let started = Instant::now();
        self.state().set_switching(true);
        let r = self.hand_over(&link, to).await;
        self.state().set_switching(false);
        let ms = started.elapsed().as_millis();
        match r {
            Ok(()) => {
                self.event("switchover", json!({"to": to, "ms": ms}));
                Ok(format!("switched over to {to} in {ms} ms"))
            }
            Err(e) => Err(e),
        }
    }

    async fn hand_over(self: &Arc<Self>, link: &Arc<Link>, to: &str) -> Result<(), Failure> {
        // New clients are refused by the gate while `switching`; existing ones finish what
        // they sent and are disconnected.
        if let Some(kick) = self.kick_clients.get() {
            kick();
        }
        if let Some(clients) = self.nbd_clients.get() {
            let mut clients = clients.clone();
            let gone = clients.wait_for(|n| *n == 0);
            if tokio::time::timeout(Duration::from_secs(10), gone)
                .await
                .is_err()
            {
                return Err(Failure::error(
                    "NBD clients did not finish their requests within 10 s",
                ));
            }
        }
        self.store
            .flush()
            .await
            .map_err(|e| Failure::error(format!("flush failed: {e}")))?;
        {
            self.state().demoted();
            self.meta()
                .update(|sb| {
                    sb.flags.was_primary = false;
                    sb.gens.set_primary(false);
                })
                .map_err(|e| Failure::error(e.to_string()))?;
        }
        self.release_lease().await;
        self.set_fence(Fence::Clear);
        let why = format!("switchover to {to}");
        tracing::info!("demoted to secondary: {why}");
        self.event("role", json!({"role": "secondary", "reason": why}));
        self.announce().await;
        let seq = link.next_seq();
        match link
            .request(seq, &crate::repl::proto::Message::TakeOver { seq })
            .await
        {
            Ok(crate::repl::link::Reply::Done) => Ok(()),
            other => {
                // The peer did not take over: take the role back so the volume stays served.
                let why = match other {
                    Ok(crate::repl::link::Reply::Error(e)) => e,
                    Ok(r) => format!("unexpected reply {r:?}"),
                    Err(_) => "link lost".into(),
                };
                tracing::error!("{to} did not take over ({why}); taking the primary role back");
                let back = self.promote(false).await;
                Err(Failure::refused(format!(
                    "{to} did not take over: {why}; {}",
                    match back {
                        Ok(_) => format!("{} is primary again", self.me.name),
                        Err(e) =>
                            format!("and re-promoting {} failed: {}", self.me.name, e.message),
                    }
                )))
            }
        }
    }

    /// Status fields about failover.
    pub fn failover_json(&self) -> Value {
        json!({
            "fencing": self.cfg.failover.fencing.to_string(),
            "peer_outdated": self.role() == Role::Primary
                && self.meta().superblock().flags.peer_outdated,
            "auto": self.cfg.failover.auto,
            "fence": self.fence().to_json(),
            "note": self.state().failover_note(),
        })
    }
}

/// What the node hands the duty's driver.
pub(crate) enum DutyInput {
    Event(DutyEvent),
    /// `tandem primary [--force]`, answered on `reply`.
    Promote {
        force: bool,
        reply: tokio::sync::oneshot::Sender<Result<String, Failure>>,
    },
    /// The node is stopping: end the driver (its questions in flight are dropped).
    Stop,
}

impl Node {
    /// Hand an event to the witness duty's driver.
    pub(crate) fn duty(self: &Arc<Self>, ev: DutyEvent) {
        self.duty_input(DutyInput::Event(ev));
    }

    /// Hand something to the duty's driver, starting it on first use.
    pub(crate) fn duty_input(self: &Arc<Self>, input: DutyInput) {
        if let Some(rx) = self.duty_rx.lock().unwrap().take() {
            let task = tokio::spawn(run_duty(Arc::downgrade(self), rx));
            *self.duty_task.lock().unwrap() = Some(task);
        }
        // After `stop_duty` nobody reads this any more, which is what stopping means.
        let _ = self.duty_tx.send(input);
    }

    /// End the duty's driver before the runtime goes away (a timer polled while the runtime
    /// shuts down panics): no more fencing, renewals or promotions from here on.
    pub(crate) async fn stop_duty(&self) {
        // Never started: it never will be.
        drop(self.duty_rx.lock().unwrap().take());
        let _ = self.duty_tx.send(DutyInput::Stop);
        let task = self.duty_task.lock().unwrap().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Apply one event to the duty under the state lock, with what else it needs read in
    /// the same step.
    fn duty_apply(&self, core: &mut Duty, ev: DutyEvent) -> Vec<Effect> {
        let link = self.link();
        let (peer_up_to_date, peer_primary) = link.as_ref().map_or((false, false), |l| {
            let p = l.peer.lock().unwrap();
            (p.disk == DiskState::UpToDate, p.role == Role::Primary)
        });
        let mut st = self.state();
        let connected = st.conn() == super::runtime::Conn::Connected;
        let (epoch, peer_outdated, mine) = {
            let m = self.meta();
            let mine = connected.then(|| records::peer_state(&m, &st));
            (
                m.superblock().epoch,
                m.superblock().flags.peer_outdated,
                mine,
            )
        };
        let pair = link.as_ref().zip(mine).map(|(l, mine)| {
            let peer = Side::of(&self.peer_cfg.name, &l.peer.lock().unwrap());
            (Side::of(&self.me.name, &mine), peer)
        });
        let view = View {
            now: Instant::now(),
            epoch,
            link: link.map(|l| l.id),
            peer_connected_in_sync: peer_up_to_date && connected,
            peer_outdated,
            peer_primary,
            pair,
        };
        core.apply(&mut st, &view, ev)
    }
}

/// The driver of a node's witness duty: the one owner of its `Duty`, its timers and its
/// questions in flight. It takes the next event (from the node, a timer or an answer),
/// applies it, and runs the effects in order. Ends when the node is gone.
async fn run_duty(
    node: std::sync::Weak<Node>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<DutyInput>,
) {
    use std::collections::BTreeMap;
    let mut core = {
        let Some(n) = node.upgrade() else { return };
        Duty::new(
            &n.me.name,
            &n.peer_cfg.name,
            n.cfg.failover.fencing,
            n.cfg.failover.lease,
            n.fence_retry(),
        )
    };
    // Keyed by due time, then arrival, so equal times keep their order.
    let mut timers: BTreeMap<(Instant, u64), Tick> = BTreeMap::new();
    let mut armed = 0u64;
    // Each ends with the event it answers with, if any.
    let mut calls: tokio::task::JoinSet<Option<DutyEvent>> = tokio::task::JoinSet::new();
    // Events the driver itself gives back (`Event::LinksNotHeld`), taken before new ones.
    let mut own: Option<DutyEvent> = None;
    // Operators' requests waiting for their answer, by id.
    let mut replies = std::collections::HashMap::new();
    let mut requests = 0u64;
    loop {
        let due = timers.keys().next().map(|k| k.0);
        let ev = if let Some(ev) = own.take() {
            ev
        } else {
            tokio::select! {
            input = rx.recv() => match input {
                Some(DutyInput::Event(ev)) => ev,
                Some(DutyInput::Stop) | None => return,
                Some(DutyInput::Promote { force, reply }) => {
                    requests += 1;
                    replies.insert(requests, reply);
                    DutyEvent::Promote { id: requests, force }
                }
            },
            Some(done) = calls.join_next(), if !calls.is_empty() => match done {
                Ok(Some(ev)) => ev,
                Ok(None) => continue,
                // The runtime is shutting down.
                Err(e) if e.is_cancelled() => return,
                Err(e) => {
                    tracing::error!("a witness duty task failed: {e}");
                    continue;
                }
            },
            _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now).into()), if due.is_some() => {
                let (_, tick) = timers.pop_first().expect("a timer is due");
                DutyEvent::Tick(tick)
            }
            }
        };
        let Some(n) = node.upgrade() else { return };
        for effect in n.duty_apply(&mut core, ev) {
            match effect {
                Effect::Ask { ask, sent, limit } => {
                    let req = ask.request(&n.peer_cfg.name);
                    let n = n.clone();
                    calls.spawn(async move {
                        let reply = n
                            .witness_within(req, limit.unwrap_or(Duration::MAX))
                            .await
                            .map_err(|e| e.to_string());
                        Some(DutyEvent::Answer { ask, sent, reply })
                    });
                }
                Effect::RunHandler { takeover } => {
                    let up = n.state().disk() == DiskState::UpToDate;
                    let n = n.clone();
                    calls.spawn(async move {
                        let verdict = handler::decide(&n.run_handler().await, up);
                        Some(DutyEvent::Handler { takeover, verdict })
                    });
                }
                Effect::HoldLinks => {
                    if !n.hold_links() {
                        own = Some(DutyEvent::LinksNotHeld);
                        break;
                    }
                }
                Effect::ReleaseLinks => n.release_links(),
                Effect::BecomePrimary {
                    epoch,
                    why,
                    peer_fenced,
                    forced,
                    new_data,
                    reply,
                } => {
                    if let Some(epoch) = epoch {
                        n.event(
                            "fencing",
                            json!({"decision": "epoch granted", "epoch": epoch, "peer_outdated": peer_fenced}),
                        );
                    }
                    let reply = reply.and_then(|id| replies.remove(&id));
                    let n = n.clone();
                    calls.spawn(async move {
                        match reply {
                            Some(reply) => {
                                let r = n
                                    .operator_become_primary(
                                        epoch,
                                        &why,
                                        forced,
                                        peer_fenced,
                                        new_data,
                                    )
                                    .await;
                                let _ = reply.send(r);
                            }
                            None => {
                                n.auto_become_primary(epoch, &why, peer_fenced).await;
                                n.release_links();
                            }
                        }
                        Some(DutyEvent::PromotionEnded)
                    });
                }
                Effect::Reply { id, text } => {
                    if let Some(r) = replies.remove(&id) {
                        let _ = r.send(Ok(text));
                    }
                }
                Effect::Refuse { id, why } => {
                    if let Some(r) = replies.remove(&id) {
                        let _ = r.send(Err(Failure::refused(why)));
                    }
                }
                Effect::OutdateMyself(why) => n.outdate_myself(&why),
                Effect::Note(note) => n.set_note(note),
                Effect::Reclaim { why } => {
                    let n = n.clone();
                    calls.spawn(async move {
                        n.reclaim_copy(&why).await;
                        None
                    });
                }
                Effect::After(d, tick) => {
                    armed += 1;
                    timers.insert((Instant::now() + d, armed), tick);
                }
                Effect::Fenced(f) => n.fence_changed(&f),
                Effect::Changed => n.bump(),
                Effect::RecordPeerOutdated => n.record_peer_outdated(),
                Effect::PeerMarkLifted => n.peer_mark_lifted(),
                Effect::StepDown { why, stale, lapsed } => {
                    n.record_step_down(why, stale);
                    if lapsed.is_some() {
                        n.state().lapsed_in = lapsed;
                    }
                }
                Effect::UpToDateAgain { why } => {
                    n.outdated_no_more(&why);
                }
                Effect::Log(line) => tracing::warn!("{line}"),
            }
        }
    }
}
