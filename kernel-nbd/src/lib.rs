//! Attach a negotiated NBD socket to a Linux `/dev/nbdN` through the kernel's generic-netlink
//! family `nbd` (linux/nbd-netlink.h), swap in a new socket after a failover, and hear when
//! the kernel declares a connection dead.
//!
//! The kernel client is set up the way a failover needs (see the NBD notes, §5.3–5.4): a
//! request `timeout` so that a silent server is noticed (the request is requeued and the
//! socket marked dead), a `dead_conn_timeout` during which new requests wait for a
//! replacement socket instead of failing, and RECONFIGURE to hand over that replacement once
//! the kernel has multicast `LINK_DEAD`. Only netlink-created devices can be reconfigured.

mod genl;
pub mod msg;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use genl::{Family, GenlSocket};
use msg::MsgBuilder;

/// Generic-netlink family and multicast group names.
pub const FAMILY: &str = "nbd";
pub const MCAST_GROUP: &str = "nbd_mc_group";
pub const VERSION: u8 = 1;

/// Commands (`NBD_CMD_*`).
pub mod cmd {
    pub const CONNECT: u8 = 1;
    pub const DISCONNECT: u8 = 2;
    pub const RECONFIGURE: u8 = 3;
    pub const LINK_DEAD: u8 = 4;
    pub const STATUS: u8 = 5;
}

/// Attributes (`NBD_ATTR_*`), with the kernel's types.
pub mod attr {
    /// u32
    pub const INDEX: u16 = 1;
    /// u64
    pub const SIZE_BYTES: u16 = 2;
    /// u64
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// u64, seconds
    pub const TIMEOUT: u16 = 4;
    /// u64, the NBD transmission flags
    pub const SERVER_FLAGS: u16 = 5;
    /// u64, `NBD_CFLAG_*`
    pub const CLIENT_FLAGS: u16 = 6;
    /// nested: `SOCK_ITEM` { `SOCK_FD` u32 }
    pub const SOCKETS: u16 = 7;
    /// u64, seconds
    pub const DEAD_CONN_TIMEOUT: u16 = 8;
    pub const DEVICE_LIST: u16 = 9;
    /// `NBD_SOCK_ITEM`, inside `SOCKETS`
    pub const SOCK_ITEM: u16 = 1;
    /// `NBD_SOCK_FD`, inside `SOCK_ITEM`
    pub const SOCK_FD: u16 = 1;
}

/// A kernel NBD device configured by this process over netlink.
///
/// Dropping it leaves the device connected (the kernel holds the socket); call
/// [`Device::disconnect`] to tear it down.
pub struct Device {
    index: u32,
    family: u16,
    nl: GenlSocket,
}

impl Device {
    /// CONNECT `/dev/nbd{index}` (or the first free device when `index` is None) to `sock`,
    /// which must already have finished the NBD handshake. Returns the device the kernel used.
    ///
    /// `timeout` is the per-request timeout (whole seconds, rounded up; zero keeps the
    /// kernel's never-fail behaviour); `dead_conn_timeout` is how long requests wait for a
    /// RECONFIGURE after the connection died before failing with EIO.
    pub fn connect(
        index: Option<u32>,
        sock: OwnedFd,
        size: u64,
        block_size: u64,
        server_flags: u16,
        timeout: Duration,
        dead_conn_timeout: Duration,
    ) -> io::Result<Device> {
        let (nl, fam) = open_family()?;
        let replies = nl
            .request(|seq| {
                connect_msg(
                    fam.id,
                    seq,
                    &ConnectParams {
                        index,
                        fd: sock.as_raw_fd(),
                        size,
                        block_size,
                        server_flags,
                        timeout,
                        dead_conn_timeout,
                    },
                )
            })
            .map_err(|e| annotate(e, "NBD CONNECT"))?;
        // The kernel took its own reference to the socket during the request.
        drop(sock);
        let used = replies
            .iter()
            .filter(|r| r.cmd == cmd::CONNECT)
            .find_map(|r| r.u32(attr::INDEX))
            .or(index)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the kernel did not say which device it connected",
                )
            })?;
        Ok(Device {
            index: used,
            family: fam.id,
            nl,
        })
    }

    /// A handle on a device that is already connected (by this or another process), for
    /// [`Device::reconfigure`] and [`Device::disconnect`].
    pub fn open(index: u32) -> io::Result<Device> {
        let (nl, fam) = open_family()?;
        Ok(Device {
            index,
            family: fam.id,
            nl,
        })
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// Hand the kernel a replacement socket (already negotiated with the new server).
    ///
    /// The kernel puts it into the first dead connection slot. If no slot is dead it
    /// discards the socket and still reports success (its -ENOSPC becomes 0), so call this
    /// only after LINK_DEAD.
    pub fn reconfigure(&self, sock: OwnedFd) -> io::Result<()> {
        self.nl
            .request(|seq| reconfigure_msg(self.family, seq, self.index, sock.as_raw_fd()))
            .map_err(|e| annotate(e, "NBD RECONFIGURE"))?;
        Ok(())
    }

    /// Disconnect the device: the kernel sends NBD_CMD_DISC, shuts the sockets down and
    /// fails further requests.
    pub fn disconnect(self) -> io::Result<()> {
        self.nl
            .request(|seq| disconnect_msg(self.family, seq, self.index))
            .map_err(|e| annotate(e, "NBD DISCONNECT"))?;
        Ok(())
    }
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open_family() -> io::Result<(GenlSocket, Family)> {
    let nl = GenlSocket::open()?;
    let fam = nl.resolve(FAMILY).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                "the kernel has no generic netlink family \"nbd\": load the nbd module",
            )
        } else {
            e
        }
    })?;
    Ok((nl, fam))
}

