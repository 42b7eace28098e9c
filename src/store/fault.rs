//! A wrapper that injects errors and delays into chosen byte ranges, for tests and for
//! exercising replication failure paths from the command line (`OP:START-END:ACTION`).

use std::fmt;
use std::io;
use std::str::FromStr;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;

use super::{BlockStore, Extent, IoFuture, SharedStore};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// Every operation, including `extents` and `cache`.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail with this errno, without touching the inner store.
    Error(i32),
    /// Sleep, then carry on (with the next matching rule or the inner store).
    Delay(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    pub op: OpKind,
    pub start: u64,
    pub end: u64,
    pub action: FaultAction,
}

/// Which operation is being checked; `Extents` and `Cache` only match `OpKind::Any`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Kind(OpKind),
    Extents,
    Cache,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) => match c.to_ascii_uppercase() {
            'K' => (&s[..i], 10),
            'M' => (&s[..i], 20),
            'G' => (&s[..i], 30),
            'T' => (&s[..i], 40),
            _ => (s, 0),
        },
        None => return Err("empty offset".into()),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("bad offset {s:?} (expected e.g. 4096, 64K, 1M, 2G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("offset {s:?} is too large"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("delay {s:?} needs a unit (ns, us, ms, s)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad delay {s:?} (expected e.g. 50ms, 2s)"))?;
    let ns_per_unit = match unit {
        "ns" => 1.0,
        "us" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        "m" | "min" => 60e9,
        _ => {
            return Err(format!(
                "bad delay unit {unit:?} in {s:?} (ns, us, ms, s, m)"
            ))
        }
    };
    let ns = (n * ns_per_unit).round();
    if !(0.0..=u64::MAX as f64).contains(&ns) {
        return Err(format!("delay {s:?} is out of range"));
    }
    Ok(Duration::from_nanos(ns as u64))
}

impl FaultRule {
    /// Parse `OP:START-END:ACTION`, e.g. `write:1M-2M:eio`, `read:0-4K:delay=50ms`,
    /// `any:0-1G:errno=28`. OP is read|write|flush|discard|zero|any; offsets take K/M/G/T
    /// (powers of 1024); ACTION is eio, enospc, errno=N or delay=DURATION.
    pub fn parse(s: &str) -> Result<FaultRule, String> {
        let err = |m: String| format!("fault rule {s:?}: {m}");
        let mut parts = s.split(':');
        let (Some(op), Some(range), Some(action), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected OP:START-END:ACTION".into()));
        };
        let op = match op.trim().to_ascii_lowercase().as_str() {
            "read" => OpKind::Read,
            "write" => OpKind::Write,
            "flush" => OpKind::Flush,
            "discard" | "trim" => OpKind::Discard,
            "zero" | "write_zeroes" => OpKind::WriteZeroes,
            "any" => OpKind::Any,
            other => {
                return Err(err(format!(
                    "unknown operation {other:?} (read, write, flush, discard, zero, any)"
                )))
            }
        };
        let (start, end) = range
            .split_once('-')
            .ok_or_else(|| err(format!("range {range:?} must be START-END")))?;
        let start = parse_size(start).map_err(err)?;
        let end = parse_size(end).map_err(err)?;
        if start > end || (start == end && op != OpKind::Flush) {
            return Err(err(format!("empty range {start}-{end}")));
        }
        let action = action.trim().to_ascii_lowercase();
        let action = match action.as_str() {
            "eio" => FaultAction::Error(libc::EIO),
            "enospc" => FaultAction::Error(libc::ENOSPC),
            a => {
                if let Some(n) = a.strip_prefix("errno=") {
                    match n.parse::<i32>() {
                        Ok(n) if n > 0 && n < 4096 => FaultAction::Error(n),
                        _ => return Err(err(format!("bad errno {n:?} (1..4095)"))),
                    }
                } else if let Some(d) = a.strip_prefix("delay=") {
                    FaultAction::Delay(parse_duration(d).map_err(err)?)
                } else {
                    return Err(err(format!(
                        "unknown action {a:?} (eio, enospc, errno=N, delay=DURATION)"
                    )));
                }
            }
        };
        Ok(FaultRule {
            op,
            start,
            end,
            action,
        })
    }

