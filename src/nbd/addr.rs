//! Listen addresses (`HOST:PORT` or `unix:PATH`) and the listeners behind them.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: address needs a path, e.g. unix:/run/tandem.sock".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not HOST:PORT or unix:PATH"))?;
        if host.is_empty() {
            return Err(format!(
                "{s:?} has no host (use 0.0.0.0:{port} for all addresses)"
            ));
        }
        port.parse::<u16>()
            .map_err(|_| format!("{s:?}: port {port:?} is not a number from 0 to 65535"))?;
        Ok(Self::Tcp(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => f.write_str(a),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// An accepted client connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    pub async fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Tcp(a) => Ok(Self::Tcp(TcpListener::bind(a.as_str()).await?)),
            ListenAddr::Unix(path) => {
                match UnixListener::bind(path) {
                    Ok(l) => Ok(Self::Unix(l, path.clone())),
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                        // A socket file left by a process that died: replace it, but never
                        // steal the address from a live server.
                        if UnixStream::connect(path).await.is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is in use by a running server", path.display()),
                            ));
                        }
                        std::fs::remove_file(path)?;
                        Ok(Self::Unix(UnixListener::bind(path)?, path.clone()))
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> String {
        match self {
            Self::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Self::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), "unix".to_owned()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            "127.0.0.1:10809".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!("[::1]:1".parse(), Ok(ListenAddr::Tcp("[::1]:1".into())));
        assert_eq!("unix:/tmp/x".parse(), Ok(ListenAddr::Unix("/tmp/x".into())));
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("localhost".parse::<ListenAddr>().is_err());
        assert!(":80".parse::<ListenAddr>().is_err());
        assert!("h:99999".parse::<ListenAddr>().is_err());
    }
}
