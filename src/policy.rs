//! Split-brain recovery policies (`[split_brain]` in the config), as DRBD names them.

use std::fmt;
use std::str::FromStr;

/// `after_sb_0pri`: neither node is primary when the split brain is found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AfterSb0Pri {
    #[default]
    Disconnect,
    /// The side that wrote nothing since the split becomes sync target.
    DiscardZeroChanges,
    /// The side with fewer out-of-sync blocks becomes sync target.
    DiscardLeastChanges,
    /// The side that became primary last (younger generation) becomes sync target.
    DiscardYoungerPrimary,
    /// The named node becomes sync target.
    DiscardNode(String),
}

/// `after_sb_1pri`: one node is primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb1Pri {
    #[default]
    Disconnect,
    /// Apply the after_sb_0pri verdict only if it discards the secondary.
    Consensus,
    /// The secondary becomes sync target.
    DiscardSecondary,
}

/// `after_sb_2pri`: both nodes are primary; only disconnecting is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSb2Pri {
    #[default]
    Disconnect,
}

impl FromStr for AfterSb0Pri {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disconnect" => Self::Disconnect,
            "discard-zero-changes" => Self::DiscardZeroChanges,
            "discard-least-changes" => Self::DiscardLeastChanges,
            "discard-younger-primary" => Self::DiscardYoungerPrimary,
            _ => match s.strip_prefix("discard-node-") {
                Some(n) if !n.is_empty() => Self::DiscardNode(n.to_owned()),
                _ => {
                    return Err(format!(
                        "{s:?}: expected disconnect, discard-zero-changes, discard-least-changes, \
                         discard-younger-primary or discard-node-NAME"
                    ))
                }
            },
        })
    }
}

impl FromStr for AfterSb1Pri {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disconnect" => Ok(Self::Disconnect),
            "consensus" => Ok(Self::Consensus),
            "discard-secondary" => Ok(Self::DiscardSecondary),
            _ => Err(format!(
                "{s:?}: expected disconnect, consensus or discard-secondary"
            )),
        }
    }
}

impl FromStr for AfterSb2Pri {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disconnect" => Ok(Self::Disconnect),
            _ => Err(format!("{s:?}: only disconnect is safe with two primaries")),
        }
    }
}

impl fmt::Display for AfterSb0Pri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disconnect => f.write_str("disconnect"),
            Self::DiscardZeroChanges => f.write_str("discard-zero-changes"),
            Self::DiscardLeastChanges => f.write_str("discard-least-changes"),
            Self::DiscardYoungerPrimary => f.write_str("discard-younger-primary"),
            Self::DiscardNode(n) => write!(f, "discard-node-{n}"),
        }
    }
}

/// The three policies together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SplitBrainPolicy {
    pub after_sb_0pri: AfterSb0Pri,
    pub after_sb_1pri: AfterSb1Pri,
    pub after_sb_2pri: AfterSb2Pri,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policies() {
        assert_eq!(
            "discard-node-beta".parse(),
            Ok(AfterSb0Pri::DiscardNode("beta".into()))
        );
        assert!("discard-node-".parse::<AfterSb0Pri>().is_err());
        assert_eq!("consensus".parse(), Ok(AfterSb1Pri::Consensus));
        assert!("discard-secondary".parse::<AfterSb2Pri>().is_err());
        assert_eq!(
            AfterSb0Pri::DiscardNode("x".into()).to_string(),
            "discard-node-x"
        );
    }
}
