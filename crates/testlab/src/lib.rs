//! dvmm's test and lab tools, kept out of the libraries (`dsm`, `transport`, `cluster`):
//! those never depend on this crate; this crate, the `dvmm` binary and the tests depend
//! on them.
//!
//! * [`node`] and [`bench`](mod@bench): the DSM test/bench node process (workloads `counters`,
//!   `bench`, `idle`) and the `dvmm bench dsm` driver. They are here, not in the `dvmm`
//!   binary, because two programs run them: the hidden `dvmm dsm-node` and this crate's
//!   `dsm-node` binary (which the multi-process tests in `tests/` start).
//! * [`launch`]: spawns a local cluster of node processes, captures their output, waits
//!   with a bound and kills them on drop. Used by [`bench`](mod@bench) and by the tests.
//! * [`netns`]: several "hosts" on one machine (network namespaces joined by a bridge).
//!   Here because three users need it: `dvmm run --netns`, the multi-process DSM tests
//!   and the `dvmm` cluster tests.
//!
//! The local launcher of `dvmm run --nodes N` (relaying node 0's console, stopping the
//! others after the first ends) has only one user, so it lives in the `dvmm` binary
//! (`crates/dvmm/src/local.rs`). It shares no launcher code with [`launch`]: the two
//! spawn differently (console inherited vs. captured output, config file vs. listening
//! descriptors) and stop differently (grace period after the first exit, SIGINT vs. a
//! fixed bound).
//!
//! The transport channels used by the test node are registered in
//! `transport::channel` (`LAB_CTL`, `LAB_FLOOR`).
#![deny(missing_docs)]

pub mod bench;
pub mod launch;
pub mod netns;
pub mod node;
