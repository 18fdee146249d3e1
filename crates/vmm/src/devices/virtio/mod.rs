//! Virtio devices on the virtio-mmio transport (version 2, "modern").
//!
//! * [`mmio`]: the transport ([`VirtioMmio`]): the registers of one 0x200-byte MMIO
//!   window, the [`VirtioDevice`] trait a device implements, and the worker thread that
//!   serves the device's queues ([`mmio::Worker`]);
//! * [`block`]: the block device ([`Block`], [`MmioBlock`]): the disk image
//!   ([`DiskImage`]), the device's features and configuration space, and the execution
//!   of one request;
//! * [`net`]: the network device ([`Net`], [`MmioNet`]) on a host TAP interface
//!   ([`tap`]), and the host/guest addresses of the guest's network ([`NetSpec`]).
//!
//! The queue itself (split virtqueue, descriptor chains) is the rust-vmm `virtio-queue`
//! crate.

pub mod block;
pub mod mmio;
pub mod net;
mod stream;
pub mod tap;

pub use block::{Block, BlockStats, DiskError, DiskImage, MmioBlock};
pub use mmio::{VirtioDevice, VirtioMmio, MMIO_WINDOW};
pub use net::{MmioNet, Net, NetSpec, NetStats};
pub use tap::{Tap, TapError};
