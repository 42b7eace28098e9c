//! The node's side of its admin socket: one JSON request per line, one JSON reply per line
//! (`events` streams lines until the client goes away). The client is `crate::control`.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::runtime::Node;
use crate::failure::Failure;

pub async fn serve(node: Arc<Node>, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use: is this node already up?", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
            UnixListener::bind(path)?
        }
        Err(e) => return Err(e),
    };
    loop {
        let (sock, _) = listener.accept().await?;
        let n = node.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(n, sock).await {
                tracing::debug!("control client: {e}");
            }
        });
    }
}

async fn handle(node: Arc<Node>, sock: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = sock.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                reply(&mut w, &Err(Failure::usage(format!("bad request: {e}")))).await?;
                continue;
            }
        };
        let flag = |k: &str| req.get(k).and_then(Value::as_bool).unwrap_or(false);
        let result: Result<Value, Failure> = match req
            .get("cmd")
            .and_then(Value::as_str)
            .unwrap_or("")
        {
            "status" => Ok(node.status()),
            "primary" => node
                .promote(flag("force"))
                .await
                .map(|m| json!({"message": m})),
            "secondary" => node.demote().await.map(|m| json!({"message": m})),
            "switchover" => {
                let to = req.get("to").and_then(|v| v.as_str()).unwrap_or("");
                node.switchover(to).await.map(|m| json!({"message": m}))
            }
            "connect" => connect(&node, flag("discard_my_data")).await,
            "disconnect" => Ok(json!({"message": node.disconnect().await})),
            "invalidate" => node.invalidate().await.map(|m| json!({"message": m})),
            "verify" => {
                let run = tokio::spawn(super::resync::verify(node.clone()));
                if flag("wait") {
                    match run.await {
                        Ok(Ok(p)) => Ok(
                            json!({"message": "verify finished", "mismatched_bytes": p.mismatched_bytes,
                                               "done_bytes": p.done_bytes}),
                        ),
                        Ok(Err(e)) => Err(Failure::refused(e)),
                        Err(e) => Err(Failure::error(e.to_string())),
                    }
                } else {
                    Ok(json!({"message": "verify started"}))
                }
            }
            "events" => {
                let mut rx = node.subscribe_events();
                w.write_all(
                    format!(
                        "{}\n",
                        json!({"ok": true, "event": "subscribed", "status": node.status()})
                    )
                    .as_bytes(),
                )
                .await?;
                loop {
                    match rx.recv().await {
                        Ok(line) => w.write_all(format!("{line}\n").as_bytes()).await?,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            w.write_all(
                                format!("{}\n", json!({"event": "lagged", "missed": n})).as_bytes(),
                            )
                            .await?
                        }
                        Err(_) => return Ok(()),
                    }
                }
            }
            other => Err(Failure::usage(format!("unknown command {other:?}"))),
        };
        reply(&mut w, &result).await?;
    }
    Ok(())
}

/// Ask for the link and wait (briefly) for the handshake's verdict, so a split brain or a
/// refusal is reported to the operator with exit code 3.
async fn connect(node: &Node, discard_my_data: bool) -> Result<Value, Failure> {
    use crate::node::runtime::Conn;
    let message = node.connect(discard_my_data);
    let mut changes = node.watch_changes();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        {
            let st = node.state();
            if let Some(sb) = &st.split_brain {
                return Err(Failure::refused(format!("split brain detected: {sb}")));
            }
            if let Some(r) = &st.last_refusal {
                return Err(Failure::refused(format!("connection refused: {r}")));
            }
            if st.conn() != Conn::Connecting && st.conn() != Conn::StandAlone {
                return Ok(json!({"message": format!("connected ({})", st.conn().as_str())}));
            }
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return Ok(json!({"message": format!("{message} (peer not reachable yet)")}));
        }
    }
}

async fn reply(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Result<Value, Failure>,
) -> std::io::Result<()> {
    let v = match r {
        Ok(v) => json!({"ok": true, "result": v}),
        Err(e) => json!({"ok": false, "code": e.code, "error": e.message}),
    };
    w.write_all(format!("{v}\n").as_bytes()).await
}
