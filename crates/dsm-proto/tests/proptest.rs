//! Property tests: larger random configurations (4-6 nodes, 8 pages, 1-2 threads per
//! node), random programs and random schedules of faults, deliveries and releases, with
//! the invariants of the model checker checked in every state.

use dsm_proto::model::{simulate, Config, HomeKind, Op};
use dsm_proto::{Access, Bug};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    (0u64..8, any::<bool>()).prop_map(|(page, w)| Op {
        page,
        access: if w { Access::Write } else { Access::Read },
    })
}

fn homes() -> impl Strategy<Value = HomeKind> {
    prop_oneof![
        Just(HomeKind::Interleaved),
        Just(HomeKind::Blocked),
        (0u16..4).prop_map(HomeKind::AllOnNode),
    ]
}

/// (config, schedule)
fn scenario() -> impl Strategy<Value = (Config, Vec<u32>)> {
    (4u16..=6, 1usize..=2, 2usize..=8, homes()).prop_flat_map(|(nodes, threads, ops, homes)| {
        let progs = prop::collection::vec(
            prop::collection::vec(op(), ops),
            usize::from(nodes) * threads,
        );
        let schedule = prop::collection::vec(any::<u32>(), 0..600);
        (progs, schedule).prop_map(move |(progs, schedule)| {
            let cfg = Config {
                nodes,
                pages: 8,
                threads,
                ops,
                homes,
                bug: None,
                programs: Some(progs),
            };
            (cfg, schedule)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_schedules_keep_coherence((cfg, schedule) in scenario()) {
        match simulate(&cfg, &schedule) {
            Ok(r) => prop_assert!(r.steps >= usize::from(cfg.nodes) * cfg.threads * cfg.ops),
            Err(cx) => prop_assert!(false, "{:?}\n{}", cfg, cx),
        }
    }

    /// Hot spot: every operation on 2 of the 8 pages, so requests queue at the homes.
    #[test]
    fn random_schedules_on_hot_pages(
        nodes in 4u16..=6,
        ops in prop::collection::vec((0u64..2, any::<bool>()), 36),
        schedule in prop::collection::vec(any::<u32>(), 0..800),
    ) {
        let threads = 2;
        let per = 3;
        let progs: Vec<Vec<Op>> = (0..usize::from(nodes) * threads)
            .map(|t| (0..per).map(|k| {
                let (page, w) = ops[(t * per + k) % ops.len()];
                Op { page, access: if w { Access::Write } else { Access::Read } }
            }).collect())
            .collect();
        let cfg = Config { nodes, pages: 8, threads, ops: per, homes: HomeKind::Interleaved,
                           bug: None, programs: Some(progs) };
        if let Err(cx) = simulate(&cfg, &schedule) {
            prop_assert!(false, "{:?}\n{}", cfg, cx);
        }
    }
}

/// Random schedules also find the injected bug (sanity check of the simulator).
#[test]
fn random_schedules_find_skip_invalidation() {
    let rw = vec![
        Op {
            page: 0,
            access: Access::Read,
        },
        Op {
            page: 0,
            access: Access::Write,
        },
        Op {
            page: 0,
            access: Access::Read,
        },
    ];
    let mut cfg = Config::new(4, 8, 3);
    cfg.programs = Some(vec![rw; 4]);
    cfg.bug = Some(Bug::SkipInvalidation);
    let found = (0u32..200).any(|seed| {
        let schedule: Vec<u32> = (0..200u32)
            .map(|k| k.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40503))
            .collect();
        simulate(&cfg, &schedule).is_err()
    });
    assert!(found);
}
