//! `tandem up`: run one node of the pair in the foreground until SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use tokio::sync::watch;

use super::replicated::ReplicatedStore;
use super::runtime::Node;
use super::Role;
use crate::config::Config;
use crate::failure::Failure;
use crate::meta::fault::{MetaFault, MetaFaults};
use crate::meta::Meta;
use crate::nbd::{self, Listener};
use crate::store::{self, BackingOptions, EngineChoice, FaultRule, FaultStore, SharedStore};

/// `up`'s hidden testing options.
#[derive(Debug, Default)]
pub struct Testing {
    /// Writes held in memory until a flush: a kill -9 loses them as an OS crash would.
    pub volatile_cache: bool,
    /// Storage and metadata faults, from this file (reloaded on SIGHUP).
    pub fault_file: Option<PathBuf>,
    /// The boot id instead of the kernel's.
    pub boot_id: Option<[u8; 16]>,
}

pub async fn up(config: &Path, name: &str, testing: Testing) -> Result<(), Failure> {
    let Testing {
        volatile_cache,
        fault_file,
        boot_id,
    } = testing;
    let fault_file = fault_file.as_deref();
    // With a fault file, SIGHUP reloads it; its handler goes in first, so a SIGHUP sent
    // while the node is still starting does not kill it (the default action).
    let hangup = match fault_file {
        Some(_) => Some(crate::signals::hangups()?),
        None => None,
    };
    let cfg = Config::load(config)?;
    let me = cfg.node(name)?.clone();
    let peer = cfg.peer(name)?.clone();
    let secret = cfg.secret()?;
    if let Some(w) = cfg.secret_permissions_warning() {
        tracing::warn!("{w}");
    }
    let backing =
        store::open_backing(&me.disk, &BackingOptions::default()).map_err(|e| e.to_string())?;
    let size = backing.size;
    // Before the metadata is opened (which empties the activity log after a crash): a killed
    // node's acknowledged writes may still be dirty in the page cache, and the activity log
    // is what marks them for resync. Made durable now, a later power loss cannot take them
    // back behind the log's back (found by the simulator).
    backing
        .file
        .sync_data()
        .map_err(|e| format!("{}: flushing the data disk: {e}", me.disk.display()))?;
    let boot = boot_id.unwrap_or_else(crate::meta::boot_id);
    let mut meta = Meta::open_booted(&me.meta, &cfg.resource.name, &me.name, size, boot)
        .map_err(|e| Failure::error(e.to_string()))?;
    let recovery = meta.recovery();
    if recovery.unclean {
        tracing::warn!(
            "{} was not shut down cleanly: marked {} bytes of {} activity-log extents out of sync{}",
            me.meta.display(),
            recovery.marked_bytes,
            recovery.replayed_extents.len(),
            if recovery.crashed_primary { "; this node crashed as primary" } else { "" }
        );
    }
    if recovery.rolled_back {
        tracing::warn!(
            "the machine went down with this node running (the boot id changed): writes it \
             acknowledged may have been lost with the page cache, so its copy is Outdated \
             until a full resync from the peer (or tandem primary --force)"
        );
    }
    let mut local = store::open_store(backing, EngineChoice::Auto)
        .map_err(|e| format!("{}: {e}", me.disk.display()))?;
    if let (Some(path), Some(mut hangup)) = (fault_file, hangup) {
        let (rules, meta_rules) = load_fault_file(path)?;
        let faults = Arc::new(FaultStore::new(local, rules));
        local = faults.clone() as SharedStore;
        let meta_faults = Arc::new(MetaFaults::new(meta_rules));
        meta.set_faults(meta_faults.clone());
        let path = path.to_path_buf();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                // A bad file keeps the rules in force: a half-written change never applies.
                match load_fault_file(&path) {
                    Ok((rules, meta_rules)) => {
                        faults.set_rules(rules);
                        meta_faults.set(meta_rules);
                    }
                    Err(e) => tracing::error!("{e}; keeping the previous fault rules"),
                }
            }
        });
    }
    if volatile_cache {
        tracing::warn!(
            "volatile write cache (testing): a kill loses every write since the last flush"
        );
        local = Arc::new(store::VolatileCache::new(local));
    }
    let node = Node::new(cfg.clone(), me.clone(), peer.clone(), secret, local, meta);

    let store: SharedStore = Arc::new(ReplicatedStore::new(node.clone()));
    let weak: Weak<Node> = Arc::downgrade(&node);
    let gate: nbd::Gate = Box::new(move || match weak.upgrade() {
        // Role and switchover read in one step.
        Some(n) if matches!(n.published.role_and_switching(), (Role::Primary, false)) => Ok(()),
        Some(n) if n.role() == Role::Primary => Err(format!(
            "node {} is handing the primary role for {} over to {} at {}",
            n.me.name, n.cfg.resource.name, n.peer_cfg.name, n.peer_cfg.nbd
        )),
        Some(n) => {
            let primary = n
                .link()
                .filter(|l| l.peer.lock().unwrap().role == Role::Primary);
            Err(match primary {
                Some(_) => format!(
                    "node {} is secondary for {}; the primary is {} at {}",
                    n.me.name, n.cfg.resource.name, n.peer_cfg.name, n.peer_cfg.nbd
                ),
                None => format!(
                    "node {} is secondary for {} and no primary is known (peer {} would serve at {})",
                    n.me.name, n.cfg.resource.name, n.peer_cfg.name, n.peer_cfg.nbd
                ),
            })
        }
        None => Err("shutting down".into()),
    });
    let export = nbd::Export::with_gate(cfg.resource.name.clone(), store, false, Some(gate));
    let _ = node.nbd_clients.set(export.watch_clients());
    let kicked = export.clone();
    let _ = node
        .kick_clients
        .set(Box::new(move || kicked.kick_clients()));

    let listener = Listener::bind(&me.nbd)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", me.nbd))?;
    let n = node.clone();
    let repl = tokio::spawn(async move { super::run_link(n).await });
    let n = node.clone();
    let control_path = me.control.clone();
    let control = tokio::spawn(async move { super::control::serve(n, &control_path).await });
    tracing::info!(
        "node {} of {} up: {} bytes, NBD on {}, replication on {}, control at {}",
        me.name,
        cfg.resource.name,
        size,
        me.nbd,
        me.replication,
        me.control.display()
    );
    node.event(
        "up",
        serde_json::json!({"disk": node.state().disk().as_str()}),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let n = node.clone();
    let stopper = tokio::spawn(async move {
        crate::signals::wait_for_signal().await;
        tracing::info!("shutting down {}: finishing in-flight requests", n.me.name);
        let _ = stop_tx.send(true);
    });
    let served = tokio::select! {
        r = nbd::serve(listener, export, stop_rx) => r.map_err(|e| format!("final flush failed: {e}")),
        r = repl => Err(match r {
            Ok(Err(e)) => format!("replication listener on {} failed: {e}", me.replication),
            _ => "replication listener stopped".into(),
        }),
        r = control => Err(match r {
            Ok(Err(e)) => format!("control socket {}: {e}", me.control.display()),
            _ => "control socket stopped".into(),
        }),
    };
    stopper.abort();
    // No fencing, renewal or promotion from here on; then, orderly: tell the peer, then
    // record a clean shutdown so nothing is replayed next time.
    node.stop_duty().await;
    let _ = node.disconnect().await;
    let closed = node.meta().close_clean();
    let _ = std::fs::remove_file(&me.control);
    served?;
    closed.map_err(|e| Failure::error(format!("recording the clean shutdown failed: {e}")))?;
    tracing::info!("node {} stopped cleanly", me.name);
    Ok(())
}

/// The fault file of `up --fault-file`: `meta:...` lines are metadata fault points
/// (`meta::fault`), the others the data store's rules (`store::fault`).
fn load_fault_file(path: &Path) -> Result<(Vec<FaultRule>, Vec<MetaFault>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the fault file {}: {e}", path.display()))?;
    let is_meta = |l: &str| l.trim_start().starts_with("meta:");
    // Metadata lines are blanked, not dropped, so errors keep their line numbers.
    let data: Vec<&str> = text
        .lines()
        .map(|l| if is_meta(l) { "" } else { l })
        .collect();
    let rules = store::parse_fault_rules(&data.join("\n"))
        .map_err(|e| format!("fault file {}: {e}", path.display()))?;
    let meta = text
        .lines()
        .enumerate()
        .filter(|(_, l)| is_meta(l))
        .map(|(i, l)| MetaFault::parse(l.trim()).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("fault file {}: {e}", path.display()))?;
    tracing::warn!(
        "fault injection (testing) from {}: {:?}; SIGHUP reloads it",
        path.display(),
        rules
            .iter()
            .map(ToString::to_string)
            .chain(meta.iter().map(ToString::to_string))
            .collect::<Vec<_>>()
    );
    Ok((rules, meta))
}
