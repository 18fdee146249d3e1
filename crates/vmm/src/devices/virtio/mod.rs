//! Virtio devices on the virtio-mmio transport (version 2, "modern").
//!
//! * [`mmio`]: the transport ([`VirtioMmio`]): the registers of one 0x200-byte MMIO
//!   window, the [`VirtioDevice`] trait a device implements, and the worker thread that
//!   serves the device's queues ([`mmio::Worker`]);
//! * [`block`]: the block device ([`Block`], [`MmioBlock`]): the disk image
//!   ([`DiskImage`]), the device's features and configuration space, and the execution
//!   of one request;
//! * [`tap`]: a host TAP interface ([`Tap`]), the host end of a network device.
//!
//! The queue itself (split virtqueue, descriptor chains) is the rust-vmm `virtio-queue`
//! crate.

pub mod block;
pub mod mmio;
mod stream;
pub mod tap;

pub use block::{Block, BlockStats, DiskError, DiskImage, MmioBlock};
pub use mmio::{VirtioDevice, VirtioMmio, MMIO_WINDOW};
pub use tap::{Tap, TapError};
