//! Named fault points in the metadata IO, for tests and `up --fault-file` (hidden): a rule
//! `meta:POINT:ACTION` makes every write to that region (or every fdatasync) fail with an
//! errno, without touching the file, until the rules change.

use std::fmt;
use std::sync::{PoisonError, RwLock};

/// Where a metadata write or sync lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaPoint {
    /// Block 0: generations, flags, epoch (every role change and resync end persists here).
    Superblock,
    /// The activity-log ring.
    ActivityLog,
    /// The out-of-sync bitmap blocks.
    Bitmap,
    /// Any fdatasync of the metadata file.
    Sync,
}

impl MetaPoint {
    fn name(self) -> &'static str {
        match self {
            MetaPoint::Superblock => "superblock",
            MetaPoint::ActivityLog => "al",
            MetaPoint::Bitmap => "bitmap",
            MetaPoint::Sync => "sync",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaFault {
    pub point: MetaPoint,
    pub errno: i32,
}

impl MetaFault {
    /// Parse `meta:POINT:ACTION`: POINT is superblock|al|bitmap|sync, ACTION is eio, enospc
    /// or errno=N.
    pub fn parse(s: &str) -> Result<MetaFault, String> {
        let err = |m: &str| format!("metadata fault rule {s:?}: {m}");
        let mut parts = s.split(':').map(str::trim);
        let (Some("meta"), Some(point), Some(action), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected meta:POINT:ACTION"));
        };
        let point = match point.to_ascii_lowercase().as_str() {
            "superblock" => MetaPoint::Superblock,
            "al" | "activity-log" => MetaPoint::ActivityLog,
            "bitmap" => MetaPoint::Bitmap,
            "sync" => MetaPoint::Sync,
            _ => return Err(err("unknown point (superblock, al, bitmap, sync)")),
        };
        let errno = match action.to_ascii_lowercase().as_str() {
            "eio" => libc::EIO,
            "enospc" => libc::ENOSPC,
            a => match a.strip_prefix("errno=").map(str::parse::<i32>) {
                Some(Ok(n)) if n > 0 => n,
                _ => return Err(err("unknown action (eio, enospc, errno=N)")),
            },
        };
        Ok(MetaFault { point, errno })
    }
}

impl fmt::Display for MetaFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "meta:{}:errno={}", self.point.name(), self.errno)
    }
}

/// The rules in force; shared between the node (which reloads them) and its `Meta`.
#[derive(Debug, Default)]
pub struct MetaFaults(RwLock<Vec<MetaFault>>);

impl MetaFaults {
    pub fn new(rules: Vec<MetaFault>) -> Self {
        Self(RwLock::new(rules))
    }

    pub fn set(&self, rules: Vec<MetaFault>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = rules;
    }

    /// The errno to fail an operation at `point` with, if a rule says so.
    pub(crate) fn check(&self, point: MetaPoint) -> Option<i32> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|r| r.point == point)
            .map(|r| r.errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        let r = MetaFault::parse("meta:superblock:eio").unwrap();
        assert_eq!(
            r,
            MetaFault {
                point: MetaPoint::Superblock,
                errno: libc::EIO
            }
        );
        assert_eq!(MetaFault::parse(&r.to_string()).unwrap(), r);
        assert_eq!(MetaFault::parse("meta:al:errno=28").unwrap().errno, 28);
        for bad in [
            "meta:superblock",
            "meta:disk:eio",
            "meta:sync:errno=0",
            "write:0-4K:eio",
        ] {
            assert!(MetaFault::parse(bad).is_err(), "{bad}");
        }
    }
}
