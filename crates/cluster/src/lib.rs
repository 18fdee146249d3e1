//! dvmm nodes and clusters.
//!
//! * [`config`]: the TOML cluster description;
//! * [`node`]: one node process (`dvmm node --config F --id K`): mesh, DSM-backed guest
//!   RAM, its share of the vCPUs, cross-node interrupts, EOIs and device accesses;
//! * [`msg`]: the control messages between nodes;
//! * [`control`]: each node's control socket (`dvmm stats`, `dvmm stop`, metrics).
//!
//! `dvmm run --nodes N` (a whole cluster of node processes on this machine) is a tool of
//! the `dvmm` binary, not of this library.
#![deny(missing_docs)]

pub mod config;
pub mod control;
pub mod msg;
pub mod node;

pub use config::ClusterConfig;
pub use node::{run_node, NodeOptions, NodeReport};
