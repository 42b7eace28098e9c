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

/// The state of a node's local data, as DRBD names them. DRBD's Diskless (a detached disk)
/// comes with detach, which is not built; its Consistent (current or not, unknown) is not
/// needed: a node knows from its metadata flags whether its copy is UpToDate or Outdated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskState {
    /// Being written by a resync; not usable as a source.
    Inconsistent,
    /// Consistent but known to miss writes the peer has.
    Outdated,
    UpToDate,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inconsistent => "Inconsistent",
            Self::Outdated => "Outdated",
            Self::UpToDate => "UpToDate",
        }
    }
}
