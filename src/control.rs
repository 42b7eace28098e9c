//! The client of a running node's admin socket (`tandem status`, `primary`, ...): one JSON
//! request per line, one JSON reply per line. The node's side is `node::control`.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Send one request and read one reply. `Err` means the daemon is unreachable.
pub async fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let sock = UnixStream::connect(path).await?;
    let (r, mut w) = sock.into_split();
    w.write_all(format!("{req}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let line = lines.next_line().await?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "daemon closed the connection",
        )
    })?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Stream `events` lines to `out` until EOF.
pub async fn stream_events(path: &Path, mut out: impl FnMut(&str)) -> std::io::Result<()> {
    let sock = UnixStream::connect(path).await?;
    let (r, mut w) = sock.into_split();
    w.write_all(b"{\"cmd\":\"events\"}\n").await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        out(&line);
    }
    Ok(())
}
