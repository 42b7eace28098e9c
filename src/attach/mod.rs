//! `tandem attach`: a local NBD endpoint for one resource that forwards every request to
//! whichever node is primary. When the primary is lost it keeps each unanswered request with
//! its payload, finds the new primary and replays them, so clients see latency, not errors.
//! Memory is bounded by the local server's in-flight limits (per connection and total
//! payload budget): a full window stops reading from the client.

mod device;
mod upstream;

use std::io;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

pub use device::run as run_device;
pub use upstream::{negotiate, Op, Target};

use crate::config::Config;
use crate::nbd::{self, ListenAddr, Listener};
use crate::store::{BlockStore, Extent, IoFuture};

/// Requests queued towards the upstream connection before callers wait.
const QUEUE: usize = 1024;

/// The block store the local NBD server serves: each operation is a request to the primary.
pub struct FollowStore {
    size: u64,
    tx: mpsc::Sender<upstream::Submit>,
    status: Arc<Mutex<String>>,
}

impl FollowStore {
    pub fn start(target: Target) -> Arc<FollowStore> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let status = Arc::new(Mutex::new("connecting".to_owned()));
        let size = target.size;
        tokio::spawn(upstream::run(target, rx, status.clone()));
        Arc::new(FollowStore { size, tx, status })
    }

    /// Which node is followed, or why none is.
    pub fn status(&self) -> String {
        self.status.lock().unwrap().clone()
    }

    async fn call(&self, op: Op, offset: u64) -> io::Result<Bytes> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(upstream::Submit { op, offset, done })
            .await
            .map_err(|_| io::Error::from_raw_os_error(libc::ESHUTDOWN))?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::from_raw_os_error(libc::EIO)))
    }
}

impl BlockStore for FollowStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        Box::pin(self.call(Op::Read { len: len as u32 }, offset))
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move { self.call(Op::Write { data, fua }, offset).await.map(drop) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.call(Op::Flush, 0).await.map(drop) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            for (o, l) in chunks(offset, len) {
                self.call(Op::Trim { len: l }, o).await?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            for (o, l) in chunks(offset, len) {
                let op = Op::Zero {
                    len: l,
                    no_hole: !may_trim,
                };
                self.call(op, o).await?;
            }
            Ok(())
        })
    }

    /// Allocation is not forwarded: everything reads as data, which the spec allows.
    fn extents(&self, offset: u64, len: u64, _max: usize) -> IoFuture<'_, Vec<Extent>> {
        let end = (offset + len).min(self.size);
        Box::pin(async move {
            Ok(vec![Extent {
                length: end.saturating_sub(offset).max(1),
                hole: false,
            }])
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            for (o, l) in chunks(offset, len) {
                self.call(Op::Cache { len: l }, o).await?;
            }
            Ok(())
        })
    }

    fn engine(&self) -> &'static str {
        "attach"
    }
}

/// NBD lengths are 32-bit; the local server may pass longer trims and zeroings.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    const MAX: u64 = 1 << 30;
    (0..len.div_ceil(MAX)).map(move |i| {
        let o = offset + i * MAX;
        (o, (len - i * MAX).min(MAX) as u32)
    })
}

/// The volume size as the pair exports it: asked from whichever node answers first.
async fn probe_size(target: &Target) -> Result<u64, String> {
    let deadline = tokio::time::Instant::now() + target.timeout;
    loop {
        let mut why = Vec::new();
        for (name, addr) in &target.nodes {
            match negotiate(addr, &target.export).await {
                Ok((_, size, _)) => return Ok(size),
                Err(e) => why.push(format!("{name}: {e}")),
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "no node serves {}: {}",
                target.export,
                why.join("; ")
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `tandem attach -c CONFIG --listen ADDR`: serve until SIGTERM/SIGINT.
pub async fn run(
    cfg: &Config,
    listen: &ListenAddr,
    timeout: Option<std::time::Duration>,
) -> Result<(), String> {
    let mut target = Target {
        export: cfg.resource.name.clone(),
        nodes: cfg
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.nbd.to_string()))
            .collect(),
        size: 0,
        timeout: timeout.unwrap_or(cfg.failover.attach_timeout),
    };
    target.size = probe_size(&target).await?;
    let store = FollowStore::start(target.clone());
    let export = nbd::Export::new(cfg.resource.name.clone(), store, false);
    let listener = Listener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    tracing::info!(
        "attach for {} listening on {listen}: {} bytes, following the primary of {}",
        cfg.resource.name,
        target.size,
        target
            .nodes
            .iter()
            .map(|(n, a)| format!("{n} ({a})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopper = tokio::spawn(async move {
        crate::signals::wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let r = nbd::serve(listener, export, stop_rx).await;
    stopper.abort();
    r.map_err(|e| format!("final flush failed: {e}"))
}
