//! dvmm nodes and clusters.
//!
//! * [`config`]: the TOML cluster description;
//! * [`node`]: one node process (`dvmm node --config F --id K`): mesh, DSM-backed guest
//!   RAM, its share of the vCPUs, cross-node interrupts, EOIs and device accesses;
//! * [`msg`]: the control messages between nodes;
//! * [`local`]: `dvmm run --nodes N`: a whole cluster of node processes on this machine,
//!   on loopback or each in its own network namespace.
#![deny(missing_docs)]

pub mod config;
pub mod local;
pub mod msg;
pub mod node;

pub use config::ClusterConfig;
pub use node::{run_node, NodeOptions, NodeReport};
