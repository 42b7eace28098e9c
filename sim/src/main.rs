//! `tandem-sim`: run seeds of the deterministic simulator; a failing seed prints its trace
//! and is rerun alone with `--seed N`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::Parser;
use tandem::mutation::Mutation;
use tandem_sim::{run, Options, Outcome};

#[derive(Parser)]
#[command(about = "tandem's deterministic simulator")]
struct Args {
    /// Run this many seeds (a soak: as many as asked).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    start: u64,
    /// Run only this seed and print its whole trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Faults per seed.
    #[arg(long, default_value_t = 12)]
    faults: u64,
    /// Remove one safety mechanism (lease-check, link-loss-fencing, unflushed-set,
    /// new-generation, activity-log) and report how many seeds catch it.
    #[arg(long)]
    mutation: Option<String>,
    /// Stop at the first failing seed.
    #[arg(long)]
    stop: bool,
    /// Worker threads (default: the CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// With --seed: trace every write, copy and loss of this block.
    #[arg(long)]
    watch: Option<usize>,
    /// No power losses (a node's page cache lost in part); kills only.
    #[arg(long)]
    no_power_loss: bool,
    /// Power losses only on a node that is secondary at the time (a primary's is a kill).
    #[arg(long)]
    secondary_power_loss_only: bool,
    /// Also fail metadata writes with EIO for a while (finds an open problem; see the README).
    #[arg(long)]
    meta_eio: bool,
    /// Directory for the metadata files (default: /dev/shm if present, else the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let mutation = args.mutation.as_deref().map(|m| {
        Mutation::parse(m).unwrap_or_else(|| {
            eprintln!("tandem-sim: unknown mutation {m:?}");
            std::process::exit(2)
        })
    });
    let dir = args.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let opts = Options {
        faults: args.faults,
        mutation,
        full_trace: args.seed.is_some(),
        dir,
        watch: args.watch,
        power_loss: !args.no_power_loss,
        secondary_power_loss_only: args.secondary_power_loss_only,
        meta_eio: args.meta_eio,
    };
    if let Some(seed) = args.seed {
        let o = run(seed, &opts);
        for l in &o.trace {
            println!("{l}");
        }
        report_one(&o);
        std::process::exit(if o.violations.is_empty() { 0 } else { 1 });
    }
    let started = Instant::now();
    let cpu0 = cpu_seconds();
    let next = Arc::new(AtomicU64::new(args.start));
    let end = args.start + args.seeds;
    let failed: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let totals: Arc<Mutex<Totals>> = Arc::default();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (next, failed, totals, opts) = (&next, &failed, &totals, &opts);
            let stop = args.stop;
            s.spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= end {
                    return;
                }
                let o = run(seed, opts);
                totals.lock().unwrap().add(&o);
                if !o.violations.is_empty() {
                    if stop {
                        next.store(end, Ordering::SeqCst);
                    }
                    failed.lock().unwrap().push(o);
                }
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let t = totals.lock().unwrap();
    let mut failed = std::mem::take(&mut *failed.lock().unwrap());
    failed.sort_by_key(|o| o.seed);
    if let Some(first) = failed.first() {
        println!("--- trace of seed {} (last events) ---", first.seed);
        for l in &first.trace {
            println!("{l}");
        }
    }
    for o in &failed {
        println!("seed {}: {}", o.seed, o.violations[0]);
    }
    println!("mutation: {}", mutation.map_or("none", |m| m.name()));
    println!(
        "seeds: {} run, {} failed{}",
        t.seeds,
        failed.len(),
        failed.first().map_or(String::new(), |o| format!(
            " (first: {}; rerun with --seed {})",
            o.seed, o.seed
        ))
    );
    println!(
        "faults: {} ({:.0} per CPU second); events: {}; simulated time: {:.0} s",
        t.faults,
        t.faults as f64 / cpu.max(1e-9),
        t.events,
        t.sim_micros as f64 / 1e6
    );
    println!(
        "acknowledged writes: {}, failed writes: {}, acknowledged flushes: {}, reads checked: {}, promotions: {} ({} forced, {} split brains detected after them), crashes: {}",
        t.acked_writes, t.failed_writes, t.acked_flushes, t.reads, t.promotions, t.forced, t.split_brains, t.crashes
    );
    if t.converged > 0 {
        println!(
            "converged after healing: mean {:.1} s, max {:.1} s (simulated)",
            t.converge_sum / t.converged as f64,
            t.converge_max
        );
    }
    println!("wall {wall:.1} s, CPU {cpu:.1} s, {threads} thread(s)");
    std::process::exit(if failed.is_empty() { 0 } else { 1 });
}

#[derive(Default)]
struct Totals {
    seeds: u64,
    faults: u64,
    events: u64,
    sim_micros: u64,
    acked_writes: u64,
    failed_writes: u64,
    acked_flushes: u64,
    reads: u64,
    promotions: u64,
    forced: u64,
    split_brains: u64,
    crashes: u64,
    converged: u64,
    converge_sum: f64,
    converge_max: f64,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.seeds += 1;
        self.faults += o.faults;
        self.events += o.events;
        self.sim_micros += o.sim_micros;
        self.acked_writes += o.acked_writes;
        self.failed_writes += o.failed_writes;
        self.acked_flushes += o.acked_flushes;
        self.reads += o.reads_checked;
        self.promotions += o.promotions;
        self.forced += o.forced;
        self.split_brains += o.split_brains;
        self.crashes += o.crashes;
        if let Some(c) = o.converged_after {
            let s = c as f64 / 1e6;
            self.converged += 1;
            self.converge_sum += s;
            self.converge_max = self.converge_max.max(s);
        }
    }
}

fn report_one(o: &Outcome) {
    println!(
        "seed {}: {} faults, {} events, {} acknowledged writes, {} flushes, {} promotions, converged after {}",
        o.seed,
        o.faults,
        o.events,
        o.acked_writes,
        o.acked_flushes,
        o.promotions,
        o.converged_after
            .map_or("-".into(), |c| format!("{:.1} s", c as f64 / 1e6))
    );
    for v in &o.violations {
        println!("VIOLATION: {v}");
    }
}

/// CPU seconds this process used so far (user + system).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let hz = 100.0;
    (ticks(11) + ticks(12)) / hz
}
