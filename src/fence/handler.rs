//! `fencing = "handler"`: run the operator's fence-peer command and read its exit code the way
//! DRBD's fence-peer interface defines it (reference/drbd.md §5.2).

use std::path::Path;
use std::time::Duration;

/// What the handler reported, by exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// 3: the peer's disk is already Inconsistent.
    PeerInconsistent,
    /// 4: the peer was outdated (or already was).
    PeerOutdated,
    /// 5: the peer is unreachable (assumed dead if this node is UpToDate).
    PeerUnreachable,
    /// 6: the peer refused: it is primary. This node must outdate itself.
    PeerIsPrimary,
    /// 7: the peer was fenced (powered off).
    PeerFenced,
    /// Anything else (including a handler that could not run or timed out).
    Broken(String),
}

impl HandlerOutcome {
    pub fn from_exit(code: Option<i32>) -> Self {
        match code {
            Some(3) => Self::PeerInconsistent,
            Some(4) => Self::PeerOutdated,
            Some(5) => Self::PeerUnreachable,
            Some(6) => Self::PeerIsPrimary,
            Some(7) => Self::PeerFenced,
            Some(c) => Self::Broken(format!("fence handler exited with {c}")),
            None => Self::Broken("fence handler was killed by a signal".into()),
        }
    }
}

/// What the node does with an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerDecision {
    /// The peer cannot acknowledge writes any more: promote, or go on without it.
    PeerFenced(String),
    /// The peer is primary: this node's data is outdated.
    OutdateMyself(String),
    /// Nothing proven: IO stays held and nobody promotes.
    Hold(String),
}

/// DRBD's table: 3, 4 and 7 prove the peer harmless; 5 only if this node's data is
/// UpToDate; 6 outdates this node; anything else proves nothing.
pub fn decide(outcome: &HandlerOutcome, my_disk_up_to_date: bool) -> HandlerDecision {
    use HandlerDecision::*;
    match outcome {
        HandlerOutcome::PeerInconsistent => PeerFenced("handler: peer is Inconsistent (3)".into()),
        HandlerOutcome::PeerOutdated => PeerFenced("handler: peer outdated (4)".into()),
        HandlerOutcome::PeerUnreachable if my_disk_up_to_date => {
            PeerFenced("handler: peer unreachable, assumed dead (5)".into())
        }
        HandlerOutcome::PeerUnreachable => {
            Hold("handler: peer unreachable (5), but this node is not UpToDate".into())
        }
        HandlerOutcome::PeerIsPrimary => {
            OutdateMyself("handler: peer is primary (6); outdating myself".into())
        }
        HandlerOutcome::PeerFenced => PeerFenced("handler: peer fenced (7)".into()),
        HandlerOutcome::Broken(why) => Hold(format!("{why}; IO stays held")),
    }
}

/// Run the handler with DRBD's environment names plus tandem's own; a handler that runs
/// longer than `timeout` is killed and counts as broken.
pub async fn run(
    path: &Path,
    resource: &str,
    me: &str,
    peer: &str,
    peer_address: &str,
    timeout: Duration,
) -> HandlerOutcome {
    let mut cmd = tokio::process::Command::new(path);
    cmd.env("DRBD_RESOURCE", resource)
        .env("DRBD_PEER", peer)
        .env("DRBD_PEER_ADDRESS", peer_address)
        .env("TANDEM_RESOURCE", resource)
        .env("TANDEM_NODE", me)
        .env("TANDEM_PEER", peer)
        .env("TANDEM_PEER_ADDRESS", peer_address)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return HandlerOutcome::Broken(format!("cannot run {}: {e}", path.display()));
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => HandlerOutcome::from_exit(status.code()),
        Ok(Err(e)) => HandlerOutcome::Broken(format!("waiting for {}: {e}", path.display())),
        Err(_) => HandlerOutcome::Broken(format!(
            "{} did not finish within {} s",
            path.display(),
            timeout.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drbd_exit_code_table() {
        let d = |c, up| decide(&HandlerOutcome::from_exit(c), up);
        assert!(matches!(d(Some(3), true), HandlerDecision::PeerFenced(_)));
        assert!(matches!(d(Some(4), false), HandlerDecision::PeerFenced(_)));
        assert!(matches!(d(Some(5), true), HandlerDecision::PeerFenced(_)));
        assert!(matches!(d(Some(5), false), HandlerDecision::Hold(_)));
        assert!(matches!(
            d(Some(6), true),
            HandlerDecision::OutdateMyself(_)
        ));
        assert!(matches!(d(Some(7), true), HandlerDecision::PeerFenced(_)));
        for c in [Some(0), Some(1), Some(2), Some(8), Some(255), None] {
            assert!(matches!(d(c, true), HandlerDecision::Hold(_)), "{c:?}");
        }
    }
}
