//! Exhaustive check of the DSM protocol on a small configuration.
//!
//! ```text
//! check-dsm [--nodes 3] [--pages 2] [--ops 2] [--threads 1]
//!           [--homes interleaved|all0|blocked] [--broken skip-invalidation|no-done-wait|keep-write]
//! ```
//! Prints `states explored: N` and `invariants held`, or a counterexample trace and exits
//! with status 1.

use dsm_proto::model::{explore, Config, HomeKind};
use dsm_proto::Bug;
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: check-dsm [--nodes N] [--pages P] [--ops K] [--threads T] \
[--homes interleaved|all0|blocked] [--broken skip-invalidation|no-done-wait|keep-write]";

fn parse(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::new(3, 2, 2);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || -> Result<u64, String> {
            val.parse::<u64>().map_err(|e| format!("{flag} {val}: {e}"))
        };
        match flag.as_str() {
            "--nodes" => {
                cfg.nodes = u16::try_from(num()?).map_err(|e| format!("--nodes: {e}"))?;
            }
            "--pages" => cfg.pages = num()?,
            "--ops" => cfg.ops = usize::try_from(num()?).map_err(|e| format!("--ops: {e}"))?,
            "--threads" => {
                cfg.threads = usize::try_from(num()?).map_err(|e| format!("--threads: {e}"))?;
            }
            "--homes" => {
                cfg.homes = match val.as_str() {
                    "interleaved" => HomeKind::Interleaved,
                    "all0" => HomeKind::AllOnNode(0),
                    "blocked" => HomeKind::Blocked,
                    _ => return Err(format!("unknown home policy {val}")),
                }
            }
            "--broken" => {
                cfg.bug = Some(Bug::from_name(val).ok_or_else(|| format!("unknown bug {val}"))?);
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if cfg.nodes == 0 || cfg.pages == 0 || cfg.threads == 0 {
        return Err("nodes, pages and threads must be positive".into());
    }
    Ok(cfg)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("check-dsm: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!(
        "checking {} nodes x {} pages x {} ops per thread x {} threads per node, homes {:?}, all programs{}",
        cfg.nodes,
        cfg.pages,
        cfg.ops,
        cfg.threads,
        cfg.homes,
        match cfg.bug {
            Some(b) => format!(", INJECTED BUG {b:?}"),
            None => String::new(),
        }
    );
    let start = Instant::now();
    let result = explore(&cfg, |n| {
        eprintln!("  ... {n} states ({:.0?})", start.elapsed());
    });
    let took = start.elapsed();
    match result {
        Ok(r) => {
            println!("states explored: {}", r.states);
            println!(
                "transitions: {}, terminal states: {}, max depth: {}, time: {:.2?}",
                r.transitions, r.terminal, r.max_depth, took
            );
            println!("invariants held");
            ExitCode::SUCCESS
        }
        Err(cx) => {
            println!("{cx}");
            println!(
                "states explored before failure: {} ({:.2?})",
                cx.states, took
            );
            ExitCode::FAILURE
        }
    }
}
