//! Exhaustive model checking of small configurations (the full 3x2x2 run is
//! `scripts/check-dsm.sh`, or the ignored test below in release mode).

use dsm_proto::model::{explore, Config, HomeKind, Op, Report, ViolationKind};
use dsm_proto::{Access, Bug};

fn check(cfg: &Config) -> Report {
    match explore(cfg, |_| {}) {
        Ok(r) => {
            assert!(r.terminal > 0 && r.states > 1, "{r:?}");
            r
        }
        Err(cx) => panic!("{cfg:?}\n{cx}"),
    }
}

#[test]
fn exhaustive_2_nodes_2_pages_2_ops() {
    let r = check(&Config::new(2, 2, 2));
    println!("2x2x2: {r:?}");
}

#[test]
fn exhaustive_3_nodes_1_page_2_ops() {
    let r = check(&Config::new(3, 1, 2));
    println!("3x1x2: {r:?}");
}

#[test]
fn exhaustive_3_nodes_2_pages_1_op() {
    check(&Config::new(3, 2, 1));
}

#[test]
fn exhaustive_2_threads_per_node_merge_faults() {
    let mut cfg = Config::new(2, 1, 2);
    cfg.threads = 2;
    check(&cfg);
}

#[test]
fn exhaustive_all_homes_on_node_0() {
    let mut cfg = Config::new(3, 1, 2);
    cfg.homes = HomeKind::AllOnNode(0);
    check(&cfg);
    let mut cfg = Config::new(2, 2, 2);
    cfg.homes = HomeKind::AllOnNode(1);
    check(&cfg);
}

#[test]
fn exhaustive_blocked_homes() {
    let mut cfg = Config::new(2, 2, 2);
    cfg.homes = HomeKind::Blocked;
    check(&cfg);
}

#[test]
fn exhaustive_fixed_programs_4_nodes() {
    // Everybody reads page 0 and then writes it: racing upgrades, 3 sharers invalidated.
    let rw = vec![
        Op {
            page: 0,
            access: Access::Read,
        },
        Op {
            page: 0,
            access: Access::Write,
        },
    ];
    let mut cfg = Config::new(4, 1, 2);
    cfg.programs = Some(vec![rw; 4]);
    check(&cfg);
}

/// The full 3 nodes x 2 pages x 2 ops configuration (all programs). Slow in debug
/// builds: `cargo test --release -p dvmm-dsm-proto -- --ignored`.
#[test]
#[ignore]
fn exhaustive_full_3_nodes_2_pages_2_ops() {
    let r = check(&Config::new(3, 2, 2));
    println!("3x2x2: {r:?}");
    assert!(r.states > 1_000_000);
}

fn expect_failure(bug: Bug, cfg: Config) -> ViolationKind {
    let mut cfg = cfg;
    cfg.bug = Some(bug);
    match explore(&cfg, |_| {}) {
        Ok(r) => panic!("{bug:?} not detected: {r:?}"),
        Err(cx) => {
            println!("{bug:?}:\n{cx}");
            assert!(!cx.trace.is_empty());
            cx.violation.kind
        }
    }
}

#[test]
fn broken_skip_invalidation_is_caught() {
    let kind = expect_failure(Bug::SkipInvalidation, Config::new(3, 2, 2));
    assert!(
        matches!(
            kind,
            ViolationKind::SingleWriter | ViolationKind::StaleRead | ViolationKind::StaleCopy
        ),
        "{kind:?}"
    );
}

#[test]
fn broken_no_done_wait_is_caught() {
    expect_failure(Bug::NoDoneWait, Config::new(3, 2, 2));
}

#[test]
fn broken_keep_write_is_caught() {
    let kind = expect_failure(Bug::KeepWriteOnForwardRead, Config::new(2, 1, 2));
    assert_eq!(kind, ViolationKind::SingleWriter);
}

#[test]
fn every_bug_is_caught_on_the_full_configuration() {
    for bug in Bug::ALL {
        expect_failure(bug, Config::new(3, 2, 2));
    }
}
