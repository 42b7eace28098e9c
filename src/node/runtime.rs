//! A running node: its state (role, disk, connection), its metadata, the current peer link,
//! and the operations the control socket asks for. Replication, resync and verify live in
//! `crate::repl`; they act on this state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

pub use super::core::{Conn, Progress, State};
use super::failover::Fence;
use super::Role;
use crate::config::{Config, NodeConfig};
use crate::failure::Failure;
use crate::meta::gen::hex;
use crate::meta::Meta;
use crate::repl::link::Link;
use crate::repl::proto::{Message, PeerState};
use crate::repl::ranges::RangeLocks;
use crate::store::SharedStore;

/// The current peer link, and whether new links are held off by a promotion.
#[derive(Default)]
struct LinkSlot {
    link: Option<Arc<Link>>,
    promoting: bool,
}

impl LinkSlot {
    fn live(&self) -> Option<Arc<Link>> {
        self.link.clone().filter(|l| !l.is_lost())
    }
}

pub struct Node {
    pub cfg: Config,
    pub me: NodeConfig,
    pub peer_cfg: NodeConfig,
    pub secret: Vec<u8>,
    /// The local backing store.
    pub store: SharedStore,
    pub size: u64,
    pub meta: Mutex<Meta>,
    st: Mutex<State>,
    /// The role and the switchover flag, published by `State` for the data path, which
    /// reads them without the state lock.
    pub published: Arc<super::core::Published>,
    link: Mutex<LinkSlot>,
    pub locks: RangeLocks,
    events: broadcast::Sender<String>,
    changed: watch::Sender<u64>,
    version: AtomicU64,
    /// Counts NBD clients in the transmission phase (installed by `up`).
    pub nbd_clients: std::sync::OnceLock<watch::Receiver<usize>>,
    /// Disconnects every NBD client once its in-flight requests are answered (installed by `up`).
    pub kick_clients: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    pub(crate) witness: tokio::sync::Mutex<Option<crate::fence::witness_client::WitnessClient>>,
    /// Events for the driver of the witness duty (`failover::run_duty`); its receiver waits
    /// here until the first event starts the driver.
    pub(crate) duty_tx: tokio::sync::mpsc::UnboundedSender<super::failover::DutyInput>,
    pub(crate) duty_rx:
        Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<super::failover::DutyInput>>>,
    /// The driver's task, once started (`failover::Node::stop_duty` ends it).
    pub(crate) duty_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Node {
    pub fn new(
        cfg: Config,
        me: NodeConfig,
        peer_cfg: NodeConfig,
        secret: Vec<u8>,
        store: SharedStore,
        meta: Meta,
    ) -> Arc<Node> {
        let disk = super::core::starting_disk(&meta.superblock().flags);
        let size = store.size();
        let (events, _) = broadcast::channel(1024);
        let (changed, _) = watch::channel(0);
        let (duty_tx, duty_rx) = tokio::sync::mpsc::unbounded_channel();
        let st = State::new(disk);
        Arc::new(Node {
            cfg,
            me,
            peer_cfg,
            secret,
            store,
            size,
            meta: Mutex::new(meta),
            published: st.published(),
            st: Mutex::new(st),
            link: Mutex::new(LinkSlot::default()),
            locks: RangeLocks::default(),
            events,
            changed,
            version: AtomicU64::new(0),
            nbd_clients: std::sync::OnceLock::new(),
            kick_clients: std::sync::OnceLock::new(),
            witness: tokio::sync::Mutex::new(None),
            duty_tx,
            duty_rx: Mutex::new(Some(duty_rx)),
            duty_task: Mutex::new(None),
        })
    }

    pub fn primary_when_peer_lost(&self) -> bool {
        self.state().primary_when_peer_lost()
    }

    pub fn nbd_clients(&self) -> usize {
        self.nbd_clients.get().map_or(0, |c| *c.borrow())
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap()
    }

    pub fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap()
    }

    /// The role as last published (no lock).
    pub fn role(&self) -> Role {
        self.published.role()
    }

    pub fn link(&self) -> Option<Arc<Link>> {
        self.link.lock().unwrap().live()
    }

