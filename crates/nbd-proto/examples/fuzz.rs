//! The long random-input run of nbd-proto's decoders (`npm run fuzz`).
//!
//! ```text
//! cargo run --release -p nbd-proto --example fuzz -- [options]
//!   --target NAME       handshake, replies or all (default all)
//!   --iterations N      cases per target (default 10000000)
//!   --seed S            run seed, decimal or 0x-hex (default: from the clock, printed)
//!   --start I           first case index (default 0)
//!   --jobs J            threads per target (default 1)
//!   --replay HEX        check one encoded case of --target and print the verdict
//!   --write-corpus DIR  write --iterations generated cases per target into DIR/<target>/
//!                       (seeds for cargo-fuzz)
//! ```
//!
//! It prints inputs per second and totals per target, and on a violated invariant, a
//! panic or a hang, the seed, case index and the case as hex (replayable with
//! `--replay`), exiting non-zero.

#[path = "../tests/harness/mod.rs"]
mod harness;

use harness::{Summary, Target};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

struct Options {
    targets: Vec<Target>,
    iterations: u64,
    seed: u64,
    start: u64,
    jobs: u64,
    replay: Option<String>,
    write_corpus: Option<String>,
}

fn usage(message: &str) -> ! {
    eprintln!("fuzz: {message}\nsee the comment at the top of crates/nbd-proto/examples/fuzz.rs");
    std::process::exit(2);
}

fn number(text: &str) -> u64 {
    let text = text.replace('_', "");
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.unwrap_or_else(|_| usage(&format!("{text:?} is not a number")))
}

fn parse() -> Options {
    let mut o = Options {
        targets: Target::ALL.to_vec(),
        iterations: 10_000_000,
        seed: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| harness::mix(d.as_nanos() as u64))
            .unwrap_or(1),
        start: 0,
        jobs: 1,
        replay: None,
        write_corpus: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--target" => {
                let v = value();
                o.targets = if v == "all" {
                    Target::ALL.to_vec()
                } else {
                    vec![Target::from_name(&v).unwrap_or_else(|| usage(&format!("no target {v:?}")))]
                };
            }
            "--iterations" => o.iterations = number(&value()),
            "--seed" => o.seed = number(&value()),
            "--start" => o.start = number(&value()),
            "--jobs" => o.jobs = number(&value()).max(1),
            "--replay" => o.replay = Some(value()),
            "--write-corpus" => o.write_corpus = Some(value()),
            "--help" | "-h" => usage("usage"),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    o
}

fn replay(targets: &[Target], hex: &str) -> ! {
    let [target] = targets else {
        usage("--replay needs one --target")
    };
    let bytes = harness::from_hex(hex).unwrap_or_else(|| usage("--replay needs hex digits"));
    match target.check_bytes(&bytes) {
        Ok(tallies) => {
            println!("{}: case passes: {tallies:?}", target.name());
            std::process::exit(0);
        }
        Err(message) => {
            println!("{}: case fails: {message}", target.name());
            std::process::exit(1);
        }
    }
}

fn write_corpus(o: &Options, dir: &str) -> ! {
    for &target in &o.targets {
        let path = std::path::Path::new(dir).join(target.name());
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| usage(&format!("{}: {e}", path.display())));
        for index in o.start..o.start + o.iterations {
            let mut rng = harness::Rng::new(harness::case_seed(o.seed, index));
            let case = target.generate(&mut rng);
            let file = path.join(format!("gen-{:016x}-{index}", o.seed));
            std::fs::write(&file, case)
                .unwrap_or_else(|e| usage(&format!("{}: {e}", file.display())));
        }
        println!(
            "{}: wrote {} cases to {}",
            target.name(),
            o.iterations,
            path.display()
        );
    }
    std::process::exit(0);
}

/// Runs `count` cases of `target` from `start` on `jobs` threads, reporting progress.
fn run(
    target: Target,
    seed: u64,
    start: u64,
    count: u64,
    jobs: u64,
) -> Result<Summary, harness::Failure> {
    let began = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let per_job = count.div_ceil(jobs);
    let mut handles = Vec::new();
    for job in 0..jobs {
        let first = start + job * per_job;
        let n = per_job.min((start + count).saturating_sub(first));
        let done = done.clone();
        handles.push(std::thread::spawn(move || {
            let progress = Arc::new(AtomicU64::new(first));
            harness::spawn_watchdog(
                format!("{} seed {seed:#x}", target.name()),
                progress.clone(),
                Duration::from_secs(30),
            );
            let mut total = Summary::default();
            // Batches, so that progress can be shown while the run goes on.
            let mut at = first;
            while at < first + n {
                let batch = 20_000.min(first + n - at);
                let s = harness::run_seeded(target, seed, at, batch, &progress)?;
                total.cases += s.cases;
                total.input_bytes += s.input_bytes;
                for (label, k) in s.labels {
                    *total.labels.entry(label).or_default() += k;
                }
                done.fetch_add(batch, Ordering::Relaxed);
                at += batch;
            }
            progress.store(u64::MAX, Ordering::Relaxed);
            Ok(total)
        }));
    }
    let mut last_report = Instant::now();
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
        if last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            let n = done.load(Ordering::Relaxed);
            eprintln!(
                "  {}: {n}/{count} ({:.0}/s)",
                target.name(),
                n as f64 / began.elapsed().as_secs_f64()
            );
        }
    }
    let mut total = Summary::default();
    for h in handles {
        let s = h.join().expect("a fuzz thread panicked outside a check")?;
        total.cases += s.cases;
        total.input_bytes += s.input_bytes;
        for (label, k) in s.labels {
            *total.labels.entry(label).or_default() += k;
        }
    }
    total.elapsed = began.elapsed();
    Ok(total)
}

fn main() {
    let o = parse();
    if let Some(hex) = &o.replay {
        replay(&o.targets, hex);
    }
    if let Some(dir) = &o.write_corpus {
        write_corpus(&o, dir);
    }
    // Library panics are caught and reported with their case; the default hook would
    // print each one a second time.
    std::panic::set_hook(Box::new(|_| {}));
    println!(
        "fuzz: seed {:#x}, cases {}..{} per target, {} job(s)",
        o.seed,
        o.start,
        o.start + o.iterations,
        o.jobs
    );
    let mut failed = false;
    for &target in &o.targets {
        match run(target, o.seed, o.start, o.iterations, o.jobs) {
            Ok(s) => {
                let secs = s.elapsed.as_secs_f64();
                println!(
                    "{}: {} inputs ({:.1} MB) in {secs:.1} s, {:.0} inputs/s; no violation",
                    target.name(),
                    s.cases,
                    s.input_bytes as f64 / 1e6,
                    s.cases as f64 / secs
                );
                println!("  seen: {:?}", s.labels);
            }
            Err(f) => {
                println!("VIOLATION: {f}");
                println!(
                    "  replay: cargo run --release -p nbd-proto --example fuzz -- --target {} --replay {}",
                    f.target.name(),
                    harness::to_hex(&f.case)
                );
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
