//! Why a command failed, and the exit code it maps to (DESIGN.md). One type for the CLI, the
//! control socket's refusals and the node's operations, so a refusal keeps its code from the
//! node to the shell.

/// Exit codes from the product contract.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const UNREACHABLE: u8 = 4;
}

/// A failed command: its exit code and what to print.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Exit code 1: something went wrong.
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            code: exit::ERROR,
            message: message.into(),
        }
    }

    /// Exit code 2: the request itself is wrong.
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: exit::USAGE,
            message: message.into(),
        }
    }

    /// Exit code 3: the node's state does not allow it (promotion refused, split brain
    /// unresolved, target not UpToDate).
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            code: exit::REFUSED,
            message: message.into(),
        }
    }

    /// Exit code 4: the daemon could not be reached.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            code: exit::UNREACHABLE,
            message: message.into(),
        }
    }
}

/// The control socket's answer `{"ok": false, "code": N, "error": "..."}` as a failure.
impl From<&serde_json::Value> for Failure {
    fn from(reply: &serde_json::Value) -> Self {
        Self {
            code: reply["code"].as_u64().map_or(exit::ERROR, |c| c as u8),
            message: reply["error"].as_str().unwrap_or("refused").to_owned(),
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Self::error(message)
    }
}

impl From<crate::config::ConfigError> for Failure {
    fn from(e: crate::config::ConfigError) -> Self {
        Self::error(e.to_string())
    }
}