    /// Install a new link; fails if one is already up or a promotion is under way.
    pub fn set_link(&self, link: Arc<Link>) -> Result<(), &'static str> {
        let mut slot = self.link.lock().unwrap();
        if slot.live().is_some() {
            return Err("another link came up first");
        }
        if slot.promoting {
            return Err("a promotion is under way");
        }
        slot.link = Some(link);
        Ok(())
    }

    /// Hold off new links while this node takes over from a lost primary: no link may come
    /// up between the decision to promote and the new role (a link that came up during the
    /// witness's round trip would carry the old primary's writes to a node that is about to
    /// accept its own). False if a link to a primary peer is up: it is back, nothing to take
    /// over. A link to a secondary peer (the old primary stepped down) stays.
    pub fn hold_links(&self) -> bool {
        let mut slot = self.link.lock().unwrap();
        if slot
            .live()
            .is_some_and(|l| l.peer.lock().unwrap().role == Role::Primary)
        {
            return false;
        }
        slot.promoting = true;
        true
    }

    /// Undo `hold_links`.
    pub fn release_links(&self) {
        self.link.lock().unwrap().promoting = false;
    }

    /// The link went away: forget it, and keep trying if the operator wants the link up.
    /// `orderly`: the peer said goodbye (it is alive), so a secondary does not take over.
    pub fn link_lost(self: &Arc<Self>, link: &Arc<Link>, why: &str, orderly: bool) {
        link.close();
        {
            let mut slot = self.link.lock().unwrap();
            if slot.link.as_ref().is_some_and(|l| Arc::ptr_eq(l, link)) {
                slot.link = None;
            } else {
                return;
            }
        }
        // Logged before the state changes, so whoever sees the new state finds the reason.
        tracing::warn!("connection to {} lost: {why}", self.peer_cfg.name);
        self.state().link_lost();
        self.event(
            "connection",
            json!({"state": "lost", "peer": self.peer_cfg.name, "reason": why}),
        );
        // What the peer acknowledged and has not flushed (emptied when it said goodbye).
        // Marked without a new generation: this node wrote nothing the peer did not see, so
        // if the peer was promoted meanwhile this is no split brain. With equal generations
        // the primary's leftover bits make it the sync source when the link is back.
        let unflushed = link.unflushed.take();
        if !unflushed.is_empty() {
            match super::records::unflushed_lost(&mut self.meta(), &unflushed) {
                Ok(()) => tracing::warn!(
                    "{} range(s) the peer acknowledged but had not flushed marked out of sync",
                    unflushed.len()
                ),
                Err(e) => tracing::error!("recording the peer's unflushed ranges failed: {e}"),
            }
        }
        let peer_was_primary = link.peer.lock().unwrap().role == Role::Primary;
        if self.role() == Role::Primary || !orderly {
            self.on_link_lost(peer_was_primary);
        }
    }

    /// Say goodbye to the peer (so it does not wait for its ping timeout) and drop the link.
    ///
    /// A goodbye promises that everything this node acknowledged is on stable storage, so the
    /// peer forgets what it kept against a crash of this node's operating system
    /// (`repl::unflushed`): acknowledgements stop, the local store is flushed, then the goodbye
    /// goes out. If the flush fails the link just closes and the peer marks what it kept.
    pub(crate) async fn drop_link(self: &Arc<Self>, reason_for_peer: &str, why: &str) {
        if let Some(link) = self.link() {
            // What this node sent and the peer has not flushed: ask it to, so it is not
            // marked for resync (empty during a handshake, when the peer reads no requests).
            if !link.unflushed.is_empty() {
                crate::repl::requests::peer_flush(&link).await;
            }
            link.quiesce();
            match self.store.flush().await {
                Ok(()) => link.say_goodbye(reason_for_peer).await,
                Err(e) => tracing::error!(
                    "flushing the disk before saying goodbye failed: {e}; closing without one"
                ),
            }
            self.link_lost(&link, why, true);
        }
    }

    /// Publish a state change: one JSON line on the events stream and a status bump.
    pub fn event(&self, kind: &str, detail: Value) {
        let mut v = json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "resource": self.cfg.resource.name,
            "node": self.me.name,
            "event": kind,
        });
        if let (Value::Object(m), Value::Object(d)) = (&mut v, detail) {
            m.extend(d);
        }
        let _ = self.events.send(v.to_string());
        self.bump();
    }

    pub fn bump(&self) {
        let n = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.changed.send(n);
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Flush the data disk before this copy may become another's source. The error is the
    /// caller's to weigh: a resync only logs it (a disk whose flush fails still sends what
    /// it reads), a forced promotion refuses.
    pub(super) async fn flush_as_source(&self) -> std::io::Result<()> {
        if crate::mutation::active(crate::mutation::Mutation::SourceFlush) {
            return Ok(());
        }
        self.store.flush().await
    }

    /// `flush_as_source`, logging a failure.
    pub(super) async fn flush_as_source_or_log(&self, before: &str) {
        if let Err(e) = self.flush_as_source().await {
            tracing::warn!("flushing the data disk before {before} failed: {e}");
        }
    }

    pub fn my_peer_state(&self) -> PeerState {
        let st = self.state();
        super::records::peer_state(&self.meta(), &st)
    }

    /// Tell the peer about a role or disk change.
    pub async fn announce(&self) {
        if let Some(link) = self.link() {
            let _ = link.send(&Message::State(self.my_peer_state())).await;
        }
    }

    pub fn status(&self) -> Value {
        // Before taking the state lock: these take it themselves.
        let lease = self.lease_json();
        let failover = self.failover_json();
        let st = self.state();
        let meta = self.meta();
        let sb = meta.superblock();
        let peer_state = self.link().map(|l| {
            let p = l.peer.lock().unwrap();
            (l.peer_node.clone(), p.role, p.disk)
        });
        let peer = peer_state.as_ref().map(|(node, role, disk)| {
            json!({"node": node, "role": role_str(*role), "disk": disk.as_str()})
        });
        let mut failover = failover;
        if let Value::Object(f) = &mut failover {
            // Connected, and neither side is primary or UpToDate: only an operator can help.
            let stuck = peer_state.as_ref().and_then(|(node, role, disk)| {
                let side = |name: &str, role, disk| {
                    crate::node::decide::Side::plain(name, sb.gens, role, disk)
                };
                crate::node::decide::nobody_promotable(
                    &side(&self.me.name, st.role(), st.disk()),
                    &side(node, *role, *disk),
                )
            });
            f.insert("no_promotable".into(), json!(stuck));
        }
        json!({
            "resource": self.cfg.resource.name,
            "node": self.me.name,
            "role": role_str(st.role()),
            "disk": st.disk().as_str(),
            "connection": st.conn().as_str(),
            "peer": peer,
            "split_brain": st.split_brain.is_some(),
            "split_brain_detail": st.split_brain,
            "last_refusal": st.last_refusal,
            "out_of_sync_bytes": meta.out_of_sync_bytes(),
            "resync": st.resync.as_ref().map(|p| p.to_json(false)),
            "verify": st.verify.as_ref().map(|p| p.to_json(true)),
            "last_verify": st.last_verify.as_ref().map(|p| p.to_json(true)),
            "generation": {
                "current": hex(sb.gens.current),
                "bitmap": hex(sb.gens.bitmap),
                "history": [hex(sb.gens.history[0]), hex(sb.gens.history[1])],
            },
            "epoch": sb.epoch,
            "lease": lease,
            "failover": failover,
            "nbd": {
                "listen": self.me.nbd.to_string(),
                "serving": st.role() == Role::Primary,
                "clients": self.nbd_clients(),
            },
            "engine": self.store.engine(),
            "illegal_transitions": st.illegal_transitions(),
        })
    }

    /// Persist a superblock change now (before anything depending on it is acknowledged).
    pub fn persist(&self, f: impl FnOnce(&mut crate::meta::Superblock)) -> Result<(), Failure> {
        self.meta()
            .update(f)
            .map_err(|e| Failure::error(format!("metadata write failed: {e}")))
    }

    /// `primary [--force]`.
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<String, Failure> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.duty_input(super::failover::DutyInput::Promote { force, reply });
        answer
            .await
            .unwrap_or_else(|_| Err(Failure::error("the node is shutting down")))
    }

    /// The end of `promote` once fencing allowed it: a copy that was not UpToDate (or a
    /// volume never written) becomes the reference, then the role is taken.
    pub(super) async fn operator_become_primary(
        self: &Arc<Self>,
        epoch: Option<u64>,
        why: &str,
        force: bool,
        peer_fenced: bool,
        new_data: bool,
    ) -> Result<String, Failure> {
        let fresh = self.meta().superblock().gens.current == crate::meta::gen::JUST_CREATED;
        let new_data = new_data || fresh;
        if new_data {
            // This node's data becomes the reference, under a new generation: what its page
            // cache holds (resync blocks not yet flushed) goes to disk first, or a power loss
            // would bring the copy back trusted (a bitmap generation: not rolled back)
            // without them (the simulator, seed 1646280).
            self.flush_as_source()
                .await
                .map_err(|e| Failure::error(format!("flush failed: {e}")))?;
            let mut st = self.state();
            super::records::forced_reference(&mut self.meta(), &mut st, fresh)
                .map_err(|e| Failure::error(format!("metadata write failed: {e}")))?;
        }
        self.become_primary(epoch, why, force, peer_fenced)
            .await
            .map_err(Failure::error)?;
        if new_data {
            // Re-run the sync handshake so the peer becomes the sync target at once.
            self.drop_link(
                "peer promoted with new data; re-handshaking",
                "re-handshaking after a forced promotion",
            )
            .await;
        }
        Ok(format!("promoted to primary: {why}"))
    }

    /// `secondary`.
    pub async fn demote(self: &Arc<Self>) -> Result<String, Failure> {
        if self.role() == Role::Secondary {
            return Ok("already secondary".into());
        }
        // A client that has just hung up (qemu-io has exited) may not be counted out yet:
        // give closing connections a moment, woken by the count rather than polled.
        if let Some(count) = self.nbd_clients.get() {
            let mut count = count.clone();
            let _ = tokio::time::timeout(Duration::from_secs(1), count.wait_for(|n| *n == 0)).await;
        }
        let clients = self.nbd_clients();
        if clients > 0 {
            return Err(Failure::refused(format!(
                "{clients} NBD client(s) still connected; disconnect them before demoting"
            )));
        }
        // Let in-flight writes finish and make them durable before giving up the role.
        self.store
            .flush()
            .await
            .map_err(|e| Failure::error(format!("flush failed: {e}")))?;
        self.persist(|sb| {
            sb.flags.was_primary = false;
            sb.gens.set_primary(false);
        })?;
        self.state().demoted();
        self.release_lease().await;
        self.set_fence(Fence::Clear);
        tracing::info!("demoted to secondary");
        self.event(
            "role",
            json!({"role": "secondary", "reason": "operator request"}),
        );
        self.announce().await;
        Ok("demoted to secondary".into())
    }

    /// `connect [--discard-my-data]`.
    pub fn connect(&self, discard_my_data: bool) -> String {
        self.state().connect(discard_my_data);
        self.event(
            "connection",
            json!({"state": "connecting", "discard_my_data": discard_my_data}),
        );
        if discard_my_data {
            "connecting; this node's data will be discarded if a split brain is found".into()
        } else {
            "connecting".into()
        }
    }

    /// `disconnect`.
    pub async fn disconnect(self: &Arc<Self>) -> String {
        self.state().disconnect();
        self.drop_link("peer disconnected by operator", "disconnected by operator")
            .await;
        // Whatever a handshake that ended meanwhile did, the link stays down.
        self.state().disconnect();
        self.event(
            "connection",
            json!({"state": "StandAlone", "reason": "operator request"}),
        );
        "disconnected".into()
    }

    /// `invalidate`: discard local data; a full resync from the peer follows.
    pub async fn invalidate(self: &Arc<Self>) -> Result<String, Failure> {
        if self.role() == Role::Primary {
            return Err(Failure::refused(
                "refusing to invalidate the primary's data; demote first",
            ));
        }
        {
            let mut st = self.state();
            super::records::invalidated(&mut self.meta(), &mut st)
                .map_err(|e| Failure::error(format!("metadata write failed: {e}")))?;
        }
        self.event(
            "disk",
            json!({"disk": "Inconsistent", "reason": "invalidate"}),
        );
        // Reconnect so the handshake makes the peer the sync source.
        self.drop_link(
            "peer invalidated its data",
            "invalidated; reconnecting for a full resync",
        )
        .await;
        Ok("data invalidated; a full resync from the peer follows".into())
    }
}

pub fn role_str(r: Role) -> &'static str {
    match r {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
    }
}