/// Hears the kernel's LINK_DEAD multicasts: a connection of some device died (EOF, receive
/// error, failed send, or a request timeout).
pub struct LinkDeadListener {
    nl: GenlSocket,
    family: u16,
    pending: VecDeque<u32>,
}

impl LinkDeadListener {
    pub fn new() -> io::Result<LinkDeadListener> {
        let (nl, fam) = open_family()?;
        let group = fam
            .groups
            .iter()
            .find(|(name, _)| name == MCAST_GROUP)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the nbd family has no multicast group {MCAST_GROUP}"),
                )
            })?;
        nl.join_group(group)?;
        Ok(LinkDeadListener {
            nl,
            family: fam.id,
            pending: VecDeque::new(),
        })
    }

    /// Wait for the next LINK_DEAD and return the device index it names. An `ENOBUFS`
    /// error means notifications were dropped: treat every device as possibly dead.
    pub fn recv(&mut self) -> io::Result<u32> {
        loop {
            if let Some(i) = self.pending.pop_front() {
                return Ok(i);
            }
            self.fill(None)?;
        }
    }

    /// Like [`LinkDeadListener::recv`], giving up after `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> io::Result<Option<u32>> {
        if self.pending.is_empty() {
            self.fill(Some(timeout))?;
        }
        Ok(self.pending.pop_front())
    }

    fn fill(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if let Some(t) = timeout {
            if !self.nl.readable(t)? {
                return Ok(());
            }
        }
        let data = self.nl.recv_datagram()?;
        self.pending.extend(parse_link_dead(&data, self.family)?);
        Ok(())
    }
}

/// The device indexes named by the LINK_DEAD messages in one datagram.
pub fn parse_link_dead(datagram: &[u8], family: u16) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for m in msg::messages(datagram)? {
        if m.kind != family {
            continue;
        }
        let g = msg::genl(m.payload)?;
        if g.cmd != cmd::LINK_DEAD {
            continue;
        }
        if let Some(a) = msg::find(&msg::attrs(g.attrs)?, attr::INDEX) {
            out.push(a.u32()?);
        }
    }
    Ok(out)
}

/// Whole seconds for the kernel, rounded up so that a short timeout does not become zero
/// (which means "no timeout" to the kernel).
fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

struct ConnectParams {
    index: Option<u32>,
    fd: RawFd,
    size: u64,
    block_size: u64,
    server_flags: u16,
    timeout: Duration,
    dead_conn_timeout: Duration,
}

const REQ: u16 = msg::NLM_F_REQUEST | msg::NLM_F_ACK;

fn put_socket(b: &mut MsgBuilder, fd: RawFd) {
    b.begin_nested(attr::SOCKETS);
    b.begin_nested(attr::SOCK_ITEM);
    b.put_u32(attr::SOCK_FD, fd as u32);
    b.end_nested();
    b.end_nested();
}

fn connect_msg(family: u16, seq: u32, p: &ConnectParams) -> Vec<u8> {
    let mut b = MsgBuilder::new(family, REQ, seq, cmd::CONNECT, VERSION);
    if let Some(i) = p.index {
        b.put_u32(attr::INDEX, i);
    }
    b.put_u64(attr::SIZE_BYTES, p.size);
    b.put_u64(attr::BLOCK_SIZE_BYTES, p.block_size);
    b.put_u64(attr::TIMEOUT, secs(p.timeout));
    b.put_u64(attr::DEAD_CONN_TIMEOUT, secs(p.dead_conn_timeout));
    b.put_u64(attr::SERVER_FLAGS, u64::from(p.server_flags));
    put_socket(&mut b, p.fd);
    b.finish()
}

fn reconfigure_msg(family: u16, seq: u32, index: u32, fd: RawFd) -> Vec<u8> {
    let mut b = MsgBuilder::new(family, REQ, seq, cmd::RECONFIGURE, VERSION);
    b.put_u32(attr::INDEX, index);
    put_socket(&mut b, fd);
    b.finish()
}

