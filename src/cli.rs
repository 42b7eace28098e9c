//! Command-line interface: argument definitions and the commands behind them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::failure::{exit, Failure};
use crate::nbd::{self, ListenAddr, Listener};
use crate::signals::wait_for_signal;
use crate::store::{self, BackingOptions, EngineChoice, FaultRule, FaultStore, SharedStore};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "A DRBD-style replicated block device exported over NBD"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Export a file or block device over NBD, without replication.
    Serve(ServeArgs),
    /// Initialise this node's metadata (refuses to overwrite valid metadata without --force).
    CreateMd {
        #[command(flatten)]
        res: ResourceArgs,
        #[arg(long)]
        force: bool,
        /// Create (sparse) or check the backing disk at this size; default: the disk's size.
        #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_bytes)]
        size: Option<u64>,
    },
    /// Run this node in the foreground until SIGTERM/SIGINT.
    Up {
        #[command(flatten)]
        res: ResourceArgs,
        /// Testing: hold writes in memory until a flush, so a kill -9 loses them as an
        /// operating-system crash would.
        #[arg(long, hide = true)]
        volatile_cache: bool,
        /// Testing: inject storage faults into the data disk, from a file of
        /// OP:START-END:ACTION rules (one per line; empty = none), read at start and again
        /// on SIGHUP.
        #[arg(long, value_name = "PATH", hide = true)]
        fault_file: Option<PathBuf>,
        /// Testing: the boot id to compare with the one on record and to record, instead of
        /// the kernel's (another one is a machine that went down and came back).
        #[arg(long, value_name = "HEX", hide = true, value_parser = crate::meta::parse_boot_id)]
        boot_id: Option<[u8; 16]>,
    },
    /// Show one node's view of the resource.
    Status {
        #[command(flatten)]
        res: ResourceArgs,
        #[arg(long)]
        json: bool,
        /// Redraw every half second, with a resync progress bar.
        #[arg(long)]
        watch: bool,
    },
    /// Stream state changes as JSON lines until interrupted.
    Events {
        #[command(flatten)]
        res: ResourceArgs,
    },
    /// Promote this node.
    Primary {
        #[command(flatten)]
        res: ResourceArgs,
        /// Promote without a proven up-to-date disk or outdated peer.
        #[arg(long)]
        force: bool,
    },
    /// Demote this node.
    Secondary {
        #[command(flatten)]
        res: ResourceArgs,
    },
    /// Planned role swap: drain and demote the primary, promote NAME with a new epoch.
    /// Refused (exit 3) unless NAME is Connected and UpToDate.
    Switchover {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Ask this node's control socket (default: the first node of the config whose
        /// control socket answers on this machine).
        #[arg(short = 'n', long = "node", env = "TANDEM_NODE", value_name = "NAME")]
        node: Option<String>,
        /// The node that becomes primary.
        #[arg(long, value_name = "NAME")]
        to: String,
    },
    /// Bring the peer link up (clears a split-brain StandAlone).
    Connect {
        #[command(flatten)]
        res: ResourceArgs,
        /// Resolve a split brain by making this node a full-sync target.
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Take the peer link down and stay StandAlone.
    Disconnect {
        #[command(flatten)]
        res: ResourceArgs,
    },
    /// Discard this node's data and full-resync it from the peer.
    Invalidate {
        #[command(flatten)]
        res: ResourceArgs,
    },
    /// Online verify against the peer; differing blocks become out of sync.
    Verify {
        #[command(flatten)]
        res: ResourceArgs,
        #[arg(long)]
        wait: bool,
    },
    /// Print on-disk metadata.
    DumpMd {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A local NBD endpoint (or the kernel's /dev/nbdN) that follows whichever node is
    /// primary, replaying unanswered requests after a failover.
    #[command(group(clap::ArgGroup::new("endpoint").required(true).args(["listen", "device"])))]
    Attach {
        #[command(flatten)]
        cfg: ConfigArg,
        /// Serve a local NBD endpoint on HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        listen: Option<ListenAddr>,
        /// Attach the kernel's NBD device (/dev/nbdN) instead, over netlink, and re-point it
        /// at the new primary whenever the kernel reports the link dead.
        #[arg(long, value_name = "PATH")]
        device: Option<PathBuf>,
        /// Fail requests with EIO after this long without a primary (default: [failover]
        /// attach_timeout, 30s). With --device: the kernel's dead connection timeout.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// A whole pair, a witness and an attach endpoint on loopback, with sparse files in a
    /// temporary directory; Ctrl-C stops and removes everything.
    Demo {
        /// Also run a failover drill: load, kill the primary, resync, fail back, verify.
        #[arg(long)]
        drill: bool,
        /// Volume size.
        #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = crate::units::parse_bytes)]
        size: u64,
        /// Keep everything in this directory (kept afterwards) instead of a temporary one.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Run the fencing witness until SIGTERM/SIGINT.
    Witness {
        /// HOST:PORT or unix:PATH.
        #[arg(long, value_name = "ADDR")]
        listen: ListenAddr,
        /// State directory: <resource>.secret files in, <resource>.state files out.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
}

/// `-c/--config` alone, for commands about the whole resource rather than one node.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArg {
    /// Resource config file.
    #[arg(
        short = 'c',
        long = "config",
        env = "TANDEM_CONFIG",
        value_name = "FILE"
    )]
    pub config: PathBuf,
}

/// `-c/--config` and `-n/--node`: one node of a resource.
#[derive(clap::Args, Debug, Clone)]
pub struct ResourceArgs {
    #[command(flatten)]
    pub cfg: ConfigArg,
    /// This node's name in the config.
    #[arg(short = 'n', long = "node", env = "TANDEM_NODE", value_name = "NAME")]
    pub node: String,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Backing file or block device.
    #[arg(long, value_name = "PATH")]
    pub disk: PathBuf,
    /// HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    pub listen: ListenAddr,
    /// Export name (clients asking for the empty name get this export too).
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export: String,
    /// Export size; creates or extends (sparsely) a file that is smaller. Suffixes K, M, G, T.
    #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_bytes)]
    pub size: Option<u64>,
    /// Refuse writes (EPERM) and open the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT) for 4 KiB-aligned requests.
    #[arg(long)]
    pub direct: bool,
    /// Storage engine: io_uring where available, else a thread pool.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Inject a storage fault (testing): OP:START-END:ACTION, e.g. read:0-4096:eio or
    /// write:1M-2M:delay=50ms. Repeatable.
    #[arg(long, value_name = "SPEC", value_parser = FaultRule::parse, hide = true)]
    pub fault: Vec<FaultRule>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Auto,
    IoUring,
    Threads,
}

impl From<Engine> for EngineChoice {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Auto => EngineChoice::Auto,
            Engine::IoUring => EngineChoice::Uring,
            Engine::Threads => EngineChoice::Threads,
        }
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A node's tokio workers run protocol logic and small page-cache copies; larger IO runs on
    // the ring thread and io_uring's kernel workers. Half the CPUs leaves room for those and
    // for the peer's traffic: measured on 2 cores, 1 worker gave 1.4x the replicated 4 KiB
    // write IOPS and 2x the resync rate of 2. TOKIO_WORKER_THREADS still overrides.
    if matches!(cli.command, Command::Up { .. } | Command::Attach { .. })
        && std::env::var_os("TOKIO_WORKER_THREADS").is_none()
    {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.worker_threads((cpus / 2).max(1));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem: cannot start the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let result: Result<(), Failure> = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await.map_err(Failure::from),
            Command::CreateMd { res, force, size } => create_md(&res, force, size),
            Command::Up {
                res,
                volatile_cache,
                fault_file,
                boot_id,
            } => {
                let testing = crate::node::up::Testing {
                    volatile_cache,
                    fault_file,
                    boot_id,
                };
                crate::node::up::up(&res.cfg.config, &res.node, testing).await
            }
            Command::Status { res, json, watch } => status(&res, json, watch).await,
            Command::Events { res } => events(&res).await,
            Command::Primary { res, force } => {
                simple(&res, serde_json::json!({"cmd": "primary", "force": force})).await
            }
            Command::Secondary { res } => {
                simple(&res, serde_json::json!({"cmd": "secondary"})).await
            }
            Command::Connect {
                res,
                discard_my_data,
            } => {
                simple(
                    &res,
                    serde_json::json!({"cmd": "connect", "discard_my_data": discard_my_data}),
                )
                .await
            }
            Command::Disconnect { res } => {
                simple(&res, serde_json::json!({"cmd": "disconnect"})).await
            }
            Command::Invalidate { res } => {
                simple(&res, serde_json::json!({"cmd": "invalidate"})).await
            }
            Command::Verify { res, wait } => verify(&res, wait).await,
            Command::Switchover { cfg, node, to } => switchover(&cfg.config, node, &to).await,
            Command::DumpMd { path, json } => dump_md(&path, json),
            Command::Attach {
                cfg,
                listen,
                device,
                timeout,
            } => {
                let cfg = crate::config::Config::load(&cfg.config)?;
                match (device, listen) {
                    (Some(dev), _) => crate::attach::run_device(&cfg, &dev, timeout).await,
                    (None, Some(listen)) => crate::attach::run(&cfg, &listen, timeout).await,
                    (None, None) => Err("attach needs --listen or --device".into()),
                }
                .map_err(Failure::error)
            }
            Command::Demo { drill, size, dir } => {
                crate::demo::run(crate::demo::Options { drill, size, dir })
                    .await
                    .map_err(Failure::error)
            }
            Command::Witness { listen, data } => {
                crate::witness::run(&listen, &data, wait_for_signal())
                    .await
                    .map_err(|e| Failure::error(format!("witness: {e}")))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(f) => {
            eprintln!("tandem: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn create_md(res: &ResourceArgs, force: bool, size: Option<u64>) -> Result<(), Failure> {
    let cfg = crate::config::Config::load(&res.cfg.config)?;
    let me = cfg.node(&res.node)?;
    let opts = BackingOptions {
        size,
        read_only: false,
        direct: false,
    };
    let backing = store::open_backing(&me.disk, &opts).map_err(|e| e.to_string())?;
    crate::meta::Meta::create_with(
        &me.meta,
        &cfg.resource.name,
        &me.name,
        backing.size,
        cfg.activity_log.extents,
        force,
    )
    .map_err(|e| Failure::error(e.to_string()))?;
    println!(
        "initialised metadata for {}/{} in {} ({} bytes of data)",
        cfg.resource.name,
        me.name,
        me.meta.display(),
        backing.size
    );
    Ok(())
}

fn dump_md(path: &std::path::Path, json: bool) -> Result<(), Failure> {
    let v = crate::meta::dump_file(path).map_err(|e| Failure::error(e.to_string()))?;
    if json {
        println!("{v}");
    } else {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    Ok(())
}

/// Send one request to the node's control socket; refusals carry their exit code.
async fn ask(res: &ResourceArgs, req: serde_json::Value) -> Result<serde_json::Value, Failure> {
    let cfg = crate::config::Config::load(&res.cfg.config)?;
    let path = cfg.node(&res.node)?.control.clone();
    let reply = crate::control::request(&path, &req).await.map_err(|e| {
        Failure::unreachable(format!(
            "cannot reach node {} at {}: {e} (is `tandem up` running?)",
            res.node,
            path.display()
        ))
    })?;
    if reply["ok"].as_bool() == Some(true) {
        Ok(reply["result"].clone())
    } else {
        Err(Failure::from(&reply))
    }
}

/// Run a switchover through whichever node's control socket answers here; that node
/// coordinates with its peer over the replication link.
async fn switchover(
    config: &std::path::Path,
    node: Option<String>,
    to: &str,
) -> Result<(), Failure> {
    let cfg = crate::config::Config::load(config)?;
    cfg.node(to)?;
    let names: Vec<String> = match node {
        Some(n) => vec![cfg.node(&n)?.name.clone()],
        None => cfg.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    let mut unreachable = Vec::new();
    for name in names {
        let path = cfg.node(&name)?.control.clone();
        let req = serde_json::json!({"cmd": "switchover", "to": to});
        match crate::control::request(&path, &req).await {
            Ok(reply) if reply["ok"].as_bool() == Some(true) => {
                println!("{}", reply["result"]["message"].as_str().unwrap_or("done"));
                return Ok(());
            }
            Ok(reply) => return Err(Failure::from(&reply)),
            Err(e) => unreachable.push(format!("{name} at {}: {e}", path.display())),
        }
    }
    Err(Failure::unreachable(format!(
        "no node answered on this machine ({}); run switchover on a node of the pair",
        unreachable.join("; ")
    )))
}

async fn simple(res: &ResourceArgs, req: serde_json::Value) -> Result<(), Failure> {
    let r = ask(res, req).await?;
    if let Some(m) = r["message"].as_str() {
        println!("{m}");
    }
    Ok(())
}

async fn verify(res: &ResourceArgs, wait: bool) -> Result<(), Failure> {
    let r = ask(res, serde_json::json!({"cmd": "verify", "wait": wait})).await?;
    match r["mismatched_bytes"].as_u64() {
        Some(m) => println!(
            "verify finished: {m} mismatched bytes of {}",
            r["done_bytes"]
        ),
        None => println!("{}", r["message"].as_str().unwrap_or("")),
    }
    Ok(())
}

async fn events(res: &ResourceArgs) -> Result<(), Failure> {
    let cfg = crate::config::Config::load(&res.cfg.config)?;
    let path = cfg.node(&res.node)?.control.clone();
    crate::control::stream_events(&path, |line| println!("{line}"))
        .await
        .map_err(|e| Failure::unreachable(format!("cannot reach node {}: {e}", res.node)))
}

async fn status(res: &ResourceArgs, json: bool, watch: bool) -> Result<(), Failure> {
    loop {
        let s = ask(res, serde_json::json!({"cmd": "status"})).await?;
        if json {
            println!("{s}");
        } else {
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render_status(&s));
        }
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn render_status(s: &serde_json::Value) -> String {
    let mut out = format!(
        "{} role:{} disk:{} connection:{}\n",
        s["resource"].as_str().unwrap_or("?"),
        s["role"].as_str().unwrap_or("?"),
        s["disk"].as_str().unwrap_or("?"),
        s["connection"].as_str().unwrap_or("?"),
    );
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_owned();
    out += &format!(
        "  node {}  generation {}\n",
        text(&s["node"]),
        text(&s["generation"]["current"])
    );
    match s["peer"].as_object() {
        Some(p) => {
            out += &format!(
                "  peer {} role:{} disk:{}\n",
                text(&p["node"]),
                text(&p["role"]),
                text(&p["disk"])
            )
        }
        None => out += "  peer not connected\n",
    }
    out += &format!("  out of sync: {} bytes\n", s["out_of_sync_bytes"]);
    for (label, key) in [("resync", "resync"), ("verify", "verify")] {
        if let Some(p) = s[key].as_object() {
            let done = p["done_bytes"].as_u64().unwrap_or(0);
            let total = p["total_bytes"].as_u64().unwrap_or(0).max(1);
            let pct = (done as f64 / total as f64 * 100.0).min(100.0);
            let bar: String = (0..40)
                .map(|i| if (i as f64) < pct / 2.5 { '#' } else { '.' })
                .collect();
            out += &format!(
                "  {label}: [{bar}] {pct:5.1}% {done}/{total} bytes, {} MiB/s\n",
                p["bytes_per_sec"].as_u64().unwrap_or(0) / (1 << 20)
            );
        }
    }
    if s["split_brain"].as_bool() == Some(true) {
        out += &format!(
            "  SPLIT BRAIN: {}\n",
            s["split_brain_detail"].as_str().unwrap_or("")
        );
    }
    if let Some(r) = s["last_refusal"].as_str() {
        out += &format!("  refused: {r}\n");
    }
    out
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let opts = BackingOptions {
        size: args.size,
        read_only: args.read_only,
        direct: args.direct,
    };
    let backing = store::open_backing(&args.disk, &opts).map_err(|e| e.to_string())?;
    let mut store: SharedStore = store::open_store(backing, args.engine.into())
        .map_err(|e| format!("{}: {e}", args.disk.display()))?;
    if !args.fault.is_empty() {
        tracing::warn!("fault injection active: {:?}", args.fault);
        store = std::sync::Arc::new(FaultStore::new(store, args.fault));
    }
    let listener = Listener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    tracing::info!(
        "serving {} ({} bytes, {} engine{}) as export {:?} on {}",
        args.disk.display(),
        store.size(),
        store.engine(),
        if args.read_only { ", read-only" } else { "" },
        args.export,
        listener.local_addr()
    );
    let export = nbd::Export::new(args.export, store, args.read_only);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = stop_tx.send(true);
    });
    nbd::serve(listener, export, stop_rx)
        .await
        .map_err(|e| format!("final flush failed: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}
