//! The fencing witness: a small arbiter that grants epochs and primary leases, and remembers
//! which nodes are outdated, for any number of resources.
//!
//! All decisions go through one lock, one at a time, and each one that changes the stored
//! state is on disk (`DATA/<resource>.state`, fsynced) before it is answered. Nodes
//! authenticate with their resource's shared secret (`DATA/<resource>.secret`), and the
//! witness proves it knows the same secret (see [`proto`]).

pub mod proto;
pub mod state;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use proto::{Refusal, Reply, Request, WITNESS_PROTOCOL_VERSION};
pub use state::WitnessState;

use crate::nbd::addr::{ListenAddr, Listener, Stream};
use proto::{read_msg, write_msg, Message};

/// Connections served at once; more are dropped (bounded memory under a connection flood).
const MAX_CONNECTIONS: usize = 1024;

struct Shared {
    data: PathBuf,
    state: Mutex<WitnessState>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WitnessState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decide and persist on a blocking thread; the lock makes decisions linearisable.
    async fn decide(self: &Arc<Self>, resource: &str, node: &str, req: Request) -> Reply {
        let me = self.clone();
        let (resource, node) = (resource.to_owned(), node.to_owned());
        let task = tokio::task::spawn_blocking(move || {
            let mut st = me.lock();
            let now = Instant::now();
            st.apply_durably(&resource, &node, req, now, |res, p| {
                state::save(&me.data, res, p).map_err(|e| {
                    tracing::error!(
                        "cannot save {}: {e}",
                        state::state_path(&me.data, res).display()
                    );
                    e
                })
            })
        });
        task.await.unwrap_or_else(|e| {
            Reply::Refused(Refusal::Unavailable {
                reason: format!("decision task failed: {e}"),
            })
        })
    }
}

/// Read a resource's secret: file contents minus one trailing newline, as for the nodes'
/// `[net] secret_file`. Read on every handshake, so resources can be added without a restart.
fn read_secret(data: &Path, resource: &str) -> Result<Vec<u8>, String> {
    let path = data.join(format!("{resource}.secret"));
    let mut s = match std::fs::read(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "the witness does not serve resource {resource:?}: no secret file {}",
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    crate::secret::strip_line_end(&mut s);
    if s.is_empty() {
        return Err(format!("{} holds an empty secret", path.display()));
    }
    Ok(s)
}

/// Run the witness on `listen` with its state in `data` until `shutdown` completes.
pub async fn run(
    listen: &ListenAddr,
    data: &Path,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    // Arm the shutdown future (signal handlers) before anyone can see the witness listening.
    let stop_now =
        std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx).is_ready())).await;
    if stop_now {
        return Ok(());
    }
    let ctx = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    std::fs::create_dir_all(data).map_err(ctx(format!("cannot create {}", data.display())))?;
    let state = WitnessState::load(data, Instant::now())?;
    for (name, r) in &state.resources {
        let p = r.persisted();
        tracing::info!(
            "resource {name}: epoch {}, holder {}, outdated [{}]",
            p.epoch,
            p.holder.as_deref().unwrap_or("none"),
            p.outdated.join(", ")
        );
    }
    let listener = Listener::bind(listen)
        .await
        .map_err(ctx(format!("cannot listen on {listen}")))?;
    tracing::info!("witness listening on {}", listener.local_addr());
    let shared = Arc::new(Shared {
        data: data.to_owned(),
        state: Mutex::new(state),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        tracing::warn!("dropping connection from {peer}: {MAX_CONNECTIONS} already open");
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let _slot = slot;
                        match stream {
                            Stream::Tcp(s) => connection(s, &shared, &peer).await,
                            Stream::Unix(s) => connection(s, &shared, &peer).await,
                        }
                    });
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    tracing::warn!("witness accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Every answered decision is already on disk; unanswered ones may be dropped.
    conns.shutdown().await;
    tracing::info!("witness stopped");
    Ok(())
}

/// An authenticated connection's identity.
struct Peer {
    resource: String,
    node: String,
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: &Arc<Shared>, from: &str) {
    let peer = match tokio::time::timeout(proto::HANDSHAKE_TIMEOUT, handshake(&mut s, shared)).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!("connection from {from} closed during the handshake");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!("dropping connection from {from}: {e}");
            return;
        }
        Err(_) => {
            tracing::warn!("dropping connection from {from}: no handshake within 5 s");
            return;
        }
    };
    let who = format!("{}/{} ({from})", peer.resource, peer.node);
    tracing::debug!("{who} authenticated");
    loop {
        let req = match read_msg(&mut s).await {
            Ok(Message::Request(r)) => r,
            Ok(other) => {
                tracing::warn!("dropping {who}: expected a request, got {other:?}");
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                tracing::debug!("{who} disconnected");
                return;
            }
            Err(e) => {
                tracing::warn!("dropping {who}: {e}");
                return;
            }
        };
        let logged = !matches!(req, Request::Renew { .. } | Request::Query);
        let summary = logged.then(|| format!("{req:?}"));
        let reply = shared.decide(&peer.resource, &peer.node, req).await;
        if let Some(req) = summary {
            tracing::info!("{who}: {req} -> {reply}");
        }
        if let Err(e) = write_msg(&mut s, &Message::Reply(reply)).await {
            tracing::warn!("dropping {who}: {e}");
            return;
        }
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Refuse with a reason the client will show, then fail the connection with the same reason.
async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, reason: String) -> io::Error {
    let msg = Message::Refused {
        version: WITNESS_PROTOCOL_VERSION,
        reason: reason.clone(),
    };
    if let Err(e) = write_msg(s, &msg).await {
        return e;
    }
    bad(reason)
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    shared: &Arc<Shared>,
) -> io::Result<Peer> {
    let Message::Hello {
        version,
        resource,
        node,
        nonce: client_nonce,
    } = read_msg(s).await?
    else {
        return Err(bad("first message is not Hello".into()));
    };
    if version != WITNESS_PROTOCOL_VERSION {
        return Err(refuse(
            s,
            format!(
                "the witness speaks protocol version {WITNESS_PROTOCOL_VERSION}, the node {version}"
            ),
        )
        .await);
    }
    if !proto::valid_name(&resource) {
        return Err(refuse(
            s,
            format!(
                "{resource:?} is not a valid resource name (use letters, digits, '-', '_' and '.')"
            ),
        )
        .await);
    }
    if !proto::valid_name(&node) {
        return Err(refuse(
            s,
            format!("{node:?} is not a valid node name (use letters, digits, '-', '_' and '.')"),
        )
        .await);
    }
    let secret = match read_secret(&shared.data, &resource) {
        Ok(k) => k,
        Err(reason) => return Err(refuse(s, reason).await),
    };
    let nonce = proto::nonce()?;
    write_msg(
        s,
        &Message::Challenge {
            version: WITNESS_PROTOCOL_VERSION,
            nonce,
            proof: proto::witness_proof(&secret, &client_nonce, &resource, &node),
        },
    )
    .await?;
    let Message::Auth { proof } = read_msg(s).await? else {
        return Err(bad(format!("{resource}/{node}: expected Auth")));
    };
    if !proto::verify_node_proof(&secret, &nonce, &resource, &node, &proof) {
        return Err(refuse(
            s,
            format!(
                "authentication failed for node {node:?} of resource {resource:?}: \
                 wrong shared secret"
            ),
        )
        .await);
    }
    let epoch = shared.lock().epoch(&resource);
    write_msg(s, &Message::Welcome { epoch }).await?;
    Ok(Peer { resource, node })
}
