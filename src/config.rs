//! The resource configuration file (TOML), as `DESIGN.md` ("Config (TOML)") specifies it.
//!
//! ```toml
//! [resource]
//! name = "r0"                 # required; letters, digits, '-', '_', '.'
//! protocol = "C"              # optional, default "C"; only C (synchronous) is supported
//!
//! [[node]]                    # exactly two; every key is required
//! name = "alpha"
//! disk = "/var/lib/tandem/alpha.img"
//! meta = "/var/lib/tandem/alpha.meta"
//! replication = "10.0.0.1:7789"      # HOST:PORT
//! nbd = "10.0.0.1:10809"             # HOST:PORT or unix:PATH
//! control = "/run/tandem/r0-alpha.sock"
//!
//! [[node]]
//! name = "beta"
//! # ...
//!
//! [net]                       # optional
//! ping_interval = "200ms"     # default 200ms
//! ping_timeout = "1s"         # default 1s; must be longer than ping_interval
//! secret_file = "/etc/tandem/r0.secret"   # needed by `up` (see Config::secret)
//! connect_interval = "500ms"  # default 500ms; how often to redial the peer
//! peer_flush_interval = "1s"  # default 1s; how often the peer flushes what it acknowledged
//!
//! [failover]                  # optional, but the default fencing needs `witness`
//! auto = true                 # default true
//! fencing = "witness"         # witness | handler | none; default witness
//! witness = "10.0.0.3:7790"   # required when fencing = "witness"
//! lease = "2s"                # default 2s; with witness fencing, at least ping_timeout
//! fence_handler = "/usr/local/sbin/fence-peer"   # required when fencing = "handler"
//! attach_timeout = "30s"      # default 30s: how long `tandem attach` holds IO without a primary
//!
//! [split_brain]               # optional; every policy defaults to "disconnect"
//! after_sb_0pri = "disconnect"
//! after_sb_1pri = "disconnect"
//! after_sb_2pri = "disconnect"
//!
//! [resync]                    # optional
//! rate = "0"                  # bytes/s: "100M" or a plain integer; 0 (default) = unlimited
//! checksum = false            # default false
//!
//! [activity_log]              # optional
//! extents = 1237              # default 1237, 67..=65534: hot 4 MiB extents the activity log
//!                             # tracks; after a primary crash these are resynced
//! ```
//!
//! Durations are humantime strings (`"200ms"`, `"1s"`, `"1m 30s"`). Paths are used as written
//! (relative paths are relative to the working directory of the process, not to the file).
//!
//! Every error names the file and, when there is one, the line: unknown keys (with the keys
//! that table accepts), missing required keys (with their table), wrong types, bad values,
//! contradictory settings and two nodes sharing a name, address or path (with both lines).
//! The whole file is checked before anything starts.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;

use crate::nbd::addr::ListenAddr;
use crate::policy::{AfterSb0Pri, AfterSb1Pri, AfterSb2Pri, SplitBrainPolicy};
use crate::units::parse_bytes;
use crate::witness::proto::MAX_LEASE_MS;

