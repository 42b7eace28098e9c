//! The states a node reports and its peer learns (DRBD's names): shared by the node and the
//! peer protocol.

use serde::{Deserialize, Serialize};

/// A node's role for the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of a node's local data, as DRBD names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskState {
    Diskless,
    /// Being written by a resync; not usable as a source.
    Inconsistent,
    /// Consistent but known to miss writes the peer has.
    Outdated,
    /// Consistent; whether it is the newest copy is not known (peer unreachable).
    Consistent,
    UpToDate,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Diskless => "Diskless",
            Self::Inconsistent => "Inconsistent",
            Self::Outdated => "Outdated",
            Self::Consistent => "Consistent",
            Self::UpToDate => "UpToDate",
        }
    }
}
