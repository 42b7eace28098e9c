//! Command-line interface: argument definitions and the commands behind them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

use crate::nbd::{self, ListenAddr, Listener};
use crate::store::{self, BackingOptions, EngineChoice, FaultRule, FaultStore, SharedStore};

/// Exit codes from the product contract.
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
}

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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandem: cannot start the runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(exit::ERROR)
        }
    }
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

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