    fn matches(&self, op: Op, offset: u64, len: u64) -> bool {
        let kind_ok = match op {
            _ if self.op == OpKind::Any => true,
            Op::Kind(k) => k == self.op,
            Op::Extents | Op::Cache => false,
        };
        if !kind_ok {
            return false;
        }
        if op == Op::Kind(OpKind::Flush) {
            return true;
        }
        // Zero-length requests still "touch" their offset.
        let end = offset.saturating_add(len.max(1));
        offset < self.end && self.start < end
    }
}

/// Parse the text of a rules file: one rule per line; blank lines and `#` comments skipped.
pub fn parse_rules(text: &str) -> Result<Vec<FaultRule>, String> {
    let mut rules = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        rules.push(FaultRule::parse(line).map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(rules)
}

impl FromStr for FaultRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultRule::parse(s)
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "zero",
            OpKind::Any => "any",
        };
        write!(f, "{op}:{}-{}:", self.start, self.end)?;
        match self.action {
            FaultAction::Error(libc::EIO) => write!(f, "eio"),
            FaultAction::Error(libc::ENOSPC) => write!(f, "enospc"),
            FaultAction::Error(n) => write!(f, "errno={n}"),
            FaultAction::Delay(d) => write!(f, "delay={}us", d.as_micros()),
        }
    }
}

/// Delegates to `inner`, applying matching rules first: delays accumulate, then the first
/// matching error (if any) is returned instead of calling `inner`.
pub struct FaultStore {
    inner: SharedStore,
    rules: RwLock<Vec<FaultRule>>,
}

impl FaultStore {
    pub fn new(inner: SharedStore, rules: Vec<FaultRule>) -> FaultStore {
        FaultStore {
            inner,
            rules: RwLock::new(rules),
        }
    }

