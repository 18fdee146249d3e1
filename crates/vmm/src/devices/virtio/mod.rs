//! Virtio devices: a block device on the virtio-mmio transport (version 2, "modern").
//!
//! * [`block`]: the disk image ([`DiskImage`]), the device's features and configuration
//!   space, and the execution of one request;
//! * [`mmio`]: the transport ([`MmioBlock`]): the registers of one 0x200-byte MMIO window
//!   and the worker thread that serves the device's only virtqueue.
//!
//! The queue itself (split virtqueue, descriptor chains) is the rust-vmm `virtio-queue`
//! crate.

pub mod block;
pub mod mmio;

pub use block::{BlockStats, DiskError, DiskImage};
pub use mmio::{MmioBlock, MMIO_WINDOW};
