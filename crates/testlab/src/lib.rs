//! dvmm's test and lab tools, kept out of the libraries (`dsm`, `transport`, `cluster`):
//! those never depend on this crate; this crate, the `dvmm` binary and the tests depend
//! on them.
//!
//! * [`node`] and [`bench`](mod@bench): the DSM test/bench node process (workloads `counters`,
//!   `bench`, `idle`) and the `dvmm bench dsm` driver. They are here, not in the `dvmm`
//!   binary, because two programs run them: the hidden `dvmm dsm-node` and this crate's
//!   `dsm-node` binary (which the multi-process tests in `tests/` start).
//! * [`launch`]: the one process launcher: starts node processes (handing each its
//!   bound listener), reads their output whole line by whole line (relayed, captured or
//!   both), records exits, waits with a bound and kills on drop. Used by
//!   [`bench`](mod@bench), the tests and `dvmm run --nodes N`.
//! * [`netns`]: several "hosts" on one machine (network namespaces joined by a bridge).
//!   Here because three users need it: `dvmm run --netns`, the multi-process DSM tests
//!   and the `dvmm` cluster tests.
//!
//! `dvmm run --nodes N` (`crates/dvmm/src/local.rs`) keeps only what is its own: the
//! cluster description file, node 0 on the terminal, SIGINT and the grace period after
//! the first node ends.
//!
//! The transport channels used by the test node are registered in
//! `transport::channel` (`LAB_CTL`, `LAB_FLOOR`).
#![deny(missing_docs)]

pub mod bench;
pub mod launch;
pub mod netns;
pub mod node;