fn disconnect_msg(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut b = MsgBuilder::new(family, REQ, seq, cmd::DISCONNECT, VERSION);
    b.put_u32(attr::INDEX, index);
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use msg::{attrs, find, genl, messages};

    #[test]
    fn connect_carries_every_setting_and_the_socket() {
        let m = connect_msg(
            27,
            3,
            &ConnectParams {
                index: Some(0),
                fd: 7,
                size: 64 << 20,
                block_size: 4096,
                server_flags: 0x4d,
                timeout: Duration::from_millis(4500),
                dead_conn_timeout: Duration::from_secs(30),
            },
        );
        let msgs = messages(&m).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].kind, 27);
        assert_eq!(msgs[0].flags, msg::NLM_F_REQUEST | msg::NLM_F_ACK);
        assert_eq!(msgs[0].seq, 3);
        let g = genl(msgs[0].payload).unwrap();
        assert_eq!((g.cmd, g.version), (cmd::CONNECT, VERSION));
        let a = attrs(g.attrs).unwrap();
        let get = |k| find(&a, k).unwrap();
        assert_eq!(get(attr::INDEX).u32().unwrap(), 0);
        assert_eq!(get(attr::SIZE_BYTES).u64().unwrap(), 64 << 20);
        assert_eq!(get(attr::BLOCK_SIZE_BYTES).u64().unwrap(), 4096);
        assert_eq!(get(attr::TIMEOUT).u64().unwrap(), 5, "rounded up");
        assert_eq!(get(attr::DEAD_CONN_TIMEOUT).u64().unwrap(), 30);
        assert_eq!(get(attr::SERVER_FLAGS).u64().unwrap(), 0x4d);
        let items = get(attr::SOCKETS).nested().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].kind, attr::SOCK_ITEM);
        let fd = items[0].nested().unwrap();
        assert_eq!(find(&fd, attr::SOCK_FD).unwrap().u32().unwrap(), 7);
        // Every attribute is 8-byte-payload or nested: no padding, lengths add up.
        assert_eq!(m.len(), 20 + 8 + 5 * 12 + (4 + 4 + 8));
    }

    #[test]
    fn connect_without_index_lets_the_kernel_choose() {
        let m = connect_msg(
            27,
            1,
            &ConnectParams {
                index: None,
                fd: 3,
                size: 1 << 20,
                block_size: 512,
                server_flags: 1,
                timeout: Duration::ZERO,
                dead_conn_timeout: Duration::ZERO,
            },
        );
        let msgs = messages(&m).unwrap();
        let a = attrs(genl(msgs[0].payload).unwrap().attrs).unwrap();
        assert!(find(&a, attr::INDEX).is_none());
        assert_eq!(find(&a, attr::TIMEOUT).unwrap().u64().unwrap(), 0);
    }

    #[test]
    fn reconfigure_and_disconnect_name_the_device() {
        let m = reconfigure_msg(27, 8, 3, 11);
        let msgs = messages(&m).unwrap();
        let g = genl(msgs[0].payload).unwrap();
        assert_eq!(g.cmd, cmd::RECONFIGURE);
        let a = attrs(g.attrs).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(find(&a, attr::INDEX).unwrap().u32().unwrap(), 3);
        let item = find(&a, attr::SOCKETS).unwrap().nested().unwrap();
        let fd = item[0].nested().unwrap();
        assert_eq!(fd[0].u32().unwrap(), 11);

        let m = disconnect_msg(27, 9, 3);
        let msgs = messages(&m).unwrap();
        let g = genl(msgs[0].payload).unwrap();
        assert_eq!(g.cmd, cmd::DISCONNECT);
        let a = attrs(g.attrs).unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].u32().unwrap(), 3);
    }

    #[test]
    fn link_dead_is_parsed_and_other_messages_are_ignored() {
        // As nbd_mcast_index builds it: seq 0, pid 0, cmd LINK_DEAD, INDEX.
        let mut dead = MsgBuilder::new(27, 0, 0, cmd::LINK_DEAD, VERSION);
        dead.put_u32(attr::INDEX, 2);
        let mut other_cmd = MsgBuilder::new(27, 0, 0, cmd::STATUS, VERSION);
        other_cmd.put_u32(attr::INDEX, 5);
        let mut other_family = MsgBuilder::new(28, 0, 0, cmd::LINK_DEAD, VERSION);
        other_family.put_u32(attr::INDEX, 6);
        let mut d = other_cmd.finish();
        d.extend(dead.finish());
        d.extend(other_family.finish());
        assert_eq!(parse_link_dead(&d, 27).unwrap(), vec![2]);
        assert!(parse_link_dead(&d[..10], 27).is_err());
    }

    /// Without the nbd module (as on a host that lacks it) the error says what is missing.
    #[test]
    fn a_missing_module_is_named() {
        match Device::open(0) {
            Ok(d) => assert_eq!(d.index(), 0),
            Err(e) => {
                assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
                assert!(e.to_string().contains("nbd module"), "{e}");
            }
        }
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(secs(Duration::ZERO), 0);
        assert_eq!(secs(Duration::from_millis(1)), 1);
        assert_eq!(secs(Duration::from_secs(30)), 30);
        assert_eq!(secs(Duration::from_millis(30_001)), 31);
    }
}
