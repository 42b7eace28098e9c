//! `tandem attach --device /dev/nbdN`: the kernel's own NBD client talks to the primary; this
//! process only sets the device up over netlink and, whenever the kernel reports the
//! connection dead, hands it a socket to whichever node is primary now.
//!
//! Nothing is lost meanwhile: new requests wait in the kernel for up to `dead_conn_timeout`
//! (the attach timeout), and requests that were in flight on the dead socket are requeued
//! when their request timeout expires, then replayed on the new socket. The same request
//! timeout is what turns a primary that stops answering into a dead link.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use kernel_nbd::{Device, LinkDeadListener};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::config::Config;

/// The kernel's per-request timeout: a primary silent for this long is declared dead, and
/// requests caught in flight by a failover are requeued after it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Between rounds over the nodes while none is primary.
const RETRY: Duration = Duration::from_millis(50);
/// Once the kernel has given up on waiting IO, keep looking, less often.
const SLOW_RETRY: Duration = Duration::from_secs(1);
/// One connection and handshake attempt: a stopped node must not stall the round.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `/dev/nbd3` (or `nbd3`) → 3.
pub fn device_index(path: &Path) -> Result<u32, String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("nbd"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{} is not an NBD device (/dev/nbdN)", path.display()))
}

/// The kernel's logical block size: the largest it supports that divides the export.
fn block_size(size: u64) -> u64 {
    if size.is_multiple_of(4096) {
        4096
    } else {
        512
    }
}

struct Primary {
    stream: TcpStream,
    node: String,
    size: u64,
    flags: u16,
}

impl Primary {
    /// The kernel drives the socket with blocking sends and receives.
    fn into_fd(self) -> io::Result<OwnedFd> {
        let s = self.stream.into_std()?;
        s.set_nonblocking(false)?;
        Ok(OwnedFd::from(s))
    }
}

/// One round over all nodes at once; the first to complete the handshake is the primary
/// (a secondary refuses). `size`, once known, must match: the kernel cannot change it.
async fn find_primary(
    nodes: &[(String, String)],
    export: &str,
    size: Option<u64>,
) -> Result<Primary, String> {
    let mut set = tokio::task::JoinSet::new();
    for (name, addr) in nodes.iter().cloned() {
        let export = export.to_owned();
        set.spawn(async move {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, super::negotiate(&addr, &export)).await;
            (name, r)
        });
    }
    let mut why = Vec::new();
    while let Some(done) = set.join_next().await {
        let Ok((node, r)) = done else { continue };
        match r {
            Ok(Ok((_, got, _))) if size.is_some_and(|want| want != got) => why.push(format!(
                "{node} exports {got} bytes, the device has {}",
                size.unwrap_or(0)
            )),
            Ok(Ok((stream, size, flags))) => {
                return Ok(Primary {
                    stream,
                    node,
                    size,
                    flags,
                })
            }
            Ok(Err(e)) => why.push(format!("{node}: {e}")),
            Err(_) => why.push(format!("{node}: no answer within {CONNECT_TIMEOUT:?}")),
        }
    }
    why.sort();
    Err(why.join("; "))
}

/// Rounds of [`find_primary`] until one succeeds or `stop` fires. After `wait` it says once
/// that the kernel is failing IO now, and slows down.
async fn wait_for_primary(
    nodes: &[(String, String)],
    export: &str,
    size: Option<u64>,
    wait: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<Result<Primary, String>> {
    let since = Instant::now();
    let mut seen = BTreeSet::new();
    let mut late = false;
    loop {
        match find_primary(nodes, export, size).await {
            Ok(p) => return Some(Ok(p)),
            Err(why) => {
                if seen.insert(why.clone()) {
                    tracing::info!("no primary yet: {why}");
                }
                if !late && since.elapsed() > wait {
                    if size.is_none() {
                        return Some(Err(format!("no primary within {wait:?}: {why}")));
                    }
                    tracing::error!(
                        "no primary within {wait:?}: the kernel now fails IO on the device; \
                         still looking"
                    );
                    late = true;
                }
            }
        }
        let pause = if late { SLOW_RETRY } else { RETRY };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return None,
        }
    }
}