/// Default `[net] ping_interval`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_millis(200);
/// Default `[net] ping_timeout`.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `[net] connect_interval`.
pub const DEFAULT_CONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// Default `[net] peer_flush_interval`.
pub const DEFAULT_PEER_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Default `[failover] attach_timeout`.
pub const DEFAULT_ATTACH_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[failover] lease`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);
/// Default `[activity_log] extents`.
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// Allowed `[activity_log] extents`.
pub const AL_EXTENTS_RANGE: std::ops::RangeInclusive<u32> = 67..=65534;

/// A parsed, fully checked resource configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from (used in error messages).
    pub path: PathBuf,
    pub resource: ResourceConfig,
    /// Exactly two, in file order.
    pub nodes: Vec<NodeConfig>,
    pub net: NetConfig,
    pub failover: FailoverConfig,
    pub split_brain: SplitBrainPolicy,
    pub resync: ResyncConfig,
    pub activity_log: AlConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceConfig {
    pub name: String,
    pub protocol: Protocol,
}

/// Replication protocol. Only C (a write completes when it is durable on both nodes) exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    #[default]
    C,
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "C" => Ok(Self::C),
            "A" | "B" => Err(format!(
                "protocol {s:?} is not supported; only \"C\" (synchronous) is"
            )),
            _ => Err(format!("{s:?} is not a protocol; only \"C\" is supported")),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("C")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub disk: PathBuf,
    pub meta: PathBuf,
    /// `HOST:PORT` the node listens on for its peer (and the peer dials).
    pub replication: String,
    pub nbd: ListenAddr,
    pub control: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub secret_file: Option<PathBuf>,
    /// How often to redial the peer while disconnected.
    pub connect_interval: Duration,
    /// How often the node that sends writes asks the peer to flush what it acknowledged, so
    /// that a crash of the peer's operating system leaves little to resync.
    pub peer_flush_interval: Duration,
    /// Line of `secret_file` in the file, for errors from [`Config::secret`].
    pub secret_file_line: Option<usize>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            ping_interval: DEFAULT_PING_INTERVAL,
            ping_timeout: DEFAULT_PING_TIMEOUT,
            secret_file: None,
            connect_interval: DEFAULT_CONNECT_INTERVAL,
            peer_flush_interval: DEFAULT_PEER_FLUSH_INTERVAL,
            secret_file_line: None,
        }
    }
}

/// How a node makes sure its peer no longer writes before it promotes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fencing {
    /// Leases and epochs granted by the witness (`[failover] witness`).
    #[default]
    Witness,
    /// Run `[failover] fence_handler`; promote only if it proves the peer outdated or dead.
    Handler,
    /// No fencing: a split brain is possible after a network partition.
    None,
}

impl FromStr for Fencing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "witness" => Ok(Self::Witness),
            "handler" => Ok(Self::Handler),
            "none" => Ok(Self::None),
            _ => Err(format!("{s:?}: expected witness, handler or none")),
        }
    }
}

impl fmt::Display for Fencing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Witness => "witness",
            Self::Handler => "handler",
            Self::None => "none",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverConfig {
    pub auto: bool,
    pub fencing: Fencing,
    /// `HOST:PORT` of the witness; always `Some` when `fencing` is `Witness`.
    pub witness: Option<String>,
    pub lease: Duration,
    /// Always `Some` when `fencing` is `Handler`.
    pub fence_handler: Option<PathBuf>,
    /// How long `tandem attach` holds requests while no primary answers before failing them.
    pub attach_timeout: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            auto: true,
            fencing: Fencing::Witness,
            witness: None,
            lease: DEFAULT_LEASE,
            fence_handler: None,
            attach_timeout: DEFAULT_ATTACH_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncConfig {
    /// Bytes per second; 0 = unlimited.
    pub rate: u64,
    /// Compare block digests first and send only blocks that differ.
    pub checksum: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlConfig {
    /// Number of activity-log extents (hot regions resynced after a primary crash).
    pub extents: u32,
}

impl Default for AlConfig {
    fn default() -> Self {
        Self {
            extents: DEFAULT_AL_EXTENTS,
        }
    }
}

/// A configuration problem: the file, the line when there is one, and what is wrong.
///
/// Displays as `PATH line N: MESSAGE` (or `PATH: MESSAGE` without a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    fn new(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            line,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "{} line {n}: {}", self.path.display(), self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
        Self::parse(&text, path)
    }

    /// Checks `text` as the contents of `path` (the path is only used in messages and
    /// stored in [`Config::path`]).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cx = Cx { text, path };
        let root = match toml::from_str::<Val>(text) {
            Ok(Val::Table(t)) => t,
            Ok(_) => return Err(cx.err(None, "the file is not a TOML table")),
            Err(e) => return Err(cx.toml_err(&e)),
        };
        let top = Tbl {
            cx: &cx,
            title: "the top level".into(),
            line: None,
            entries: &root,
        };
        top.check_keys(TOP_KEYS)?;

        let resource = parse_resource(&top)?;
        let (nodes, node_lines) = parse_nodes(&top)?;
        let names = nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>();
        let net = parse_net(&top)?;
        let failover = parse_failover(&top, &net)?;
        let split_brain = parse_split_brain(&top, &names)?;
        let resync = parse_resync(&top)?;
        let activity_log = parse_activity_log(&top)?;
        check_clashes(&cx, &nodes, &node_lines)?;

        Ok(Config {
            path: path.to_owned(),
            resource,
            nodes,
            net,
            failover,
            split_brain,
            resync,
            activity_log,
        })
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            ConfigError::new(
                &self.path,
                None,
                format!(
                    "node {name:?} is not in this file (nodes: {})",
                    self.node_names().join(", ")
                ),
            )
        })
    }

    /// The node that is not `name` (which must be one of the two).
    pub fn peer(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.node(name)?;
        self.nodes.iter().find(|n| n.name != name).ok_or_else(|| {
            // Unreachable after parse (two distinct names), but Config's fields are public.
            ConfigError::new(&self.path, None, format!("node {name:?} has no peer"))
        })
    }

    /// The node names, in file order.
    pub fn node_names(&self) -> Vec<&str> {
        self.nodes.iter().map(|n| n.name.as_str()).collect()
    }

    /// The shared secret peers authenticate each other with: the contents of
    /// `[net] secret_file`, minus one trailing newline (`\n` or `\r\n`).
    ///
    /// Errors when no `secret_file` is configured, when it cannot be read or when the secret
    /// is empty. A file that group or others may access is accepted; see
    /// [`Config::secret_permissions_warning`].
    pub fn secret(&self) -> Result<Vec<u8>, ConfigError> {
        let line = self.net.secret_file_line;
        let Some(file) = &self.net.secret_file else {
            return Err(ConfigError::new(
                &self.path,
                None,
                "no secret_file in [net]: peers must authenticate each other; \
                 put a random secret in a file readable only by root and set \
                 secret_file = \"/etc/tandem/<resource>.secret\"",
            ));
        };
        let mut data = std::fs::read(file).map_err(|e| {
            let what = if e.kind() == io::ErrorKind::NotFound {
                "does not exist".to_owned()
            } else {
                format!("cannot be read: {e}")
            };
            ConfigError::new(
                &self.path,
                line,
                format!("secret_file {} {what}", file.display()),
            )
        })?;
        crate::secret::strip_line_end(&mut data);
        if data.is_empty() {
            return Err(ConfigError::new(
                &self.path,
                line,
                format!("secret_file {} holds an empty secret", file.display()),
            ));
        }
        Ok(data)
    }

    /// A warning when `secret_file` may be accessed by group or others (mode & 0o077).
    pub fn secret_permissions_warning(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let file = self.net.secret_file.as_ref()?;
        let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o7777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "secret_file {} is accessible by group or others (mode {mode:04o}); \
                 chmod 600 it",
                file.display()
            )
        })
    }
}

// ---------------------------------------------------------------------------------------
// Tables

const TOP_KEYS: &[&str] = &[
    "resource",
    "node",
    "net",
    "failover",
    "split_brain",
    "resync",
    "activity_log",
];
const RESOURCE_KEYS: &[&str] = &["name", "protocol"];
const NODE_KEYS: &[&str] = &["name", "disk", "meta", "replication", "nbd", "control"];
const NET_KEYS: &[&str] = &[
    "ping_interval",
    "ping_timeout",
    "secret_file",
    "connect_interval",
    "peer_flush_interval",
];
const FAILOVER_KEYS: &[&str] = &[
    "auto",
    "fencing",
    "witness",
    "lease",
    "fence_handler",
    "attach_timeout",
];
const SPLIT_BRAIN_KEYS: &[&str] = &["after_sb_0pri", "after_sb_1pri", "after_sb_2pri"];
const RESYNC_KEYS: &[&str] = &["rate", "checksum"];
const AL_KEYS: &[&str] = &["extents"];

fn parse_resource(top: &Tbl) -> Result<ResourceConfig, ConfigError> {
    let Some(t) = top.table("resource")? else {
        return Err(top
            .cx
            .err(None, "missing [resource] table (with name = \"...\")"));
    };
    t.check_keys(RESOURCE_KEYS)?;
    let (name, line) = t.req_str("name")?;
    check_name(&t, "name", name, line)?;
    let protocol = match t.str("protocol")? {
        None => Protocol::C,
        Some((s, line)) => s.parse().map_err(|e| t.bad("protocol", line, e))?,
    };
    Ok(ResourceConfig {
        name: name.to_owned(),
        protocol,
    })
}

/// Lines of a node's keys, for clash reports.
struct NodeLines {
    name: usize,
    disk: usize,
    meta: usize,
    replication: usize,
    nbd: usize,
    control: usize,
}

fn parse_nodes(top: &Tbl) -> Result<(Vec<NodeConfig>, Vec<NodeLines>), ConfigError> {
    let cx = top.cx;
    let Some(v) = top.get("node") else {
        return Err(cx.err(None, "missing [[node]] tables (exactly two are needed)"));
    };
    let key_line = top.key_line("node");
    let Val::Array(items) = v.get_ref() else {
        return Err(cx.err(
            key_line,
            "node must be written as [[node]] tables (an array of tables), one per node",
        ));
    };
    if items.len() != 2 {
        let line = match items.get(2) {
            Some(third) => Some(cx.line(third.span())),
            None => items.first().map(|i| cx.line(i.span())).or(key_line),
        };
        return Err(cx.err(
            line,
            format!(
                "expected exactly two [[node]] tables, found {}",
                items.len()
            ),
        ));
    }
    let mut nodes = Vec::new();
    let mut lines: Vec<NodeLines> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let header = Some(cx.line(item.span()));
        let Val::Table(entries) = item.get_ref() else {
            return Err(cx.err(header, "each node must be a table"));
        };
        let t = Tbl {
            cx,
            title: format!("[[node]] #{}", i + 1),
            line: header,
            entries,
        };
        t.check_keys(NODE_KEYS)?;
        // Look up every key first so a missing one is reported before bad values.
        for k in NODE_KEYS {
            t.req_str(k)?;
        }
        let (name, name_line) = t.req_str("name")?;
        check_name(&t, "name", name, name_line)?;
        let t = Tbl {
            title: format!("[[node]] {name:?}"),
            ..t
        };
        let (disk, disk_line) = t.req_path("disk")?;
        let (meta, meta_line) = t.req_path("meta")?;
        let (control, control_line) = t.req_path("control")?;
        let (replication, replication_line) = t.req_str("replication")?;
        parse_host_port(replication).map_err(|e| t.bad("replication", replication_line, e))?;
        let (nbd, nbd_line) = t.req_str("nbd")?;
        let nbd: ListenAddr = nbd.parse().map_err(|e| t.bad("nbd", nbd_line, e))?;
        if let Some(j) = nodes.iter().position(|n: &NodeConfig| n.name == name) {
            return Err(cx.err(
                Some(name_line),
                format!(
                    "two nodes are named {name:?} (key \"name\" on lines {} and {name_line})",
                    lines[j].name
                ),
            ));
        }
        nodes.push(NodeConfig {
            name: name.to_owned(),
            disk,
            meta,
            replication: replication.to_owned(),
            nbd,
            control,
        });
        lines.push(NodeLines {
            name: name_line,
            disk: disk_line,
            meta: meta_line,
            replication: replication_line,
            nbd: nbd_line,
            control: control_line,
        });
    }
    Ok((nodes, lines))
}

/// Two nodes (or one node's two keys) that would fight over an address or a file.
fn check_clashes(cx: &Cx, nodes: &[NodeConfig], lines: &[NodeLines]) -> Result<(), ConfigError> {
    // (node, key, line, comparable value). Network addresses and filesystem paths are
    // compared within their own group: an nbd unix socket is a path.
    let mut addrs: Vec<(&str, &str, usize, String)> = Vec::new();
    let mut paths: Vec<(&str, &str, usize, &Path)> = Vec::new();
    for (n, l) in nodes.iter().zip(lines) {
        addrs.push((&n.name, "replication", l.replication, n.replication.clone()));
        match &n.nbd {
            ListenAddr::Tcp(a) => addrs.push((&n.name, "nbd", l.nbd, a.clone())),
            ListenAddr::Unix(p) => paths.push((&n.name, "nbd", l.nbd, p)),
        }
        paths.push((&n.name, "disk", l.disk, &n.disk));
        paths.push((&n.name, "meta", l.meta, &n.meta));
        paths.push((&n.name, "control", l.control, &n.control));
    }
    let clash =
        |(n1, k1, l1): (&str, &str, usize), (n2, k2, l2): (&str, &str, usize), v: String| {
            let first = (l1.min(l2), l1.max(l2));
            let what = if n1 == n2 {
                format!("node {n1:?} uses {v} for both {k1} and {k2}")
            } else if k1 == k2 {
                format!("nodes {n1:?} and {n2:?} have the same {k1} {v}")
            } else {
                format!("{k1} of node {n1:?} and {k2} of node {n2:?} are the same: {v}")
            };
            cx.err(
                Some(first.1),
                format!("{what} (lines {} and {})", first.0, first.1),
            )
        };
    for (i, a) in addrs.iter().enumerate() {
        if let Some(b) = addrs[..i].iter().find(|b| b.3 == a.3) {
            return Err(clash(
                (b.0, b.1, b.2),
                (a.0, a.1, a.2),
                format!("{:?}", a.3),
            ));
        }
    }
    // Paths clash only on one machine: two storage nodes commonly use the same disk path
    // (e.g. /dev/sdb on both). Nodes whose replication addresses share a host are taken to
    // be on one machine (as in tests and demos on loopback).
    let host = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .and_then(|n| n.replication.rsplit_once(':'))
            .map(|(h, _)| h.to_owned())
    };
    for (i, a) in paths.iter().enumerate() {
        if let Some(b) = paths[..i]
            .iter()
            .find(|b| b.3 == a.3 && (b.0 == a.0 || host(b.0) == host(a.0)))
        {
            return Err(clash(
                (b.0, b.1, b.2),
                (a.0, a.1, a.2),
                format!("{:?}", a.3.display().to_string()),
            ));
        }
    }
    Ok(())
}

fn parse_net(top: &Tbl) -> Result<NetConfig, ConfigError> {
    let mut net = NetConfig::default();
    let Some(t) = top.table("net")? else {
        return Ok(net);
    };
    t.check_keys(NET_KEYS)?;
    let interval = t.positive_duration("ping_interval")?;
    let timeout = t.positive_duration("ping_timeout")?;
    let connect = t.positive_duration("connect_interval")?;
    if let Some((d, _)) = t.positive_duration("peer_flush_interval")? {
        net.peer_flush_interval = d;
    }
    if let Some((d, _)) = interval {
        net.ping_interval = d;
    }
    if let Some((d, _)) = timeout {
        net.ping_timeout = d;
    }
    if let Some((d, _)) = connect {
        net.connect_interval = d;
    }
    if net.ping_timeout <= net.ping_interval {
        let line = timeout.or(interval).map(|(_, l)| l);
        return Err(t.cx.err(
            line,
            format!(
                "ping_timeout ({}{}) must be longer than ping_interval ({}{}) in [net]",
                humantime::format_duration(net.ping_timeout),
                if timeout.is_none() {
                    ", the default"
                } else {
                    ""
                },
                humantime::format_duration(net.ping_interval),
                if interval.is_none() {
                    ", the default"
                } else {
                    ""
                },
            ),
        ));
    }
    if let Some((p, line)) = t.path("secret_file")? {
        net.secret_file = Some(p);
        net.secret_file_line = Some(line);
    }
    Ok(net)
}

fn parse_failover(top: &Tbl, net: &NetConfig) -> Result<FailoverConfig, ConfigError> {
    let mut f = FailoverConfig::default();
    let empty = Vec::new();
    let t = top.table("failover")?.unwrap_or(Tbl {
        cx: top.cx,
        title: "[failover]".into(),
        line: None,
        entries: &empty,
    });
    t.check_keys(FAILOVER_KEYS)?;
    if let Some((b, _)) = t.bool("auto")? {
        f.auto = b;
    }
    let fencing = t.str("fencing")?;
    if let Some((s, line)) = fencing {
        f.fencing = s.parse().map_err(|e| t.bad("fencing", line, e))?;
    }
    let fencing_line = fencing.map(|(_, l)| l).or(t.line);
    let fencing_desc = if fencing.is_some() {
        format!("fencing = \"{}\"", f.fencing)
    } else {
        format!("fencing = \"{}\" (the default)", f.fencing)
    };
    if let Some((w, line)) = t.str("witness")? {
        parse_host_port(w).map_err(|e| t.bad("witness", line, e))?;
        f.witness = Some(w.to_owned());
    }
    let lease = t.positive_duration("lease")?;
    if let Some((d, _)) = lease {
        f.lease = d;
    }
    if let Some((p, _)) = t.path("fence_handler")? {
        f.fence_handler = Some(p);
    }
    if let Some((d, _)) = t.positive_duration("attach_timeout")? {
        f.attach_timeout = d;
    }
    match f.fencing {
        Fencing::Witness if f.witness.is_none() => {
            return Err(top.cx.err(
                fencing_line,
                format!(
                    "{fencing_desc} needs the witness address: add witness = \"HOST:PORT\" \
                     to [failover] (or choose fencing = \"handler\" or \"none\")"
                ),
            ))
        }
        Fencing::Handler if f.fence_handler.is_none() => {
            return Err(top.cx.err(
                fencing_line,
                format!("{fencing_desc} needs fence_handler = \"/path/to/program\" in [failover]"),
            ))
        }
        _ => {}
    }
    if f.fencing == Fencing::Witness && f.lease < net.ping_timeout {
        let line = lease.map(|(_, l)| l).or(fencing_line);
        return Err(top.cx.err(
            line,
            format!(
                "lease ({}{}) in [failover] is shorter than ping_timeout ({}) in [net]",
                humantime::format_duration(f.lease),
                if lease.is_none() { ", the default" } else { "" },
                humantime::format_duration(net.ping_timeout),
            ),
        ));
    }
    // The witness is asked for the lease in whole milliseconds and grants 1..=MAX_LEASE_MS;
    // any other lease would be refused at every promotion.
    let lease_ms = f.lease.as_millis();
    if f.fencing == Fencing::Witness && !(1..=u128::from(MAX_LEASE_MS)).contains(&lease_ms) {
        let line = lease.map(|(_, l)| l).or(fencing_line);
        return Err(top.cx.err(
            line,
            format!(
                "lease ({}) in [failover] is outside what the witness grants (1ms to {})",
                humantime::format_duration(f.lease),
                humantime::format_duration(Duration::from_millis(MAX_LEASE_MS)),
            ),
        ));
    }
    Ok(f)
}

fn parse_split_brain(top: &Tbl, names: &[&str]) -> Result<SplitBrainPolicy, ConfigError> {
    let mut p = SplitBrainPolicy::default();
    let Some(t) = top.table("split_brain")? else {
        return Ok(p);
    };
    t.check_keys(SPLIT_BRAIN_KEYS)?;
    if let Some((s, line)) = t.str("after_sb_0pri")? {
        p.after_sb_0pri = s.parse().map_err(|e| t.bad("after_sb_0pri", line, e))?;
        if let AfterSb0Pri::DiscardNode(n) = &p.after_sb_0pri {
            if !names.contains(&n.as_str()) {
                return Err(t.bad(
                    "after_sb_0pri",
                    line,
                    format!(
                        "{s:?} names node {n:?}, which is not in this file (nodes: {})",
                        names.join(", ")
                    ),
                ));
            }
        }
    }
    if let Some((s, line)) = t.str("after_sb_1pri")? {
        p.after_sb_1pri = s
            .parse::<AfterSb1Pri>()
            .map_err(|e| t.bad("after_sb_1pri", line, e))?;
    }
    if let Some((s, line)) = t.str("after_sb_2pri")? {
        p.after_sb_2pri = s
            .parse::<AfterSb2Pri>()
            .map_err(|e| t.bad("after_sb_2pri", line, e))?;
    }
    Ok(p)
}

fn parse_resync(top: &Tbl) -> Result<ResyncConfig, ConfigError> {
    let mut r = ResyncConfig::default();
    let Some(t) = top.table("resync")? else {
        return Ok(r);
    };
    t.check_keys(RESYNC_KEYS)?;
    if let Some(v) = t.get("rate") {
        let line = t.cx.line(v.span());
        r.rate = match v.get_ref() {
            Val::Str(s) => parse_bytes(s).map_err(|e| t.bad("rate", line, e))?,
            Val::Int(n) => {
                u64::try_from(*n).map_err(|_| t.bad("rate", line, format!("{n} is negative")))?
            }
            other => {
                return Err(t.wrong_type("rate", line, "a size like \"100M\" or an integer", other))
            }
        };
    }
    if let Some((b, _)) = t.bool("checksum")? {
        r.checksum = b;
    }
    Ok(r)
}

fn parse_activity_log(top: &Tbl) -> Result<AlConfig, ConfigError> {
    let mut a = AlConfig::default();
    let Some(t) = top.table("activity_log")? else {
        return Ok(a);
    };
    t.check_keys(AL_KEYS)?;
    if let Some((n, line)) = t.int("extents")? {
        a.extents = u32::try_from(n)
            .ok()
            .filter(|n| AL_EXTENTS_RANGE.contains(n))
            .ok_or_else(|| {
                t.bad(
                    "extents",
                    line,
                    format!(
                        "{n} is out of range ({}..={})",
                        AL_EXTENTS_RANGE.start(),
                        AL_EXTENTS_RANGE.end()
                    ),
                )
            })?;
    }
    Ok(a)
}

/// Resource and node names end up in socket paths, policies and messages.
fn check_name(t: &Tbl, key: &str, name: &str, line: usize) -> Result<(), ConfigError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(t.bad(
            key,
            line,
            format!("{name:?} is not a valid name (use letters, digits, '-', '_' and '.')"),
        ));
    }
    Ok(())
}

/// `HOST:PORT` with a nonzero port (the peer or the witness dials it).
fn parse_host_port(s: &str) -> Result<(), String> {
    match s
        .parse::<ListenAddr>()
        .map_err(|e| e.replace(" or unix:PATH", ""))?
    {
        ListenAddr::Unix(_) => Err(format!("{s:?}: expected HOST:PORT, not a unix socket")),
        ListenAddr::Tcp(_) => {
            if s.ends_with(":0") {
                Err(format!("{s:?}: port 0 cannot be dialled"))
            } else {
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A spanned TOML tree and lookups that know their table and line

/// A TOML value that keeps the byte span of every key and value.
#[derive(Debug)]
enum Val {
    Str(String),
    Int(i64),
    Float,
    Bool(bool),
    Array(Vec<Spanned<Val>>),
    Table(Vec<(Spanned<String>, Spanned<Val>)>),
}

impl Val {
    fn kind(&self) -> &'static str {
        match self {
            Val::Str(_) => "a string",
            Val::Int(_) => "an integer",
            Val::Float => "a float",
            Val::Bool(_) => "a boolean",
            Val::Array(_) => "an array",
            Val::Table(_) => "a table",
        }
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValVisitor)
    }
}

struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Val, E> {
        Ok(Val::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Val, E> {
        Ok(Val::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Val, E> {
        i64::try_from(v)
            .map(Val::Int)
            .map_err(|_| E::custom(format!("{v} is too large")))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Val, E> {
        Ok(Val::Float)
    }
    fn visit_str<E>(self, v: &str) -> Result<Val, E> {
        Ok(Val::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Val, E> {
        Ok(Val::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Val, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<Spanned<Val>>()? {
            out.push(v);
        }
        Ok(Val::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Val, A::Error> {
        let mut out = Vec::new();
        while let Some(k) = map.next_key::<Spanned<String>>()? {
            let v = map.next_value::<Spanned<Val>>()?;
            out.push((k, v));
        }
        Ok(Val::Table(out))
    }
}

struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Cx<'_> {
    /// 1-based line of a byte span's start.
    fn line(&self, span: Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, line: Option<usize>, msg: impl Into<String>) -> ConfigError {
        ConfigError::new(self.path, line, msg)
    }

    fn toml_err(&self, e: &toml::de::Error) -> ConfigError {
        let mut msg = e.message().trim().replace('\n', "; ");
        if msg.contains("$__toml_private_datetime") {
            msg = "dates and times are not used in a tandem configuration; \
                   did you mean to quote the value?"
                .into();
        }
        let line = e.span().map(|s| self.line(s));
        self.err(line, msg)
    }
}

/// One table of the file with its title for messages ("[net]", "[[node]] #2") and the line
/// of its header (`None` for the top level or a table that is absent).
struct Tbl<'a> {
    cx: &'a Cx<'a>,
    title: String,
    line: Option<usize>,
    entries: &'a [(Spanned<String>, Spanned<Val>)],
}

impl<'a> Tbl<'a> {
    fn check_keys(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        for (k, v) in self.entries {
            if !allowed.contains(&k.get_ref().as_str()) {
                let what = match (self.line, v.get_ref()) {
                    (None, Val::Table(_)) if self.title == "the top level" => {
                        format!("unknown table [{}]", k.get_ref())
                    }
                    _ => format!("unknown key {:?}", k.get_ref()),
                };
                let place = if self.title == "the top level" {
                    "at the top level".to_owned()
                } else {
                    format!("in {}", self.title)
                };
                return Err(self.cx.err(
                    Some(self.cx.line(k.span())),
                    format!("{what} {place} (expected one of: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn entry(&self, key: &str) -> Option<&'a (Spanned<String>, Spanned<Val>)> {
        self.entries.iter().find(|(k, _)| k.get_ref() == key)
    }

    fn get(&self, key: &str) -> Option<&'a Spanned<Val>> {
        self.entry(key).map(|(_, v)| v)
    }

    fn key_line(&self, key: &str) -> Option<usize> {
        self.entry(key).map(|(k, _)| self.cx.line(k.span()))
    }

    /// A sub-table of this one (for the top level: `[name]`).
    fn table(&self, key: &str) -> Result<Option<Tbl<'a>>, ConfigError> {
        let Some((k, v)) = self.entry(key) else {
            return Ok(None);
        };
        let line = self.cx.line(k.span());
        match v.get_ref() {
            Val::Table(entries) => Ok(Some(Tbl {
                cx: self.cx,
                title: format!("[{key}]"),
                line: Some(line),
                entries,
            })),
            other => Err(self.cx.err(
                Some(line),
                format!("{key} must be a table [{key}], not {}", other.kind()),
            )),
        }
    }

    fn bad(&self, key: &str, line: usize, msg: impl fmt::Display) -> ConfigError {
        self.cx
            .err(Some(line), format!("key {key:?} in {}: {msg}", self.title))
    }

    fn wrong_type(&self, key: &str, line: usize, want: &str, got: &Val) -> ConfigError {
        self.cx.err(
            Some(line),
            format!(
                "key {key:?} in {} must be {want}, not {}",
                self.title,
                got.kind()
            ),
        )
    }

    /// The value of `key` with its line, if present and of the type `pick` accepts.
    fn typed<T>(
        &self,
        key: &str,
        expected: &str,
        pick: impl FnOnce(&'a Val) -> Option<T>,
    ) -> Result<Option<(T, usize)>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let line = self.cx.line(v.span());
        match pick(v.get_ref()) {
            Some(t) => Ok(Some((t, line))),
            None => Err(self.wrong_type(key, line, expected, v.get_ref())),
        }
    }

    fn str(&self, key: &str) -> Result<Option<(&'a str, usize)>, ConfigError> {
        self.typed(key, "a string", |v| match v {
            Val::Str(s) => Some(s.as_str()),
            _ => None,
        })
    }

    fn req_str(&self, key: &str) -> Result<(&'a str, usize), ConfigError> {
        self.str(key)?.ok_or_else(|| {
            self.cx.err(
                self.line,
                format!("{} is missing required key {key:?}", self.title),
            )
        })
    }

    fn path(&self, key: &str) -> Result<Option<(PathBuf, usize)>, ConfigError> {
        match self.str(key)? {
            None => Ok(None),
            Some(("", line)) => Err(self.bad(key, line, "empty path")),
            Some((s, line)) => Ok(Some((PathBuf::from(s), line))),
        }
    }

    fn req_path(&self, key: &str) -> Result<(PathBuf, usize), ConfigError> {
        self.req_str(key)?;
        Ok(self.path(key)?.expect("checked by req_str"))
    }

    fn bool(&self, key: &str) -> Result<Option<(bool, usize)>, ConfigError> {
        self.typed(key, "true or false", |v| match v {
            Val::Bool(b) => Some(*b),
            _ => None,
        })
    }

    fn int(&self, key: &str) -> Result<Option<(i64, usize)>, ConfigError> {
        self.typed(key, "an integer", |v| match v {
            Val::Int(n) => Some(*n),
            _ => None,
        })
    }

    /// A humantime duration string greater than zero.
    fn positive_duration(&self, key: &str) -> Result<Option<(Duration, usize)>, ConfigError> {
        let expected = "a duration string like \"200ms\" or \"1s\"";
        let Some((s, line)) = self.typed(key, expected, |v| match v {
            Val::Str(s) => Some(s.as_str()),
            _ => None,
        })?
        else {
            return Ok(None);
        };
        let d = humantime::parse_duration(s).map_err(|e| {
            self.bad(
                key,
                line,
                format!("{s:?} is not a duration ({e}); write e.g. \"200ms\" or \"1s\""),
            )
        })?;
        if d.is_zero() {
            return Err(self.bad(key, line, format!("{s:?}: must be longer than zero")));
        }
        Ok(Some((d, line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/tandem/r0.toml";

    /// DESIGN.md's example, with `DIR` standing for a directory.
    const EXAMPLE: &str = r#"[resource]
name = "r0"
protocol = "C"

[[node]]
name = "alpha"
disk = "DIR/alpha.img"      # file or block device
meta = "DIR/alpha.meta"     # external metadata file
replication = "10.0.0.1:7789"
nbd = "10.0.0.1:10809"
control = "DIR/r0-alpha.sock"

[[node]]
name = "beta"
disk = "DIR/beta.img"
meta = "DIR/beta.meta"
replication = "10.0.0.2:7789"
nbd = "10.0.0.2:10809"
control = "DIR/r0-beta.sock"

[net]
ping_interval = "200ms"
ping_timeout = "1s"
secret_file = "DIR/r0.secret"   # peers authenticate each other (HMAC challenge)

[failover]
auto = true
fencing = "witness"                     # witness | handler | none
witness = "10.0.0.3:7790"
lease = "2s"
fence_handler = "/usr/local/sbin/fence-peer"   # for fencing = "handler"

[split_brain]
after_sb_0pri = "disconnect"   # disconnect | discard-zero-changes | discard-least-changes | discard-younger-primary | discard-node-NAME
after_sb_1pri = "disconnect"   # disconnect | consensus | discard-secondary
after_sb_2pri = "disconnect"

[resync]
rate = "0"          # bytes per second, 0 = unlimited
checksum = false    # compare block digests first; send only blocks that differ
"#;

    fn example() -> String {
        EXAMPLE.replace("DIR", "/var/lib/tandem")
    }

    /// `text` with `from` (which must occur exactly once) replaced by `to`.
    fn edit(text: &str, from: &str, to: &str) -> String {
        assert_eq!(text.matches(from).count(), 1, "{from:?} must occur once");
        text.replacen(from, to, 1)
    }

    /// 1-based line of the only line containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        let hits: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(hits.len(), 1, "{needle:?} must be on one line");
        hits[0]
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Parses `text`, expecting an error on `line` whose message contains every `needle`.
    #[track_caller]
    fn fails(text: &str, line: Option<usize>, needles: &[&str]) -> String {
        let e = Config::parse(text, Path::new(FILE)).expect_err("should fail");
        let shown = e.to_string();
        assert_eq!(e.line, line, "wrong line in: {shown}");
        assert_eq!(e.path, Path::new(FILE));
        match line {
            Some(n) => assert!(shown.starts_with(&format!("{FILE} line {n}: ")), "{shown}"),
            None => assert!(shown.starts_with(&format!("{FILE}: ")), "{shown}"),
        }
        for n in needles {
            assert!(shown.contains(n), "{n:?} not in: {shown}");
        }
        shown
    }

    #[test]
    fn design_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let text = EXAMPLE.replace("DIR", &d);
        let path = dir.path().join("r0.toml");
        std::fs::write(&path, &text).unwrap();
        let c = Config::load(&path).unwrap();
        let p = |f: &str| dir.path().join(f);
        assert_eq!(c.path, path);
        assert_eq!(
            c.resource,
            ResourceConfig {
                name: "r0".into(),
                protocol: Protocol::C
            }
        );
        assert_eq!(
            c.nodes,
            vec![
                NodeConfig {
                    name: "alpha".into(),
                    disk: p("alpha.img"),
                    meta: p("alpha.meta"),
                    replication: "10.0.0.1:7789".into(),
                    nbd: ListenAddr::Tcp("10.0.0.1:10809".into()),
                    control: p("r0-alpha.sock"),
                },
                NodeConfig {
                    name: "beta".into(),
                    disk: p("beta.img"),
                    meta: p("beta.meta"),
                    replication: "10.0.0.2:7789".into(),
                    nbd: ListenAddr::Tcp("10.0.0.2:10809".into()),
                    control: p("r0-beta.sock"),
                },
            ]
        );
        assert_eq!(
            c.net,
            NetConfig {
                ping_interval: Duration::from_millis(200),
                ping_timeout: Duration::from_secs(1),
                secret_file: Some(p("r0.secret")),
                connect_interval: Duration::from_millis(500),
                peer_flush_interval: Duration::from_secs(1),
                secret_file_line: Some(24),
            }
        );
        assert_eq!(
            c.failover,
            FailoverConfig {
                auto: true,
                fencing: Fencing::Witness,
                witness: Some("10.0.0.3:7790".into()),
                lease: Duration::from_secs(2),
                fence_handler: Some("/usr/local/sbin/fence-peer".into()),
                attach_timeout: DEFAULT_ATTACH_TIMEOUT,
            }
        );
        assert_eq!(c.split_brain, SplitBrainPolicy::default());
        assert_eq!(
            c.resync,
            ResyncConfig {
                rate: 0,
                checksum: false
            }
        );
        assert_eq!(c.activity_log.extents, 1237);
    }

    #[test]
    fn defaults_when_optional_tables_are_absent() {
        let text = r#"
[resource]
name = "r0"
[[node]]
name = "a"
disk = "/d/a.img"
meta = "/d/a.meta"
replication = "127.0.0.1:7001"
nbd = "unix:/d/a.nbd"
control = "/d/a.sock"
[[node]]
name = "b"
disk = "/d/b.img"
meta = "/d/b.meta"
replication = "127.0.0.1:7002"
nbd = "127.0.0.1:10809"
control = "/d/b.sock"
[failover]
witness = "127.0.0.1:7790"
"#;
        let c = parse(text);
        assert_eq!(c.resource.protocol, Protocol::C);
        assert_eq!(c.nodes[0].nbd, ListenAddr::Unix("/d/a.nbd".into()));
        assert_eq!(c.net, NetConfig::default());
        assert_eq!(c.net.ping_interval, Duration::from_millis(200));
        assert_eq!(c.net.ping_timeout, Duration::from_secs(1));
        assert_eq!(c.net.connect_interval, Duration::from_millis(500));
        assert_eq!(c.net.secret_file, None);
        assert!(c.failover.auto);
        assert_eq!(c.failover.fencing, Fencing::Witness);
        assert_eq!(c.failover.lease, Duration::from_secs(2));
        assert_eq!(c.failover.fence_handler, None);
        assert_eq!(c.split_brain, SplitBrainPolicy::default());
        assert_eq!(
            c.resync,
            ResyncConfig {
                rate: 0,
                checksum: false
            }
        );
        assert_eq!(c.activity_log, AlConfig { extents: 1237 });

        // Without [failover] the default fencing (witness) has no witness to ask.
        let text = edit(text, "[failover]\nwitness = \"127.0.0.1:7790\"\n", "");
        fails(
            &text,
            None,
            &[
                "fencing = \"witness\" (the default)",
                "witness = \"HOST:PORT\"",
            ],
        );
        // ... which fencing = "none" does not need.
        let c = parse(&format!("{text}[failover]\nfencing = \"none\"\n"));
        assert_eq!(c.failover.fencing, Fencing::None);
        assert_eq!(c.failover.witness, None);
    }

    #[test]
    fn all_optional_values_are_read() {
        let t = edit(
            &example(),
            "ping_timeout = \"1s\"",
            "ping_timeout = \"3s\"\nconnect_interval = \"2s\"",
        );
        let t = edit(&t, "lease = \"2s\"", "lease = \"1m 30s\"");
        let t = edit(&t, "auto = true", "auto = false");
        let t = edit(
            &t,
            "after_sb_0pri = \"disconnect\"",
            "after_sb_0pri = \"discard-node-beta\"",
        );
        let t = edit(
            &t,
            "after_sb_1pri = \"disconnect\"",
            "after_sb_1pri = \"consensus\"",
        );
        let t = edit(&t, "rate = \"0\"", "rate = \"100M\"");
        let t = edit(
            &t,
            "checksum = false",
            "checksum = true\n\n[activity_log]\nextents = 67",
        );
        let c = parse(&t);
        assert_eq!(c.net.ping_timeout, Duration::from_secs(3));
        assert_eq!(c.net.connect_interval, Duration::from_secs(2));
        assert_eq!(c.failover.lease, Duration::from_secs(90));
        assert!(!c.failover.auto);
        assert_eq!(
            c.split_brain.after_sb_0pri,
            AfterSb0Pri::DiscardNode("beta".into())
        );
        assert_eq!(c.split_brain.after_sb_1pri, AfterSb1Pri::Consensus);
        assert_eq!(c.resync.rate, 100 << 20);
        assert!(c.resync.checksum);
        assert_eq!(c.activity_log.extents, 67);

        let c = parse(&edit(&example(), "rate = \"0\"", "rate = 5000000"));
        assert_eq!(c.resync.rate, 5_000_000);
        let c = parse(&edit(
            &example(),
            "fencing = \"witness\"",
            "fencing = \"handler\"",
        ));
        assert_eq!(c.failover.fencing, Fencing::Handler);
        let c = parse(&format!("{}\n[activity_log]\nextents = 65534\n", example()));
        assert_eq!(c.activity_log.extents, 65534);
    }

    #[test]
    fn unknown_keys_name_key_line_and_table() {
        let t = edit(
            &example(),
            "ping_interval = \"200ms\"",
            "ping_intervall = \"200ms\"",
        );
        let shown = fails(&t, Some(22), &[]);
        assert_eq!(
            shown,
            format!(
                "{FILE} line 22: unknown key \"ping_intervall\" in [net] (expected one of: \
                 ping_interval, ping_timeout, secret_file, connect_interval, peer_flush_interval)"
            )
        );

        let cases = [
            (
                "protocol = \"C\"",
                "protocol = \"C\"\nport = 1",
                "port",
                "[resource]",
            ),
            (
                "name = \"beta\"",
                "name = \"beta\"\nsize = \"1G\"",
                "size",
                "[[node]] #2",
            ),
            (
                "auto = true",
                "auto = true\nquorum = 2",
                "quorum",
                "[failover]",
            ),
            (
                "after_sb_2pri",
                "after_sb_3pri = \"x\"\nafter_sb_2pri",
                "after_sb_3pri",
                "[split_brain]",
            ),
            (
                "checksum = false",
                "checksum = false\nverify = true",
                "verify",
                "[resync]",
            ),
        ];
        for (from, to, key, table) in cases {
            let t = edit(&example(), from, to);
            let line = line_of(&t, &format!("{key} ="));
            fails(
                &t,
                Some(line),
                &[
                    &format!("unknown key \"{key}\" in {table}"),
                    "expected one of",
                ],
            );
        }

        let t = format!("{}\n[activity_log]\nextent = 100\n", example());
        fails(
            &t,
            Some(line_of(&t, "extent =")),
            &["unknown key \"extent\" in [activity_log]", "extents"],
        );

        // Top level: a stray key before the first table, and a misspelt table.
        let t = format!("version = 2\n{}", example());
        fails(
            &t,
            Some(1),
            &[
                "unknown key \"version\" at the top level",
                "resource, node, net",
            ],
        );
        let t = edit(&example(), "[resync]", "[resynch]");
        fails(
            &t,
            Some(line_of(&t, "[resynch]")),
            &["unknown table [resynch] at the top level", "resync"],
        );
    }

    #[test]
    fn missing_required_keys_name_their_table() {
        let t = edit(&example(), "name = \"r0\"\n", "");
        fails(
            &t,
            Some(1),
            &["[resource] is missing required key \"name\""],
        );

        let t = edit(&example(), "meta = \"/var/lib/tandem/beta.meta\"\n", "");
        fails(
            &t,
            Some(line_of(&t, "name = \"beta\"") - 1),
            &["[[node]] #2 is missing required key \"meta\""],
        );
        for (key, value) in [
            ("disk", "/var/lib/tandem/alpha.img"),
            ("replication", "10.0.0.1:7789"),
            ("nbd", "10.0.0.1:10809"),
            ("control", "/var/lib/tandem/r0-alpha.sock"),
        ] {
            let t = edit(&example(), &format!("{key} = \"{value}\""), "# gone");
            fails(
                &t,
                Some(5),
                &[&format!("[[node]] #1 is missing required key \"{key}\"")],
            );
        }
        let t = edit(&example(), "name = \"alpha\"\n", "");
        fails(
            &t,
            Some(5),
            &["[[node]] #1 is missing required key \"name\""],
        );

        let t = edit(
            &example(),
            "[resource]\nname = \"r0\"\nprotocol = \"C\"\n",
            "",
        );
        fails(&t, None, &["missing [resource] table"]);
    }

    #[test]
    fn wrong_types() {
        let t = edit(&example(), "auto = true", "auto = \"yes\"");
        fails(
            &t,
            Some(line_of(&t, "auto =")),
            &["key \"auto\" in [failover] must be true or false, not a string"],
        );
        let t = edit(&example(), "ping_timeout = \"1s\"", "ping_timeout = 1");
        fails(
            &t,
            Some(23),
            &[
                "key \"ping_timeout\" in [net] must be a duration string",
                "not an integer",
            ],
        );
        let t = edit(&example(), "nbd = \"10.0.0.2:10809\"", "nbd = 10809");
        fails(
            &t,
            Some(18),
            &["key \"nbd\" in [[node]] #2 must be a string, not an integer"],
        );
        let t = edit(&example(), "checksum = false", "checksum = 0");
        fails(&t, Some(40), &["\"checksum\"", "[resync]"]);
        let net = "[net]\nping_interval = \"200ms\"\nping_timeout = \"1s\"\n";
        let t = format!("net = 3\n{}", edit(&example(), net, "[unused]\n"));
        let t = edit(&t, "secret_file", "# secret_file");
        let t = edit(&t, "[unused]\n", "");
        fails(&t, Some(1), &["net must be a table [net], not an integer"]);
        let t = edit(&example(), "rate = \"0\"", "rate = 1.5");
        fails(&t, Some(39), &["\"rate\"", "not a float"]);
    }

    #[test]
    fn bad_durations() {
        let t = edit(
            &example(),
            "ping_interval = \"200ms\"",
            "ping_interval = \"200\"",
        );
        fails(
            &t,
            Some(22),
            &[
                "key \"ping_interval\" in [net]",
                "\"200\" is not a duration",
            ],
        );
        let t = edit(&example(), "lease = \"2s\"", "lease = \"two\"");
        fails(
            &t,
            Some(30),
            &["key \"lease\" in [failover]", "is not a duration"],
        );
        let t = edit(
            &example(),
            "ping_timeout = \"1s\"",
            "ping_timeout = \"1s\"\nconnect_interval = \"0s\"",
        );
        fails(
            &t,
            Some(24),
            &["key \"connect_interval\" in [net]", "longer than zero"],
        );
    }

    #[test]
    fn timing_contradictions() {
        let t = edit(
            &example(),
            "ping_timeout = \"1s\"",
            "ping_timeout = \"200ms\"",
        );
        fails(
            &t,
            Some(23),
            &["ping_timeout (200ms) must be longer than ping_interval (200ms)"],
        );
        // Against a default, the line of the key that is set.
        let t = edit(&example(), "ping_timeout = \"1s\"\n", "");
        let t = edit(&t, "ping_interval = \"200ms\"", "ping_interval = \"5s\"");
        fails(
            &t,
            Some(22),
            &["ping_timeout (1s, the default) must be longer than ping_interval (5s)"],
        );

        let t = edit(&example(), "lease = \"2s\"", "lease = \"500ms\"");
        fails(
            &t,
            Some(30),
            &["lease (500ms) in [failover] is shorter than ping_timeout (1s)"],
        );
        let t = edit(&example(), "lease = \"2s\"\n", "");
        let t = edit(&t, "ping_timeout = \"1s\"", "ping_timeout = \"3s\"");
        fails(
            &t,
            Some(28),
            &["lease (2s, the default)", "shorter than ping_timeout (3s)"],
        );
        // Leases only matter with a witness.
        let t = edit(&t, "fencing = \"witness\"", "fencing = \"none\"");
        parse(&t);
        // Equal is enough.
        parse(&edit(&example(), "lease = \"2s\"", "lease = \"1s\""));
    }

    /// Found with the `config` fuzz target's invariants: a lease the witness never grants
    /// (over an hour, or under a millisecond) was accepted, and every promotion was refused.
    #[test]
    fn witness_lease_must_be_one_the_witness_grants() {
        let t = edit(&example(), "lease = \"2s\"", "lease = \"2h\"");
        fails(
            &t,
            Some(30),
            &["lease (2h) in [failover] is outside what the witness grants (1ms to 1h)"],
        );
        let t = edit(
            &example(),
            "ping_interval = \"200ms\"",
            "ping_interval = \"100us\"",
        );
        let t = edit(&t, "ping_timeout = \"1s\"", "ping_timeout = \"200us\"");
        let t = edit(&t, "lease = \"2s\"", "lease = \"900us\"");
        fails(
            &t,
            Some(30),
            &["lease (900us)", "outside what the witness grants"],
        );
        // The limits themselves are fine, and other fencing does not use the lease.
        parse(&edit(&example(), "lease = \"2s\"", "lease = \"1h\""));
        let t = edit(&example(), "lease = \"2s\"", "lease = \"2h\"");
        parse(&edit(&t, "fencing = \"witness\"", "fencing = \"none\""));
    }

    #[test]
    fn bad_sizes() {
        let t = edit(&example(), "rate = \"0\"", "rate = \"100X\"");
        fails(
            &t,
            Some(39),
            &["key \"rate\" in [resync]", "unknown size suffix"],
        );
        let t = edit(&example(), "rate = \"0\"", "rate = \"fast\"");
        fails(&t, Some(39), &["key \"rate\" in [resync]", "is not a size"]);
        let t = edit(&example(), "rate = \"0\"", "rate = -1");
        fails(
            &t,
            Some(39),
            &["key \"rate\" in [resync]", "-1 is negative"],
        );
    }

    #[test]
    fn bad_policies() {
        let t = edit(
            &example(),
            "after_sb_0pri = \"disconnect\"",
            "after_sb_0pri = \"discard-older\"",
        );
        fails(
            &t,
            Some(34),
            &[
                "key \"after_sb_0pri\" in [split_brain]",
                "discard-node-NAME",
            ],
        );
        let t = edit(
            &example(),
            "after_sb_1pri = \"disconnect\"",
            "after_sb_1pri = \"discard-zero-changes\"",
        );
        fails(
            &t,
            Some(35),
            &[
                "key \"after_sb_1pri\"",
                "expected disconnect, consensus or discard-secondary",
            ],
        );
        let t = edit(
            &example(),
            "after_sb_2pri = \"disconnect\"",
            "after_sb_2pri = \"discard-secondary\"",
        );
        fails(
            &t,
            Some(36),
            &["key \"after_sb_2pri\"", "only disconnect is safe"],
        );
    }

    #[test]
    fn discard_node_must_name_a_node() {
        let t = edit(
            &example(),
            "after_sb_0pri = \"disconnect\"",
            "after_sb_0pri = \"discard-node-gamma\"",
        );
        fails(
            &t,
            Some(34),
            &[
                "key \"after_sb_0pri\"",
                "node \"gamma\", which is not in this file (nodes: alpha, beta)",
            ],
        );
    }

    #[test]
    fn bad_addresses() {
        let t = edit(
            &example(),
            "replication = \"10.0.0.2:7789\"",
            "replication = \"10.0.0.2\"",
        );
        fails(
            &t,
            Some(17),
            &["key \"replication\" in [[node]] \"beta\"", "not HOST:PORT"],
        );
        let t = edit(
            &example(),
            "replication = \"10.0.0.2:7789\"",
            "replication = \"unix:/x\"",
        );
        fails(&t, Some(17), &["key \"replication\"", "not a unix socket"]);
        let t = edit(
            &example(),
            "replication = \"10.0.0.2:7789\"",
            "replication = \"10.0.0.2:0\"",
        );
        fails(&t, Some(17), &["key \"replication\"", "port 0"]);
        let t = edit(
            &example(),
            "nbd = \"10.0.0.1:10809\"",
            "nbd = \"10.0.0.1:108090\"",
        );
        fails(
            &t,
            Some(10),
            &[
                "key \"nbd\" in [[node]] \"alpha\"",
                "not a number from 0 to 65535",
            ],
        );
        let t = edit(&example(), "nbd = \"10.0.0.1:10809\"", "nbd = \"unix:\"");
        fails(&t, Some(10), &["key \"nbd\"", "needs a path"]);
        let t = edit(
            &example(),
            "witness = \"10.0.0.3:7790\"",
            "witness = \"witness-host\"",
        );
        fails(
            &t,
            Some(29),
            &["key \"witness\" in [failover]", "not HOST:PORT"],
        );
    }

    #[test]
    fn protocol_must_be_c() {
        let t = edit(&example(), "protocol = \"C\"", "protocol = \"A\"");
        fails(
            &t,
            Some(3),
            &[
                "key \"protocol\" in [resource]",
                "\"A\" is not supported; only \"C\"",
            ],
        );
        let t = edit(&example(), "protocol = \"C\"", "protocol = \"B\"");
        fails(&t, Some(3), &["only \"C\""]);
        let t = edit(&example(), "protocol = \"C\"", "protocol = \"c\"");
        fails(
            &t,
            Some(3),
            &["key \"protocol\"", "only \"C\" is supported"],
        );
    }

    #[test]
    fn fencing_needs_its_settings() {
        let t = edit(&example(), "fencing = \"witness\"", "fencing = \"stonith\"");
        fails(
            &t,
            Some(28),
            &[
                "key \"fencing\" in [failover]",
                "expected witness, handler or none",
            ],
        );
        let t = edit(&example(), "witness = \"10.0.0.3:7790\"\n", "");
        fails(
            &t,
            Some(28),
            &["fencing = \"witness\" needs", "witness = \"HOST:PORT\""],
        );
        let t = edit(&example(), "fencing = \"witness\"", "fencing = \"handler\"");
        let t = edit(&t, "fence_handler = \"/usr/local/sbin/fence-peer\"", "");
        fails(&t, Some(28), &["fencing = \"handler\" needs fence_handler"]);
        // Without an explicit fencing key, the error points at [failover].
        let t = edit(
            &example(),
            "fencing = \"witness\"                     # witness | handler | none\n",
            "",
        );
        let t = edit(&t, "witness = \"10.0.0.3:7790\"\n", "");
        fails(&t, Some(26), &["(the default) needs", "witness"]);
        let t = edit(
            &example(),
            "fence_handler = \"/usr/local/sbin/fence-peer\"",
            "fence_handler = \"\"",
        );
        fails(&t, Some(31), &["key \"fence_handler\"", "empty path"]);
    }

    #[test]
    fn activity_log_extents_range() {
        for bad in ["66", "65535", "-1", "99999999999"] {
            let t = format!("{}\n[activity_log]\nextents = {bad}\n", example());
            fails(
                &t,
                Some(line_of(&t, "extents =")),
                &[
                    "key \"extents\" in [activity_log]",
                    "out of range (67..=65534)",
                ],
            );
        }
        let t = format!("{}\n[activity_log]\nextents = \"1237\"\n", example());
        fails(
            &t,
            Some(line_of(&t, "extents =")),
            &["must be an integer, not a string"],
        );
    }

    #[test]
    fn exactly_two_nodes() {
        let beta = &example()[example().find("[[node]]\nname = \"beta\"").unwrap()
            ..example().find("[net]").unwrap()];
        let t = edit(&example(), beta, "");
        fails(
            &t,
            Some(5),
            &["expected exactly two [[node]] tables, found 1"],
        );
        let gamma = beta
            .replace("beta", "gamma")
            .replace("10.0.0.2", "10.0.0.4");
        let t = edit(&example(), "[net]", &format!("{gamma}[net]"));
        fails(
            &t,
            Some(21),
            &["expected exactly two [[node]] tables, found 3"],
        );
        let start = example().find("[[node]]").unwrap();
        let t = example().replace(&example()[start..example().find("[net]").unwrap()], "");
        fails(&t, None, &["missing [[node]] tables"]);
        let t = edit(&example(), beta, "").replace("[[node]]", "[node]");
        fails(&t, Some(5), &["node must be written as [[node]] tables"]);
    }

    #[test]
    fn duplicate_node_names() {
        let t = edit(&example(), "name = \"beta\"", "name = \"alpha\"");
        fails(
            &t,
            Some(14),
            &[
                "two nodes are named \"alpha\"",
                "key \"name\" on lines 6 and 14",
            ],
        );
        let t = edit(&example(), "name = \"beta\"", "name = \"be ta\"");
        fails(&t, Some(14), &["key \"name\"", "not a valid name"]);
    }

    #[test]
    fn nodes_sharing_an_address_or_path() {
        let cases = [
            (
                "replication = \"10.0.0.2:7789\"",
                "replication = \"10.0.0.1:7789\"",
                "replication",
                9,
                17,
            ),
            (
                "nbd = \"10.0.0.2:10809\"",
                "nbd = \"10.0.0.1:10809\"",
                "nbd",
                10,
                18,
            ),
            (
                "control = \"/var/lib/tandem/r0-beta.sock\"",
                "control = \"/var/lib/tandem/r0-alpha.sock\"",
                "control",
                11,
                19,
            ),
            (
                "disk = \"/var/lib/tandem/beta.img\"",
                "disk = \"/var/lib/tandem/alpha.img\"",
                "disk",
                7,
                15,
            ),
            (
                "meta = \"/var/lib/tandem/beta.meta\"",
                "meta = \"/var/lib/tandem/alpha.meta\"",
                "meta",
                8,
                16,
            ),
        ];
        for (from, to, key, l1, l2) in cases {
            // Path clashes count between nodes on one machine only.
            let t = edit(&example(), from, to);
            if ["control", "disk", "meta"].contains(&key) {
                assert!(
                    Config::parse(&t, Path::new("r0.toml")).is_ok(),
                    "same {key} on two machines is fine"
                );
            }
            let t = if ["control", "disk", "meta"].contains(&key) {
                edit(
                    &edit(&t, "10.0.0.2:7789", "10.0.0.1:7790"),
                    "10.0.0.2:10809",
                    "10.0.0.1:10810",
                )
            } else {
                t
            };
            fails(
                &t,
                Some(l2),
                &[
                    &format!("nodes \"alpha\" and \"beta\" have the same {key}"),
                    &format!("(lines {l1} and {l2})"),
                ],
            );
        }
        // Across keys and within one node.
        let t = edit(
            &example(),
            "nbd = \"10.0.0.2:10809\"",
            "nbd = \"10.0.0.1:7789\"",
        );
        fails(&t, Some(18), &["replication of node \"alpha\" and nbd of node \"beta\" are the same: \"10.0.0.1:7789\"", "(lines 9 and 18)"]);
        let t = edit(
            &example(),
            "meta = \"/var/lib/tandem/alpha.meta\"",
            "meta = \"/var/lib/tandem/alpha.img\"",
        );
        fails(
            &t,
            Some(8),
            &[
                "node \"alpha\" uses \"/var/lib/tandem/alpha.img\" for both disk and meta",
                "(lines 7 and 8)",
            ],
        );
        let t = edit(
            &example(),
            "nbd = \"10.0.0.2:10809\"",
            "nbd = \"unix:/var/lib/tandem/r0-beta.sock\"",
        );
        fails(
            &t,
            Some(19),
            &["for both nbd and control", "(lines 18 and 19)"],
        );
    }

    #[test]
    fn toml_syntax_errors_carry_the_line() {
        let t = edit(&example(), "checksum = false", "checksum = ");
        let shown = fails(&t, Some(40), &["invalid string"]);
        assert!(!shown.contains('\n'), "{shown}");
        let t = edit(
            &example(),
            "lease = \"2s\"",
            "lease = \"2s\"\nlease = \"3s\"",
        );
        fails(&t, Some(31), &["duplicate key"]);
        let t = edit(&example(), "lease = \"2s\"", "lease = 1979-05-27");
        fails(&t, Some(30), &["dates and times are not used"]);
    }

    #[test]
    fn node_and_peer() {
        let c = parse(&example());
        assert_eq!(c.node("alpha").unwrap().replication, "10.0.0.1:7789");
        assert_eq!(c.node("beta").unwrap().name, "beta");
        assert_eq!(c.peer("alpha").unwrap().name, "beta");
        assert_eq!(c.peer("beta").unwrap().name, "alpha");
        assert_eq!(c.node_names(), ["alpha", "beta"]);
        for e in [c.node("gamma").unwrap_err(), c.peer("gamma").unwrap_err()] {
            assert_eq!(e.line, None);
            assert_eq!(
                e.to_string(),
                format!("{FILE}: node \"gamma\" is not in this file (nodes: alpha, beta)")
            );
        }
    }

    #[test]
    fn secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("r0.secret");
        let text = EXAMPLE.replace("DIR", &dir.path().display().to_string());
        let c = parse(&text);

        let e = c.secret().unwrap_err();
        assert_eq!(e.line, Some(24));
        assert!(
            e.to_string()
                .contains(&format!("secret_file {} does not exist", secret.display())),
            "{e}"
        );
        assert_eq!(c.secret_permissions_warning(), None);

        for empty in ["", "\n", "\r\n"] {
            std::fs::write(&secret, empty).unwrap();
            let e = c.secret().unwrap_err().to_string();
            assert!(
                e.contains(&format!("{} holds an empty secret", secret.display())),
                "{e}"
            );
        }

        std::fs::write(&secret, "s3cret\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(c.secret().unwrap(), b"s3cret");
        assert_eq!(c.secret_permissions_warning(), None);
        std::fs::write(&secret, "two\nlines\n\n").unwrap();
        assert_eq!(c.secret().unwrap(), b"two\nlines\n");
        std::fs::write(&secret, "no-newline").unwrap();
        assert_eq!(c.secret().unwrap(), b"no-newline");

        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(c.secret().unwrap(), b"no-newline");
        let w = c.secret_permissions_warning().unwrap();
        assert!(w.contains("mode 0644") && w.contains("chmod 600"), "{w}");

        let c = parse(&edit(
            &text,
            &format!("secret_file = \"{}\"", secret.display()),
            "",
        ));
        let e = c.secret().unwrap_err().to_string();
        assert!(
            e.contains("no secret_file in [net]") && e.contains("peers must authenticate"),
            "{e}"
        );
        assert_eq!(c.secret_permissions_warning(), None);
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.toml");
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.line, None);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read", path.display())),
            "{e}"
        );
    }
}
