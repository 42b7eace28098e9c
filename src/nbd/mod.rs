//! The NBD server: accepts clients, negotiates with `nbd-wire`'s handshake machine and runs
//! the pipelined transmission phase against a [`crate::store::BlockStore`].

pub mod addr;
mod conn;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use nbd_wire::consts::*;
use nbd_wire::transmission::MAX_PAYLOAD;
use nbd_wire::{ExportCatalog, ExportInfo, Outcome, Refusal, ServerHandshake};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

pub use addr::{ListenAddr, Listener, Stream};

use crate::store::SharedStore;

/// A client that has not finished negotiating by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests one connection may have in flight (the Linux client uses up to 128).
pub const MAX_IN_FLIGHT_PER_CONN: usize = 256;
/// Payload bytes held by all in-flight requests of the server together, in KiB.
const IN_FLIGHT_BUDGET_KIB: usize = 128 * 1024;

/// One export served over NBD.
pub struct Export {
    pub name: String,
    pub description: String,
    pub store: SharedStore,
    pub read_only: bool,
    /// Clients in the transmission phase; a watch, so a hand-over can wait for none.
    clients: watch::Sender<usize>,
    /// Bounds memory held by payloads and read buffers across all connections.
    budget: Arc<Semaphore>,
    /// Whether the export may be served now (a replicated secondary says no, naming the
    /// primary); consulted for every INFO, GO and EXPORT_NAME.
    gate: Option<Gate>,
    /// Bumped to make every connection stop reading, finish its in-flight requests and close
    /// (a primary handing over its role).
    kick: watch::Sender<u64>,
}

pub type Gate = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

impl Export {
    pub fn new(name: String, store: SharedStore, read_only: bool) -> Arc<Self> {
        Self::with_gate(name, store, read_only, None)
    }

    pub fn with_gate(
        name: String,
        store: SharedStore,
        read_only: bool,
        gate: Option<Gate>,
    ) -> Arc<Self> {
        let description = format!(
            "tandem {} export ({})",
            env!("CARGO_PKG_VERSION"),
            store.engine()
        );
        Arc::new(Self {
            name,
            description,
            store,
            read_only,
            clients: watch::channel(0).0,
            budget: Arc::new(Semaphore::new(IN_FLIGHT_BUDGET_KIB)),
            gate,
            kick: watch::channel(0).0,
        })
    }

    /// Close every client connection once its in-flight requests are answered. New clients
    /// are still accepted (the gate decides whether they may negotiate).
    pub fn kick_clients(&self) {
        self.kick.send_modify(|k| *k += 1);
    }

    /// Clients in the transmission phase now.
    pub fn clients(&self) -> usize {
        *self.clients.borrow()
    }

    /// The number of clients in the transmission phase, as it changes.
    pub fn watch_clients(&self) -> watch::Receiver<usize> {
        self.clients.subscribe()
    }

    fn transmission_flags(&self) -> u16 {
        // CAN_MULTI_CONN is honest because FLUSH is an fdatasync of the one backing file, so
        // it covers writes completed on every connection.
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        flags
    }
}

impl ExportCatalog for &Export {
    fn list(&self) -> Vec<(String, String)> {
        vec![(self.name.clone(), self.description.clone())]
    }

    fn lookup(&self, name: &str) -> Result<ExportInfo, Refusal> {
        // The empty name is the default export, and this server has exactly one.
        if !name.is_empty() && name != self.name {
            return Err(Refusal {
                code: REP_ERR_UNKNOWN,
                message: format!(
                    "no export named {name:?}; this server exports {:?}",
                    self.name
                ),
            });
        }
        if let Some(gate) = &self.gate {
            gate().map_err(|message| Refusal {
                code: REP_ERR_POLICY,
                message,
            })?;
        }
        Ok(ExportInfo {
            name: self.name.clone(),
            description: self.description.clone(),
            size: self.store.size(),
            transmission_flags: self.transmission_flags(),
            block_size: (1, 4096, MAX_PAYLOAD),
        })
    }
}

/// Serve `export` on `listener` until `shutdown` turns true; then stop accepting, let every
/// connection finish its in-flight requests, and flush the store.
pub async fn serve(
    listener: Listener,
    export: Arc<Export>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                match accepted {
                    Ok((stream, peer)) => {
                        let export = export.clone();
                        let shutdown = shutdown.clone();
                        conns.spawn(async move {
                            tracing::debug!(%peer, "client connected");
                            match handle_client(stream, &export, shutdown).await {
                                Ok(()) => tracing::debug!(%peer, "client disconnected"),
                                Err(e) if client_went_away(&e) => tracing::debug!(%peer, "client went away: {e}"),
                                Err(e) => tracing::info!(%peer, "client dropped: {e}"),
                            }
                        });
                    }
                    // Out of descriptors and similar: keep serving existing clients.
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() { break; }
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
    export.store.flush().await
}

fn client_went_away(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        BrokenPipe | ConnectionReset | NotConnected | UnexpectedEof
    )
}

async fn handle_client(
    stream: Stream,
    export: &Arc<Export>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    match stream {
        Stream::Tcp(mut s) => {
            let Some(neg) = negotiate(&mut s, export).await? else {
                return Ok(());
            };
            let (r, w) = s.into_split();
            conn::run(r, w, neg, export.clone(), shutdown).await
        }
        Stream::Unix(mut s) => {
            let Some(neg) = negotiate(&mut s, export).await? else {
                return Ok(());
            };
            let (r, w) = s.into_split();
            conn::run(r, w, neg, export.clone(), shutdown).await
        }
    }
}

/// Drive the handshake machine over the socket. `None` when the client aborted.
async fn negotiate<S>(
    stream: &mut S,
    export: &Arc<Export>,
) -> io::Result<Option<nbd_wire::Negotiated>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let work = async {
        let mut hs = ServerHandshake::new(&**export);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let out = hs.take_output();
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
            let want = hs.wants().min(buf.len());
            let n = stream.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed during handshake",
                ));
            }
            let (_, outcome) = hs
                .receive(&buf[..n])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match outcome {
                None => continue,
                Some(outcome) => {
                    let out = hs.take_output();
                    // The client may already be gone after ABORT; that is fine.
                    let sent = stream.write_all(&out).await;
                    return match outcome {
                        Outcome::Aborted => Ok(None),
                        Outcome::Transmission(n) => sent.map(|_| Some(n)),
                    };
                }
            }
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "handshake timed out",
        )),
    }
}