    pub fn add_rule(&self, rule: FaultRule) {
        self.rules
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rule);
    }

    pub fn clear_rules(&self) {
        self.rules
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Replace every rule at once. An operation decides its verdict under one read lock, so
    /// it sees either all the old rules or all the new ones, never a mix.
    pub fn set_rules(&self, rules: Vec<FaultRule>) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = rules;
    }

    /// Read a file of data rules only: one `OP:START-END:ACTION` per line (`tandem up
    /// --fault-file` also takes `meta:` lines, see `node::up::load_fault_file`);
    /// blank lines and lines starting with `#` are ignored, so an empty file means no faults.
    /// The whole file is rejected if any line is bad, naming the file and line.
    pub fn load_rules_file(path: &std::path::Path) -> Result<Vec<FaultRule>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("fault file {}: {e}", path.display()))?;
        parse_rules(&text).map_err(|e| format!("fault file {}: {e}", path.display()))
    }

    pub fn rules(&self) -> Vec<FaultRule> {
        self.rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn inner(&self) -> &SharedStore {
        &self.inner
    }

    /// The total delay and the first error for an op, decided when the op starts.
    fn verdict(&self, op: Op, offset: u64, len: u64) -> (Duration, Option<i32>) {
        let rules = self.rules.read().unwrap_or_else(PoisonError::into_inner);
        let mut delay = Duration::ZERO;
        let mut error = None;
        for r in rules.iter().filter(|r| r.matches(op, offset, len)) {
            match r.action {
                FaultAction::Delay(d) => delay += d,
                FaultAction::Error(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        (delay, error)
    }

    fn wrap<'a, T: Send + 'a>(
        &'a self,
        op: Op,
        offset: u64,
        len: u64,
        call: impl FnOnce(&'a dyn BlockStore) -> IoFuture<'a, T> + Send + 'a,
    ) -> IoFuture<'a, T> {
        Box::pin(async move {
            let (delay, error) = self.verdict(op, offset, len);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(errno) = error {
                return Err(io::Error::from_raw_os_error(errno));
            }
            call(&*self.inner).await
        })
    }
}

impl BlockStore for FaultStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read(&self, offset: u64, len: usize) -> IoFuture<'_, Bytes> {
        self.wrap(Op::Kind(OpKind::Read), offset, len as u64, move |s| {
            s.read(offset, len)
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        let len = data.len() as u64;
        self.wrap(Op::Kind(OpKind::Write), offset, len, move |s| {
            s.write(offset, data, fua)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.wrap(Op::Kind(OpKind::Flush), 0, 0, |s| s.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.wrap(Op::Kind(OpKind::Discard), offset, len, move |s| {
            s.discard(offset, len)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> IoFuture<'_, ()> {
        self.wrap(Op::Kind(OpKind::WriteZeroes), offset, len, move |s| {
            s.write_zeroes(offset, len, may_trim)
        })
    }

    fn extents(&self, offset: u64, len: u64, max_extents: usize) -> IoFuture<'_, Vec<Extent>> {
        self.wrap(Op::Extents, offset, len, move |s| {
            s.extents(offset, len, max_extents)
        })
    }

    fn cache(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.wrap(Op::Cache, offset, len, move |s| s.cache(offset, len))
    }

    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{open_backing, BackingOptions, ThreadStore};
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn parse_good() {
        let r = FaultRule::parse("write:1M-2M:eio").unwrap();
        assert_eq!(
            r,
            FaultRule {
                op: OpKind::Write,
                start: 1 << 20,
                end: 2 << 20,
                action: FaultAction::Error(libc::EIO)
            }
        );
        let r = FaultRule::parse("read:0-4k:delay=50ms").unwrap();
        assert_eq!((r.op, r.start, r.end), (OpKind::Read, 0, 4096));
        assert_eq!(r.action, FaultAction::Delay(Duration::from_millis(50)));
        let r = FaultRule::parse("zero:4096-1G:enospc").unwrap();
        assert_eq!(r.op, OpKind::WriteZeroes);
        assert_eq!(r.end, 1 << 30);
        assert_eq!(r.action, FaultAction::Error(libc::ENOSPC));
        let r = FaultRule::parse("any:0-2G:errno=5").unwrap();
        assert_eq!((r.op, r.action), (OpKind::Any, FaultAction::Error(5)));
        let r = FaultRule::parse("discard:512-1024:delay=2s").unwrap();
        assert_eq!(r.action, FaultAction::Delay(Duration::from_secs(2)));
        let r = FaultRule::parse("flush:0-0:delay=1.5ms").unwrap();
        assert_eq!(r.action, FaultAction::Delay(Duration::from_micros(1500)));
        assert_eq!(
            FaultRule::parse("read:0-1:delay=100us").unwrap().action,
            FaultAction::Delay(Duration::from_micros(100))
        );
        // Display round-trips.
        for s in [
            "write:1M-2M:eio",
            "read:0-4K:delay=50ms",
            "any:0-1T:errno=61",
        ] {
            let r = FaultRule::parse(s).unwrap();
            assert_eq!(FaultRule::parse(&r.to_string()).unwrap(), r);
        }
    }

    #[test]
    fn parse_bad() {
        for s in [
            "",
            "write",
            "write:0-1M",
            "write:0-1M:eio:extra",
            "scribble:0-1M:eio",
            "write:1M:eio",
            "write:2M-1M:eio",
            "write:1M-1M:eio",
            "write:x-1M:eio",
            "write:0-1Q:eio",
            "write:0-99999999999T:eio",
            "write:0-1M:boom",
            "write:0-1M:errno=0",
            "write:0-1M:errno=-5",
            "write:0-1M:errno=abc",
            "write:0-1M:delay=5",
            "write:0-1M:delay=5parsecs",
            "write:0-1M:delay=ms",
        ] {
            let e = FaultRule::parse(s);
            assert!(e.is_err(), "{s:?} must be rejected, got {e:?}");
        }
    }

    #[test]
    fn matching() {
        let r = FaultRule::parse("write:4096-8192:eio").unwrap();
        let w = Op::Kind(OpKind::Write);
        assert!(r.matches(w, 4096, 1));
        assert!(r.matches(w, 0, 4097));
        assert!(r.matches(w, 8191, 100));
        assert!(!r.matches(w, 0, 4096));
        assert!(!r.matches(w, 8192, 4096));
        assert!(!r.matches(Op::Kind(OpKind::Read), 4096, 1));
        let f = FaultRule::parse("flush:0-1:eio").unwrap();
        assert!(f.matches(Op::Kind(OpKind::Flush), 0, 0));
        let any = FaultRule::parse("any:0-1M:eio").unwrap();
        assert!(any.matches(Op::Extents, 0, 10));
        assert!(any.matches(Op::Kind(OpKind::Discard), 0, 10));
        assert!(!r.matches(Op::Cache, 4096, 1));
    }

    #[test]
    fn rules_file() {
        assert_eq!(parse_rules("").unwrap(), Vec::new());
        assert_eq!(parse_rules("\n  \n# nothing yet\n").unwrap(), Vec::new());
        let rules = parse_rules(
            "write:0-4096:eio\n\n  # a stall\n any:0-1G:delay=200ms  \r\nflush:0-0:enospc",
        )
        .unwrap();
        assert_eq!(
            rules,
            vec![
                FaultRule::parse("write:0-4096:eio").unwrap(),
                FaultRule::parse("any:0-1G:delay=200ms").unwrap(),
                FaultRule::parse("flush:0-0:enospc").unwrap(),
            ]
        );
        // One bad line rejects the whole file and names the line.
        let e = parse_rules("write:0-4096:eio\nwrite:0-4096:boom\n").unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
        assert!(parse_rules("read:0-1M").unwrap_err().contains("line 1"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults");
        assert!(FaultStore::load_rules_file(&path)
            .unwrap_err()
            .contains("faults"));
        std::fs::write(&path, "read:0-4K:errno=61\n").unwrap();
        assert_eq!(
            FaultStore::load_rules_file(&path).unwrap(),
            vec![FaultRule::parse("read:0-4K:errno=61").unwrap()]
        );
        std::fs::write(&path, "").unwrap();
        assert!(FaultStore::load_rules_file(&path).unwrap().is_empty());
        std::fs::write(&path, "\nwrite:0-1M:eio\nnonsense\n").unwrap();
        let e = FaultStore::load_rules_file(&path).unwrap_err();
        assert!(e.contains("line 3") && e.contains("faults"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_rules_replaces_all_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, _) = store(&dir);
        fs.set_rules(parse_rules("write:0-4K:eio\nread:0-4K:eio").unwrap());
        assert!(fs
            .write(0, Bytes::from(vec![1u8; 16]), false)
            .await
            .is_err());
        fs.set_rules(parse_rules("read:0-4K:enospc").unwrap());
        assert_eq!(fs.rules().len(), 1);
        fs.write(0, Bytes::from(vec![1u8; 16]), false)
            .await
            .unwrap();
        assert_eq!(
            fs.read(0, 16).await.unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        fs.set_rules(Vec::new());
        assert_eq!(&fs.read(0, 16).await.unwrap()[..], &[1u8; 16][..]);
    }

    fn store(dir: &tempfile::TempDir) -> (Arc<FaultStore>, SharedStore) {
        let b = open_backing(
            &dir.path().join("f"),
            &BackingOptions {
                size: Some(1 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let inner: SharedStore = Arc::new(ThreadStore::new(b));
        (
            Arc::new(FaultStore::new(Arc::clone(&inner), Vec::new())),
            inner,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn injected_eio_on_one_range() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, inner) = store(&dir);
        assert_eq!(fs.engine(), "threads");
        fs.add_rule(FaultRule::parse("write:64K-128K:eio").unwrap());

        let e = fs
            .write(65536 + 100, Bytes::from(vec![9u8; 10]), false)
            .await
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        // The failed write must not have reached the inner store.
        assert_eq!(&inner.read(65536 + 100, 10).await.unwrap()[..], &[0u8; 10]);
        // Outside the range and other op kinds pass through.
        fs.write(0, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(&fs.read(0, 4096).await.unwrap()[..], &[7u8; 4096][..]);
        fs.read(65536, 4096).await.unwrap();
        fs.flush().await.unwrap();

        fs.add_rule(FaultRule::parse("flush:0-0:errno=28").unwrap());
        assert_eq!(
            fs.flush().await.unwrap_err().raw_os_error(),
            Some(libc::ENOSPC)
        );
        fs.clear_rules();
        assert!(fs.rules().is_empty());
        fs.write(65536, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        fs.flush().await.unwrap();
        assert_eq!(
            &inner.read(65536, 4096).await.unwrap()[..],
            &[3u8; 4096][..]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delay_is_observed() {
        let dir = tempfile::tempdir().unwrap();
        let (fs, _) = store(&dir);
        fs.add_rule(FaultRule::parse("read:0-4K:delay=300ms").unwrap());

        let t = Instant::now();
        fs.read(8192, 4096).await.unwrap();
        let fast = t.elapsed();
        assert!(fast < Duration::from_millis(300), "{fast:?}");

        let t = Instant::now();
        let data = fs.read(0, 4096).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(data.len(), 4096);

        // A delay and an error together: delay first, then fail.
        fs.add_rule(FaultRule::parse("read:0-4K:eio").unwrap());
        let t = Instant::now();
        let e = fs.read(0, 1).await.unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }
}
