//! The process's signals, in one place: SIGTERM and SIGINT stop whatever runs; SIGHUP
//! reloads what the running command can reload (a node's fault file).

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Wait for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// SIGHUPs from now on (installed at once, so an early SIGHUP does not kill the process).
pub fn hangups() -> Result<Signal, String> {
    signal(SignalKind::hangup()).map_err(|e| format!("cannot install the SIGHUP handler: {e}"))
}
