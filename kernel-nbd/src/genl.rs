//! A NETLINK_GENERIC socket: requests with acknowledgements, family lookup through `nlctrl`,
//! multicast membership.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::msg::{self, MsgBuilder};

/// The controller family's fixed id and its attributes (linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_VERSION: u8 = 2;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

/// A request the kernel has not answered in this long is reported, not waited on forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const RECV_BUF: usize = 64 * 1024;

/// A resolved generic-netlink family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub id: u16,
    /// Multicast groups: (name, id).
    pub groups: Vec<(String, u32)>,
}

/// A generic-netlink reply to a request: its command and raw attributes.
#[derive(Debug)]
pub struct Reply {
    pub cmd: u8,
    pub attrs: Vec<u8>,
}

impl Reply {
    pub fn u32(&self, kind: u16) -> Option<u32> {
        msg::attrs(&self.attrs)
            .ok()
            .and_then(|a| msg::find(&a, kind))
            .and_then(|a| a.u32().ok())
    }
}

pub struct GenlSocket {
    fd: OwnedFd,
    seq: AtomicU32,
    /// One request at a time, so that replies cannot interleave.
    busy: Mutex<()>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl GenlSocket {
    pub fn open() -> io::Result<GenlSocket> {
        // SAFETY: plain syscalls on a fresh descriptor that OwnedFd then owns.
        let fd = unsafe {
            let raw = cvt(libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            ))?;
            OwnedFd::from_raw_fd(raw)
        };
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        let s = GenlSocket {
            fd,
            seq: AtomicU32::new(1),
            busy: Mutex::new(()),
        };
        // Error text from the kernel where it gives one; short error echoes. Both optional.
        let _ = s.set_int(SOL_NETLINK, NETLINK_EXT_ACK, 1);
        let _ = s.set_int(SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let tv = libc::timeval {
            tv_sec: REQUEST_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        s.set_opt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        Ok(s)
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
        self.set_opt(level, name, &v)
    }

    fn set_opt<T>(&self, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
        // SAFETY: v points to a T of the given size.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                v as *const T as *const libc::c_void,
                mem::size_of::<T>() as libc::socklen_t,
            )
        })
        .map(drop)
    }

    pub fn join_group(&self, group: u32) -> io::Result<()> {
        // Multicast only: requests on this socket would time out waiting.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        };
        self.set_opt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        self.set_int(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group as libc::c_int)
    }

    fn send(&self, data: &[u8]) -> io::Result<()> {
        let mut to: libc::sockaddr_nl = unsafe { mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: data and `to` are valid for the lengths given.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    data.as_ptr() as *const libc::c_void,
                    data.len(),
                    0,
                    &to as *const libc::sockaddr_nl as *const libc::sockaddr,
                    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n as usize != data.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short netlink send",
                ));
            }
            return Ok(());
        }
    }

    /// Receive one datagram (blocking, or up to the socket's receive timeout).
    pub fn recv_datagram(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            // SAFETY: buf is valid for RECV_BUF bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the kernel did not answer within {REQUEST_TIMEOUT:?}"),
                        ))
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("netlink datagram of {n} bytes truncated"),
                ));
            }
            buf.truncate(n);
            return Ok(buf);
        }
    }

    /// Whether a datagram arrives within `timeout`.
    pub fn readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match cvt(unsafe { libc::poll(&mut p, 1, ms) }) {
            Ok(n) => Ok(n > 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Send the message `build(seq)` (which must ask for an ack) and collect the
    /// generic-netlink replies to it until the ack; an error ack becomes the error.
    pub fn request(&self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<Reply>> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.send(&build(seq))?;
        let mut replies = Vec::new();
        loop {
            let data = self.recv_datagram()?;
            for m in msg::messages(&data)? {
                if m.seq != seq {
                    continue; // a late answer to an earlier, timed-out request
                }
                match m.kind {
                    msg::NLMSG_ERROR => {
                        msg::error_msg(&m)?.into_result()?;
                        return Ok(replies);
                    }
                    msg::NLMSG_DONE => return Ok(replies),
                    msg::NLMSG_NOOP | msg::NLMSG_OVERRUN => {}
                    _ => {
                        let g = msg::genl(m.payload)?;
                        replies.push(Reply {
                            cmd: g.cmd,
                            attrs: g.attrs.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// Look a family up by name through `nlctrl`.
    pub fn resolve(&self, name: &str) -> io::Result<Family> {
        let replies = self.request(|seq| {
            let mut b = MsgBuilder::new(
                GENL_ID_CTRL,
                msg::NLM_F_REQUEST | msg::NLM_F_ACK,
                seq,
                CTRL_CMD_GETFAMILY,
                CTRL_VERSION,
            );
            b.put_str(CTRL_ATTR_FAMILY_NAME, name);
            b.finish()
        })?;
        let r = replies.first().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("nlctrl sent no description of family {name}"),
            )
        })?;
        parse_family(&r.attrs)
    }
}

/// The id and multicast groups from a CTRL_CMD_NEWFAMILY reply's attributes.
pub fn parse_family(attrs: &[u8]) -> io::Result<Family> {
    let a = msg::attrs(attrs)?;
    let id = msg::find(&a, CTRL_ATTR_FAMILY_ID)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "family reply without an id"))?
        .u16()?;
    let mut groups = Vec::new();
    if let Some(list) = msg::find(&a, CTRL_ATTR_MCAST_GROUPS) {
        // An array: each entry is a nested set of attributes, its type the array position.
        for entry in list.nested()? {
            let g = entry.nested()?;
            if let (Some(n), Some(i)) = (
                msg::find(&g, CTRL_ATTR_MCAST_GRP_NAME),
                msg::find(&g, CTRL_ATTR_MCAST_GRP_ID),
            ) {
                groups.push((n.str(), i.u32()?));
            }
        }
    }
    Ok(Family { id, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_reply_with_groups() {
        // Shaped like ctrl_fill_info: name, id, version, ..., MCAST_GROUPS[1]{id, name}.
        let mut b = MsgBuilder::new(GENL_ID_CTRL, 0, 1, 1, 2);
        b.put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        b.put_u16(CTRL_ATTR_FAMILY_ID, 0x1f);
        b.put_u32(3, 1); // CTRL_ATTR_VERSION
        b.begin_nested(CTRL_ATTR_MCAST_GROUPS);
        b.begin_nested(1);
        b.put_u32(CTRL_ATTR_MCAST_GRP_ID, 9);
        b.put_str(CTRL_ATTR_MCAST_GRP_NAME, "nbd_mc_group");
        b.end_nested();
        b.begin_nested(2);
        b.put_str(CTRL_ATTR_MCAST_GRP_NAME, "other");
        b.put_u32(CTRL_ATTR_MCAST_GRP_ID, 10);
        b.end_nested();
        b.end_nested();
        let m = b.finish();
        let msgs = msg::messages(&m).unwrap();
        let g = msg::genl(msgs[0].payload).unwrap();
        let f = parse_family(g.attrs).unwrap();
        assert_eq!(
            f,
            Family {
                id: 0x1f,
                groups: vec![("nbd_mc_group".into(), 9), ("other".into(), 10)],
            }
        );
    }

    #[test]
    fn family_reply_without_id_is_an_error() {
        let mut b = MsgBuilder::new(GENL_ID_CTRL, 0, 1, 1, 2);
        b.put_str(CTRL_ATTR_FAMILY_NAME, "nbd");
        let m = b.finish();
        let g = msg::genl(msg::messages(&m).unwrap()[0].payload).unwrap();
        assert!(parse_family(g.attrs).is_err());
    }

    /// Against the running kernel: nlctrl always exists and describes itself, and an
    /// unknown family is ENOENT (the error-ack path end to end).
    #[test]
    fn resolve_against_the_kernel() {
        let s = GenlSocket::open().unwrap();
        let f = s.resolve("nlctrl").unwrap();
        assert_eq!(f.id, GENL_ID_CTRL);
        assert!(f.groups.iter().any(|(n, _)| n == "notify"), "{f:?}");
        let e = s.resolve("nosuchfamily").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // Names longer than GENL_NAMSIZ fail the policy; the extended ack says so.
        let e = s.resolve("a-name-longer-than-sixteen").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("policy"), "{e}");
        // The socket is still usable after an error ack.
        assert_eq!(s.resolve("nlctrl").unwrap().id, GENL_ID_CTRL);
    }
}