/// LINK_DEAD notifications from a thread blocked on the netlink socket.
fn link_dead_events() -> Result<mpsc::UnboundedReceiver<io::Result<u32>>, String> {
    let mut listener = LinkDeadListener::new()
        .map_err(|e| format!("cannot listen for the kernel's LINK_DEAD notifications: {e}"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("link-dead".into())
        .spawn(move || loop {
            let r = listener.recv();
            let failed = r
                .as_ref()
                .is_err_and(|e| e.raw_os_error() != Some(libc::ENOBUFS));
            if tx.send(r).is_err() || failed {
                return;
            }
        })
        .map_err(|e| format!("cannot start the LINK_DEAD listener: {e}"))?;
    Ok(rx)
}

/// `tandem attach -c CONFIG --device /dev/nbdN`: run until SIGTERM/SIGINT, then disconnect.
pub async fn run(cfg: &Config, device: &Path, timeout: Option<Duration>) -> Result<(), String> {
    let index = device_index(device)?;
    let wait = timeout.unwrap_or(cfg.failover.attach_timeout);
    let export = cfg.resource.name.clone();
    let nodes: Vec<(String, String)> = cfg
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.nbd.to_string()))
        .collect();
    let (stop_tx, mut stop) = watch::channel(false);
    tokio::spawn(async move {
        crate::signals::wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    // Subscribe before CONNECT, so that a link dying at once is not missed.
    let mut dead = link_dead_events()?;
    tracing::info!(
        "attach for {export}: looking for the primary among {}",
        nodes
            .iter()
            .map(|(n, a)| format!("{n} ({a})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let Some(first) = wait_for_primary(&nodes, &export, None, wait, &mut stop).await else {
        return Ok(());
    };
    let first = first?;
    let (node, size, flags) = (first.node.clone(), first.size, first.flags);
    let fd = first
        .into_fd()
        .map_err(|e| format!("socket to {node}: {e}"))?;
    let dev = Device::connect(
        Some(index),
        fd,
        size,
        block_size(size),
        flags,
        REQUEST_TIMEOUT,
        wait,
    )
    .map_err(|e| format!("cannot connect /dev/nbd{index}: {e}"))?;
    tracing::info!(
        "/dev/nbd{index} connected to {node}: {size} bytes, block size {}, flags {flags:#x}, \
         request timeout {REQUEST_TIMEOUT:?}, dead connection timeout {wait:?}",
        block_size(size)
    );
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            ev = dead.recv() => match ev {
                Some(Ok(i)) if i == index => {
                    tracing::warn!("/dev/nbd{index}: the kernel reports the link dead; looking for the primary");
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("LINK_DEAD notifications were dropped; reconnecting /dev/nbd{index} in case");
                }
                Some(Err(e)) => return Err(format!("LINK_DEAD listener: {e}")),
                None => return Err("LINK_DEAD listener stopped".into()),
            }
        }
        let since = Instant::now();
        let Some(p) = wait_for_primary(&nodes, &export, Some(size), wait, &mut stop).await else {
            break;
        };
        let p = p?;
        let node = p.node.clone();
        if p.flags != flags {
            tracing::warn!(
                "{node} advertises flags {:#x}, the device was set up with {flags:#x}",
                p.flags
            );
        }
        let fd = p.into_fd().map_err(|e| format!("socket to {node}: {e}"))?;
        dev.reconfigure(fd)
            .map_err(|e| format!("cannot reconfigure /dev/nbd{index}: {e}"))?;
        tracing::info!(
            "/dev/nbd{index} reconnected to {node} {} ms after the link died",
            since.elapsed().as_millis()
        );
    }
    tracing::info!("/dev/nbd{index}: disconnecting");
    dev.disconnect()
        .map_err(|e| format!("cannot disconnect /dev/nbd{index}: {e}"))?;
    tracing::info!("/dev/nbd{index} disconnected");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths() {
        assert_eq!(device_index(Path::new("/dev/nbd0")), Ok(0));
        assert_eq!(device_index(Path::new("/dev/nbd15")), Ok(15));
        assert_eq!(device_index(Path::new("nbd2")), Ok(2));
        assert!(device_index(Path::new("/dev/sda")).is_err());
        assert!(device_index(Path::new("/dev/nbd")).is_err());
        assert!(device_index(Path::new("/dev/nbd0p1")).is_err());
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(64 << 20), 4096);
        assert_eq!(block_size(4096 * 3 + 512), 512);
    }
}
