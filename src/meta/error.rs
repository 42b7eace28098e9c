//! Errors of the metadata layer. Every message names the metadata file.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why the metadata could not be created, opened, read or written.
#[derive(Debug)]
pub enum MetaError {
    /// The operating system refused an operation (`op` says which, e.g. "writing block 0").
    Io {
        path: PathBuf,
        op: String,
        source: io::Error,
    },
    /// A block that must be valid failed its checksum or holds impossible values.
    /// `region` is "superblock", "activity log" or "bitmap".
    Corrupt {
        path: PathBuf,
        block: u64,
        region: &'static str,
        what: String,
    },
    /// The metadata belongs to another resource, node or device size.
    Mismatch {
        path: PathBuf,
        field: &'static str,
        expected: String,
        found: String,
    },
    /// `create` found something it will only overwrite with `force`.
    Exists { path: PathBuf, detail: String },
    /// Block 0 does not carry the tandem magic.
    NotTandem { path: PathBuf },
    /// An argument the metadata cannot represent (name too long, device too large, a bitmap of
    /// the wrong length, ...).
    Invalid { path: PathBuf, reason: String },
    /// Another process holds the metadata open (exclusive `flock`).
    Busy { path: PathBuf },
}

impl MetaError {
    /// The metadata file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            MetaError::Io { path, .. }
            | MetaError::Corrupt { path, .. }
            | MetaError::Mismatch { path, .. }
            | MetaError::Exists { path, .. }
            | MetaError::NotTandem { path }
            | MetaError::Invalid { path, .. }
            | MetaError::Busy { path } => path,
        }
    }

    pub(crate) fn io(path: &Path, op: impl Into<String>, source: io::Error) -> Self {
        MetaError::Io {
            path: path.to_path_buf(),
            op: op.into(),
            source,
        }
    }

    pub(crate) fn corrupt(
        path: &Path,
        block: u64,
        region: &'static str,
        what: impl Into<String>,
    ) -> Self {
        MetaError::Corrupt {
            path: path.to_path_buf(),
            block,
            region,
            what: what.into(),
        }
    }

    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> Self {
        MetaError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::Io { path, op, source } => {
                write!(f, "{}: {op}: {source}", path.display())
            }
            MetaError::Corrupt {
                path,
                block,
                region,
                what,
            } => write!(f, "{}: block {block} ({region}) {what}", path.display()),
            MetaError::Mismatch {
                path,
                field,
                expected,
                found,
            } => write!(
                f,
                "{}: {field} mismatch: the metadata is for {field} {found}, expected {expected}",
                path.display()
            ),
            MetaError::Exists { path, detail } => write!(
                f,
                "{}: {detail}; refusing to overwrite it without --force",
                path.display()
            ),
            MetaError::NotTandem { path } => write!(
                f,
                "{}: not tandem metadata; run tandem create-md",
                path.display()
            ),
            MetaError::Invalid { path, reason } => write!(f, "{}: {reason}", path.display()),
            MetaError::Busy { path } => write!(
                f,
                "{}: metadata is in use by another process (locked)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for MetaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MetaError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_names_the_file() {
        let p = Path::new("/var/lib/tandem/a.meta");
        let errs = [
            MetaError::io(
                p,
                "writing block 0",
                io::Error::from_raw_os_error(libc::EIO),
            ),
            MetaError::corrupt(p, 3, "bitmap", "has a bad checksum"),
            MetaError::Mismatch {
                path: p.into(),
                field: "node",
                expected: "\"alpha\"".into(),
                found: "\"beta\"".into(),
            },
            MetaError::Exists {
                path: p.into(),
                detail: "holds valid tandem metadata".into(),
            },
            MetaError::NotTandem { path: p.into() },
            MetaError::invalid(p, "too large"),
            MetaError::Busy { path: p.into() },
        ];
        for e in &errs {
            let s = e.to_string();
            assert!(s.starts_with("/var/lib/tandem/a.meta: "), "{s}");
            assert_eq!(e.path(), p);
        }
        assert_eq!(
            errs[1].to_string(),
            "/var/lib/tandem/a.meta: block 3 (bitmap) has a bad checksum"
        );
        assert_eq!(
            errs[4].to_string(),
            "/var/lib/tandem/a.meta: not tandem metadata; run tandem create-md"
        );
    }
}
