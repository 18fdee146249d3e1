//! The virtio-mmio transport (version 2) the virtio devices share, and the worker thread
//! that serves each device's queues.
//!
//! [`VirtioMmio`] is one MMIO window of [`MMIO_WINDOW`] bytes for one [`VirtioDevice`]:
//! the registers from 0, the device's configuration space from 0x100. The register logic
//! (feature negotiation, status, queue setup, notifications, interrupt status, reset) is
//! here, once; a device only says what it is (id, features, configuration space, its
//! queues' largest sizes) and how its worker serves the queues ([`VirtioDevice::run`]).
//!
//! Register accesses (vCPU threads, accesses forwarded from other nodes) only change
//! registers under a mutex and never wait for the device's I/O: a `QueueNotify` sets the
//! queue's bit in a kick mask and wakes the worker thread (an eventfd), which pops the
//! descriptor chains, does the I/O, returns the chains in the used ring, sets bit 0 of
//! `InterruptStatus` and pulses the interrupt line. The worker can wait on one more file
//! descriptor with the eventfd (the network device's TAP).
//!
//! The worker keeps its own copy of each queue (built from the registers when the queue
//! went live: the device's activation), so the registers' lock is never held during the
//! I/O or while the worker reads descriptors. A reset (or `QueueReady` 0) stops the queue:
//! it bumps the queue's generation number, which the worker checks before it writes into
//! a chain and returns it, and waits (only) for a return already under way, a few
//! guest-memory writes, so that once the reset is done the device no longer touches the
//! rings.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::IrqLine;
use crate::lock;

/// The size of one virtio-mmio device window: registers, then the configuration space.
pub const MMIO_WINDOW: u64 = 0x200;

/// The largest queue size a device may announce (`QueueNumMax`); the block and network
/// devices announce it for each of their queues.
pub const QUEUE_SIZE_MAX: u16 = 256;

/// The most queues one device may have (the kick mask is a `u32`).
pub const MAX_QUEUES: usize = 32;

/// `MagicValue`: "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;

/// `VendorID`: "DVMM".
pub const VENDOR_ID: u32 = 0x4d4d_5644;

/// The transport version (2: modern, no legacy registers).
const VERSION: u32 = 2;

/// Where the configuration space starts in the window.
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// The worker interrupts the driver at the latest after this many returned chains, even
/// when more are waiting (and always when the queue runs empty).
pub const SIGNAL_BATCH: u32 = 32;

/// What the transport needs of a virtio device: what it is, and the body of its worker
/// thread.
///
/// The device's life cycle, as the transport drives it: created with the transport (its
/// worker thread starts and waits); *activated* queue by queue when the driver sets
/// `DRIVER_OK` with the queue ready (the worker's [`Worker::wait`] then reports the queue
/// kicked and [`Worker::pop`] serves it from a fresh copy); *reset* when the driver
/// writes `Status` 0 or `QueueReady` 0 (the queue's generation changes: the worker's
/// [`Worker::complete`] and [`Worker::signal`] refuse the old queue, and the next
/// [`Worker::wait`] drops the worker's copy); ended by [`VirtioMmio::shutdown`].
pub trait VirtioDevice: Send + Sync + Sized + 'static {
    /// Names the device in messages and its worker thread (e.g. "virtio-blk").
    const NAME: &'static str;
    /// The virtio device ID (`DeviceID`: 1 network, 2 block).
    const DEVICE_ID: u32;
    /// The feature bits the device offers (`VIRTIO_F_VERSION_1` among them: the transport
    /// accepts only drivers that take it).
    fn features(&self) -> u64;
    /// The configuration space (read-only; it never changes, `ConfigGeneration` is 0).
    fn config(&self) -> &[u8];
    /// The largest size of each queue (at most [`QUEUE_SIZE_MAX`]); their number is the
    /// number of queues (1 to [`MAX_QUEUES`]).
    fn queue_max_sizes(&self) -> &[u16];
    /// The worker thread: serves the queues through `worker` until [`Worker::wait`]
    /// reports the end.
    fn run(&self, worker: &mut Worker<'_, Self>);
}

/// A descriptor chain popped by the worker.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Problems the transport warns about, once per device each (the guest controls how
/// often they happen).
#[derive(Debug, Clone, Copy)]
enum Problem {
    QueueSize,
    QueueAlign,
    QueueMemory,
    Features,
    StatusOrder,
    AccessSize,
    UsedRing,
    Poll,
}

/// The registers of one queue, as the driver wrote them.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    /// The queue's largest size (`QueueNumMax`).
    max: u16,
    num: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    /// Bumped whenever the queue starts or stops: the worker's copy of the queue, and any
    /// request it is serving, belong to one generation. Kept across resets.
    generation: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            max,
            num: u32::from(max),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            generation: 0,
        }
    }

    /// The queue as virtio-queue sees it (before the worker used any of it).
    fn state(&self) -> QueueState {
        QueueState {
            max_size: self.max,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            size: u16::try_from(self.num).unwrap_or(0),
            ready: true,
            desc_table: self.desc,
            avail_ring: self.avail,
            used_ring: self.used,
        }
    }
}

/// Replaces the low (`high` false) or high half of `v` by `half`.
fn set_half(v: &mut u64, high: bool, half: u32) {
    *v = if high {
        (*v & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*v & !0xffff_ffff) | u64::from(half)
    };
}

/// The device's registers, and the state the worker and the register side share.
#[derive(Debug)]
struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    interrupt_status: u32,
    /// The queues (bits) the driver notified, or that went live, since the worker last
    /// looked.
    kick: u32,
    /// The worker is returning a chain (data, used ring) of a current generation.
    completing: bool,
    /// The worker is to end.
    stop: bool,
    /// The problems already warned about (bits of [`Problem`]).
    warned: u32,
}

impl Regs {
    fn new(max_sizes: &[u16]) -> Self {
        Regs {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues: max_sizes.iter().map(|&m| QueueRegs::new(m)).collect(),
            interrupt_status: 0,
            kick: 0,
            completing: false,
            stop: false,
            warned: 0,
        }
    }

    /// Whether the worker serves queue `i`.
    fn live(&self, i: usize) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.queues.get(i).is_some_and(|q| q.ready)
    }

    /// The live queues, as bits.
    fn live_mask(&self) -> u32 {
        (0..self.queues.len())
            .filter(|&i| self.live(i))
            .fold(0, |m, i| m | 1 << i)
    }

    /// The index of the selected queue, if the device has it.
    fn selected(&self) -> Option<usize> {
        usize::try_from(self.queue_sel)
            .ok()
            .filter(|&i| i < self.queues.len())
    }

    /// True the first time `problem` happens on this device.
    fn first(&mut self, problem: Problem) -> bool {
        let bit = 1u32 << (problem as u32);
        let first = self.warned & bit == 0;
        self.warned |= bit;
        first
    }
}

/// What the register side and the worker share.
struct Shared<D> {
    regs: Mutex<Regs>,
    /// Written whenever the worker has something to look at (a kick, a queue starting or
    /// stopping, the end); the worker waits on it.
    wake: EventFd,
    /// A reset waits here for the worker to finish returning a chain.
    idle: Condvar,
    mem: GuestMemoryMmap,
    irq: Arc<dyn IrqLine>,
    pin: usize,
    /// Set by [`VirtioMmio::shutdown`]: the worker finishes what is queued, then ends.
    stopping: AtomicBool,
    device: D,
}

/// One virtio-mmio device window (0x200 bytes: registers + configuration space) whose
/// queues a worker thread serves.
pub struct VirtioMmio<D: VirtioDevice> {
    shared: Arc<Shared<D>>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Creates the transport for `device` in guest memory `mem`, interrupting through
    /// `irq` on IOAPIC pin `pin` (edge), and starts the device's worker thread (named
    /// after the device).
    ///
    /// Guest memory accesses may block (on a cluster, pages may come from another node);
    /// only the worker makes them, never [`mmio_read`](Self::mmio_read) or
    /// [`mmio_write`](Self::mmio_write).
    pub fn new(
        device: D,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
        pin: usize,
    ) -> io::Result<Self> {
        let sizes = device.queue_max_sizes();
        let sizes_ok = (1..=MAX_QUEUES).contains(&sizes.len())
            && sizes.iter().all(|s| (1..=QUEUE_SIZE_MAX).contains(s));
        if !sizes_ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: invalid queue sizes {sizes:?}", D::NAME),
            ));
        }
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs::new(sizes)),
            wake: EventFd::new(EFD_NONBLOCK)?,
            idle: Condvar::new(),
            mem,
            irq,
            pin,
            stopping: AtomicBool::new(false),
            device,
        });
        let worker = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(D::NAME.into())
                .spawn(move || {
                    let mut worker = Worker::new(&shared);
                    shared.device.run(&mut worker);
                })?
        };
        Ok(VirtioMmio {
            shared,
            worker: Mutex::new(Some(worker)),
        })
    }

    /// Reads `data.len()` bytes at `offset` in the window. The registers are 32-bit; an
    /// access of another size reads the bytes of the registers it covers. Offsets without a
    /// register (and past the configuration space) read 0.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let regs = lock(&self.shared.regs);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .map_or(0, |at| self.shared.byte_at(&regs, at));
        }
    }

    /// Writes `data` at `offset` in the window. Registers take 32-bit writes (a 64-bit
    /// write is two of them); other sizes, offsets without a register, and the (read-only)
    /// configuration space ignore writes.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            return;
        }
        let mut regs = lock(&self.shared.regs);
        if !offset.is_multiple_of(4) || !(data.len() == 4 || data.len() == 8) {
            if regs.first(Problem::AccessSize) {
                tracing::warn!(
                    "{}: {}-byte register write at {offset:#x} ignored (registers take aligned 32-bit writes)",
                    D::NAME,
                    data.len()
                );
            }
            return;
        }
        for (i, word) in data.chunks_exact(4).enumerate() {
            let value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            regs = self.shared.write_reg(regs, offset + 4 * i as u64, value);
        }
    }

    /// Stops the worker (also done on drop) and waits for it to end: the chains the driver
    /// made available and notified before are served first (at most one ring's worth
    /// more). The registers keep answering; notifications no longer do anything.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        lock(&self.shared.regs).stop = true;
        self.shared.wake();
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            if worker.join().is_err() {
                tracing::warn!("{}: the worker thread panicked", D::NAME);
            }
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.shared.device
    }
}

impl<D: VirtioDevice> Drop for VirtioMmio<D> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl<D: VirtioDevice> Shared<D> {
    /// Tells the worker to look at the registers.
    fn wake(&self) {
        // Fails only if the counter would overflow: the worker has a wake-up pending then.
        let _ = self.wake.write(1);
    }

    /// The byte at `at` in the window.
    fn byte_at(&self, regs: &Regs, at: u64) -> u8 {
        if at < CONFIG_OFFSET {
            let word = self.read_reg(regs, at & !3).to_le_bytes();
            word[(at & 3) as usize]
        } else {
            usize::try_from(at - CONFIG_OFFSET)
                .ok()
                .and_then(|i| self.device.config().get(i))
                .copied()
                .unwrap_or(0)
        }
    }

    /// The 32-bit register at `offset` (a multiple of 4 below the configuration space).
    fn read_reg(&self, regs: &Regs, offset: u64) -> u32 {
        let Ok(offset) = u32::try_from(offset) else {
            return 0;
        };
        let q = regs.selected().map(|i| regs.queues[i]);
        let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
        let features = self.device.features();
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => D::DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match regs.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max)),
            VIRTIO_MMIO_QUEUE_NUM => q.map_or(0, |q| q.num),
            VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => regs.interrupt_status,
            VIRTIO_MMIO_STATUS => regs.status,
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.map_or(0, |q| half(q.desc, false)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.map_or(0, |q| half(q.desc, true)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.map_or(0, |q| half(q.avail, false)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.map_or(0, |q| half(q.avail, true)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.map_or(0, |q| half(q.used, false)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.map_or(0, |q| half(q.used, true)),
            // The configuration space never changes.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    /// Writes `value` to the register at `offset` (a multiple of 4 below the configuration
    /// space). Returns the guard, which a reset may have released meanwhile.
    fn write_reg<'a>(
        &'a self,
        mut regs: MutexGuard<'a, Regs>,
        offset: u64,
        value: u32,
    ) -> MutexGuard<'a, Regs> {
        let Ok(offset) = u32::try_from(offset) else {
            return regs;
        };
        let sel = regs.selected();
        // The queue's registers are only for a queue the device has, while it is not
        // ready.
        let setup = sel.filter(|&i| !regs.queues[i].ready);
        match (offset, setup) {
            (VIRTIO_MMIO_DEVICE_FEATURES_SEL, _) => regs.device_features_sel = value,
            // The driver's features are settled once FEATURES_OK is set.
            (VIRTIO_MMIO_DRIVER_FEATURES, _) if regs.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match regs.driver_features_sel {
                    0 => set_half(&mut regs.driver_features, false, value),
                    1 => set_half(&mut regs.driver_features, true, value),
                    _ => {}
                }
            }
            (VIRTIO_MMIO_DRIVER_FEATURES_SEL, _) => regs.driver_features_sel = value,
            (VIRTIO_MMIO_QUEUE_SEL, _) => regs.queue_sel = value,
            (VIRTIO_MMIO_QUEUE_NUM, Some(i)) => regs.queues[i].num = value,
            (VIRTIO_MMIO_QUEUE_DESC_LOW, Some(i)) => {
                set_half(&mut regs.queues[i].desc, false, value)
            }
            (VIRTIO_MMIO_QUEUE_DESC_HIGH, Some(i)) => {
                set_half(&mut regs.queues[i].desc, true, value)
            }
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, Some(i)) => {
                set_half(&mut regs.queues[i].avail, false, value)
            }
            (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, Some(i)) => {
                set_half(&mut regs.queues[i].avail, true, value)
            }
            (VIRTIO_MMIO_QUEUE_USED_LOW, Some(i)) => {
                set_half(&mut regs.queues[i].used, false, value)
            }
            (VIRTIO_MMIO_QUEUE_USED_HIGH, Some(i)) => {
                set_half(&mut regs.queues[i].used, true, value)
            }
            (VIRTIO_MMIO_QUEUE_READY, _) => {
                let Some(i) = sel else {
                    return regs;
                };
                if value != 0 && !regs.queues[i].ready {
                    match self.check_queue(&regs.queues[i]) {
                        Ok(()) => {
                            regs.queues[i].ready = true;
                            self.start(&mut regs, i);
                        }
                        Err((problem, why)) => {
                            if regs.first(problem) {
                                tracing::warn!(
                                    "{}: queue {i}: {why}: the queue stays disabled",
                                    D::NAME
                                );
                            }
                        }
                    }
                } else if value == 0 && regs.queues[i].ready {
                    regs.queues[i].ready = false;
                    regs = self.stop_queues(regs, 1 << i);
                }
            }
            // The value is the queue's index.
            (VIRTIO_MMIO_QUEUE_NOTIFY, _) => {
                if let Some(i) = usize::try_from(value).ok().filter(|&i| regs.live(i)) {
                    regs.kick |= 1 << i;
                    self.wake();
                }
            }
            (VIRTIO_MMIO_INTERRUPT_ACK, _) => regs.interrupt_status &= !value,
            (VIRTIO_MMIO_STATUS, _) => regs = self.write_status(regs, value),
            _ => {}
        }
        regs
    }

    /// Whether the queue the driver set up can be used: `Err` names the problem.
    fn check_queue(&self, q: &QueueRegs) -> Result<(), (Problem, String)> {
        let num = q.num;
        let max = q.max;
        let size_ok = (1..=u32::from(max)).contains(&num) && num.is_power_of_two();
        if !size_ok {
            return Err((
                Problem::QueueSize,
                format!("queue size {num} is not a power of 2 from 1 to {max}"),
            ));
        }
        if let Err(e) = Queue::try_from(q.state()) {
            return Err((Problem::QueueAlign, format!("queue refused: {e}")));
        }
        // The rings' sizes (split virtqueue): 16-byte descriptors; flags, index, one u16
        // per entry and the event field; flags, index, one u32 pair per entry and the
        // event field.
        let n = u64::from(num);
        let rings = [
            ("descriptor table", q.desc, 16 * n),
            ("available ring", q.avail, 6 + 2 * n),
            ("used ring", q.used, 6 + 8 * n),
        ];
        for (name, addr, len) in rings {
            // virtio-queue takes an available ring at 0 for a queue never set up.
            let inside = addr != 0
                && GuestMemoryBackend::check_range(&self.mem, GuestAddress(addr), len as usize);
            if !inside {
                return Err((
                    Problem::QueueMemory,
                    format!("queue {name} at {addr:#x} ({len} bytes) is not in guest memory"),
                ));
            }
        }
        Ok(())
    }

    /// A write to `Status`.
    fn write_status<'a>(
        &'a self,
        mut regs: MutexGuard<'a, Regs>,
        value: u32,
    ) -> MutexGuard<'a, Regs> {
        if value == 0 {
            return self.reset(regs);
        }
        let old = regs.status;
        if old & !value != 0 {
            if regs.first(Problem::StatusOrder) {
                tracing::warn!(
                    "{}: the driver cleared status bits ({old:#x} to {value:#x}) without a reset: ignored",
                    D::NAME
                );
            }
            return regs;
        }
        // DEVICE_NEEDS_RESET is the device's to set.
        let mut status = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let added = status & !old;
        let offered = self.device.features();
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let introduced = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            let features = regs.driver_features;
            let acceptable = status & introduced == introduced
                && features & (1u64 << VIRTIO_F_VERSION_1) != 0
                && features & !offered == 0;
            if !acceptable {
                // The driver reads the status back and sees the features refused.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
                if regs.first(Problem::Features) {
                    tracing::warn!(
                        "{}: the driver's features {features:#x} are refused (offered {offered:#x}, VERSION_1 required)",
                        D::NAME
                    );
                }
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            if regs.first(Problem::StatusOrder) {
                tracing::warn!("{}: DRIVER_OK without FEATURES_OK: ignored", D::NAME);
            }
        }
        regs.status = status;
        if status & added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            for i in 0..regs.queues.len() {
                self.start(&mut regs, i);
            }
        }
        regs
    }

    /// Queue `i` may just have gone live: if so, a new generation, and the worker looks
    /// at its available ring (buffers made available before DRIVER_OK).
    fn start(&self, regs: &mut Regs, i: usize) {
        if regs.live(i) {
            let q = &mut regs.queues[i];
            q.generation = q.generation.wrapping_add(1);
            regs.kick |= 1 << i;
            self.wake();
        }
    }

    /// Stops the queues `mask` (bits): a new generation each, then waits for a chain being
    /// returned to be returned (a few guest-memory writes, no device I/O). Afterwards the
    /// worker no longer touches their rings.
    fn stop_queues<'a>(
        &'a self,
        mut regs: MutexGuard<'a, Regs>,
        mask: u32,
    ) -> MutexGuard<'a, Regs> {
        for (i, q) in regs.queues.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                q.generation = q.generation.wrapping_add(1);
            }
        }
        regs.kick &= !mask;
        self.wake();
        while regs.completing {
            regs = self.idle.wait(regs).unwrap_or_else(PoisonError::into_inner);
        }
        regs
    }

    /// A device reset (`Status` 0): every queue stops, and the registers go back to their
    /// initial values.
    fn reset<'a>(&'a self, regs: MutexGuard<'a, Regs>) -> MutexGuard<'a, Regs> {
        let mut regs = self.stop_queues(regs, u32::MAX);
        let mut fresh = Regs::new(self.device.queue_max_sizes());
        for (new, old) in fresh.queues.iter_mut().zip(&regs.queues) {
            new.generation = old.generation;
        }
        fresh.stop = regs.stop;
        fresh.warned = regs.warned;
        *regs = fresh;
        regs
    }
}

/// What [`Worker::wait`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    /// The live queues (bits) the driver notified, or that just went live.
    pub kicked: u32,
    /// The file descriptor given to [`Worker::wait`] is readable (or in error).
    pub fd_ready: bool,
    /// The device is shutting down and nothing notified is left: the worker ends.
    pub stop: bool,
}

impl Events {
    /// Whether queue `i` was notified (or just went live).
    pub fn kicked(&self, i: usize) -> bool {
        i < MAX_QUEUES && self.kicked & (1 << i) != 0
    }
}

/// The worker thread's side of the transport: waiting for work, the device's live queues,
/// returning chains and interrupting the driver.
pub struct Worker<'a, D> {
    shared: &'a Shared<D>,
    /// The worker's copy of each live queue, with the generation it belongs to.
    queues: Vec<Option<(u64, Queue)>>,
    /// Once a shutdown is requested, at most one ring's worth of chains more (a guest
    /// that keeps making requests cannot hold the worker up).
    after_stop: u32,
}

impl<'a, D: VirtioDevice> Worker<'a, D> {
    fn new(shared: &'a Shared<D>) -> Self {
        let n = shared.device.queue_max_sizes().len();
        Worker {
            shared,
            queues: (0..n).map(|_| None).collect(),
            after_stop: u32::from(QUEUE_SIZE_MAX),
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMemoryMmap {
        &self.shared.mem
    }

    /// Waits until a live queue is notified (or goes live), the device shuts down, or
    /// `fd` (if given) is readable. Queues that stopped since the last call are dropped
    /// (see [`has_queue`](Self::has_queue)).
    pub fn wait(&mut self, fd: Option<BorrowedFd<'_>>) -> Events {
        let mut fd_ready = false;
        loop {
            {
                let mut regs = lock(&self.shared.regs);
                self.refresh(&regs);
                let kicked = std::mem::take(&mut regs.kick) & regs.live_mask();
                if kicked != 0 && self.after_stop > 0 {
                    return Events {
                        kicked,
                        fd_ready,
                        stop: false,
                    };
                }
                if regs.stop {
                    return Events {
                        stop: true,
                        ..Events::default()
                    };
                }
                if fd_ready {
                    return Events {
                        fd_ready,
                        ..Events::default()
                    };
                }
            }
            fd_ready = self.poll(fd);
        }
    }

    /// Brings the worker's copies of the queues in line with the registers.
    fn refresh(&mut self, regs: &Regs) {
        for (i, copy) in self.queues.iter_mut().enumerate() {
            if !regs.live(i) {
                *copy = None;
                continue;
            }
            let q = &regs.queues[i];
            if copy.as_ref().map(|(g, _)| *g) != Some(q.generation) {
                // Checked when the driver set QueueReady.
                *copy = Queue::try_from(q.state()).ok().map(|c| (q.generation, c));
            }
        }
    }

    /// Waits for the wake-up eventfd or `fd`; true if `fd` is ready.
    fn poll(&self, fd: Option<BorrowedFd<'_>>) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // poll ignores a negative descriptor.
                fd: fd.map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is an array of two initialised `pollfd`s that outlives the
            // call, and its length is passed; poll only writes their `revents`.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n >= 0 {
                break;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                if lock(&self.shared.regs).first(Problem::Poll) {
                    tracing::warn!("{}: poll failed: {e}", D::NAME);
                }
                // Not spinning on a persistent failure.
                std::thread::sleep(std::time::Duration::from_millis(10));
                return false;
            }
        }
        if fds[0].revents != 0 {
            // Nonblocking: resets the counter (nothing to read is fine).
            let _ = self.shared.wake.read();
        }
        fds[1].revents != 0
    }

    /// Whether the worker has queue `i` live (as of the last [`wait`](Self::wait)).
    pub fn has_queue(&self, i: usize) -> bool {
        self.queues.get(i).is_some_and(Option::is_some)
    }

    /// Whether queue `i` is still the one the worker serves (it did not stop since).
    pub fn live(&self, i: usize) -> bool {
        let Some(generation) = self.generation(i) else {
            return false;
        };
        lock(&self.shared.regs).queues[i].generation == generation
    }

    fn generation(&self, i: usize) -> Option<u64> {
        self.queues.get(i)?.as_ref().map(|(g, _)| *g)
    }

    fn queue(&mut self, i: usize) -> Option<&mut Queue> {
        self.queues.get_mut(i)?.as_mut().map(|(_, q)| q)
    }

    /// The next chain the driver made available in queue `i`.
    pub fn pop(&mut self, i: usize) -> Option<Chain<'a>> {
        let mem = self.mem();
        self.queue(i)?.pop_descriptor_chain(mem)
    }

    /// Puts the chain [`pop`](Self::pop) returned last back (it is popped again next).
    pub fn unpop(&mut self, i: usize) {
        if let Some(q) = self.queue(i) {
            q.go_to_previous_position();
        }
    }

    /// Asks the driver to notify queue `i` when it adds chains; true if chains were added
    /// meanwhile (the driver may not notify for those).
    pub fn enable_notification(&mut self, i: usize) -> bool {
        let mem = self.mem();
        self.queue(i)
            .is_some_and(|q| q.enable_notification(mem).unwrap_or(false))
    }

    /// Tells the driver that notifications of queue `i` are not needed (a hint).
    pub fn disable_notification(&mut self, i: usize) {
        let mem = self.mem();
        if let Some(q) = self.queue(i) {
            // An error here only costs notifications.
            let _ = q.disable_notification(mem);
        }
    }

    /// Returns chain `head` of queue `i` to the driver: `fill` writes what the device
    /// puts into the chain and gives the used length. False if the queue stopped meanwhile
    /// (then the chain is left alone and `fill` is not called). A queue stop waits while
    /// `fill` runs: it must only write guest memory.
    pub fn complete(
        &mut self,
        i: usize,
        head: u16,
        fill: impl FnOnce(&GuestMemoryMmap) -> Result<u32, String>,
    ) -> bool {
        let Some(generation) = self.generation(i) else {
            return false;
        };
        {
            let mut regs = lock(&self.shared.regs);
            if regs.queues[i].generation != generation {
                return false;
            }
            regs.completing = true;
        }
        let mem = self.mem();
        let result = fill(mem).and_then(|len| match self.queue(i) {
            Some(q) => q.add_used(mem, head, len).map_err(|e| e.to_string()),
            None => Ok(()),
        });
        {
            let mut regs = lock(&self.shared.regs);
            regs.completing = false;
            if let Err(e) = result {
                if regs.first(Problem::UsedRing) {
                    tracing::warn!(
                        "{}: chain {head} cannot be returned to the driver: {e}",
                        D::NAME
                    );
                }
            }
        }
        self.shared.idle.notify_all();
        true
    }

    /// Tells the driver about chains returned in queue `i`: `InterruptStatus` bit 0 and
    /// a pulse (nothing if the queue stopped).
    pub fn signal(&mut self, i: usize) {
        let Some(generation) = self.generation(i) else {
            return;
        };
        {
            let mut regs = lock(&self.shared.regs);
            if regs.queues[i].generation != generation {
                return;
            }
            regs.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
        self.shared.irq.pulse(self.shared.pin);
    }

    /// Has the next [`wait`](Self::wait) report queue `i` kicked (if it is still live):
    /// the worker looks at it again after what else is waiting.
    pub fn kick(&self, i: usize) {
        let mut regs = lock(&self.shared.regs);
        if i < MAX_QUEUES && regs.live(i) {
            regs.kick |= 1 << i;
            self.shared.wake();
        }
    }

    /// Serves the chains available in queue `i` until it runs empty, the queue stops,
    /// `budget` chains were served (then the queue is [kicked](Self::kick) again: its
    /// turn comes back after the worker's other work), or (after a shutdown request) one
    /// ring's worth more was served. `serve` handles one chain and returns it
    /// ([`complete`](Self::complete)); false if the queue stopped. The driver is
    /// interrupted every [`SIGNAL_BATCH`] chains and at the end.
    pub fn drain(
        &mut self,
        i: usize,
        budget: u32,
        mut serve: impl FnMut(&mut Self, Chain<'a>) -> bool,
    ) {
        let mut unsignalled = 0u32;
        let mut served = 0u32;
        'serve: loop {
            // No notifications while the worker is at it anyway.
            self.disable_notification(i);
            let mut popped = false;
            while let Some(chain) = self.pop(i) {
                popped = true;
                if !serve(self, chain) {
                    break 'serve;
                }
                unsignalled += 1;
                if unsignalled >= SIGNAL_BATCH {
                    self.signal(i);
                    unsignalled = 0;
                }
                if self.shared.stopping.load(Ordering::Relaxed) {
                    self.after_stop = self.after_stop.saturating_sub(1);
                    if self.after_stop == 0 {
                        break 'serve;
                    }
                }
                served += 1;
                if served >= budget {
                    self.kick(i);
                    break 'serve;
                }
            }
            // More chains since the last look? (Nothing popped although the ring says so:
            // a ring the driver broke; its next notification tries again.)
            let more = self.enable_notification(i);
            if !(more && popped) {
                break;
            }
        }
        if unsignalled > 0 {
            self.signal(i);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::{pattern, TempFile};
    use crate::devices::virtio::block::{self, Block, BlockStats, DiskImage, MmioBlock};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    pub(crate) use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::Bytes;

    pub(crate) const MEM_SIZE: usize = 4 << 20;
    /// Queue 0's rings (queue `q`'s are [`rings`]`(q)`).
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x10000;
    const STATUS: u64 = 0x11000;
    const DATA: u64 = 0x20000;
    /// The size of the queues the rig sets up.
    pub(crate) const QSIZE: u16 = 16;
    pub(crate) const PIN: usize = 5;
    const IMAGE_LEN: usize = 64 << 10;
    /// An address beyond guest memory.
    pub(crate) const OUTSIDE: u64 = 0x1_0000_0000;

    /// The rings of queue `q` (descriptor table, available ring, used ring): 12 KiB per
    /// queue from [`DESC`].
    pub(crate) fn rings(q: usize) -> (u64, u64, u64) {
        let base = DESC + 0x3000 * q as u64;
        (base, base + 0x1000, base + 0x2000)
    }

    /// Counts the pulses of the interrupt line.
    #[derive(Default)]
    pub(crate) struct CountingIrq {
        pub pulses: AtomicUsize,
        pub pin: AtomicUsize,
    }

    impl IrqLine for CountingIrq {
        fn pulse(&self, pin: usize) {
            self.pin.store(pin, Ordering::SeqCst);
            self.pulses.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A buffer of a chain: guest address, length, device-writable.
    pub(crate) type Buf = (u64, u32, bool);

    /// The driver's side of one queue.
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct DriverQueue {
        pub next_desc: u16,
        pub avail_idx: u16,
        pub used_idx: u16,
    }

    /// A device on its transport, its guest memory, and the driver's side of the queues.
    pub(crate) struct Rig<D: VirtioDevice> {
        pub dev: VirtioMmio<D>,
        pub mem: GuestMemoryMmap,
        pub irq: Arc<CountingIrq>,
        pub queues: Vec<DriverQueue>,
    }

    impl<D: VirtioDevice> Rig<D> {
        /// `device` on a transport in 4 MiB of guest memory, interrupting pin [`PIN`].
        pub fn with(device: D) -> Rig<D> {
            let n = device.queue_max_sizes().len();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let irq = Arc::new(CountingIrq::default());
            let dev = VirtioMmio::new(device, mem.clone(), irq.clone(), PIN).unwrap();
            Rig {
                dev,
                mem,
                irq,
                queues: vec![DriverQueue::default(); n],
            }
        }

        pub fn r32(&self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.mmio_read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        pub fn w32(&self, offset: u64, value: u32) {
            self.dev.mmio_write(offset, &value.to_le_bytes());
        }

        pub fn status(&self) -> u32 {
            self.r32(VIRTIO_MMIO_STATUS.into())
        }

        pub fn device_features(&self) -> u64 {
            self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL.into(), 1);
            let high = self.r32(VIRTIO_MMIO_DEVICE_FEATURES.into());
            self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL.into(), 0);
            let low = self.r32(VIRTIO_MMIO_DEVICE_FEATURES.into());
            (u64::from(high) << 32) | u64::from(low)
        }

        /// Reset, ACKNOWLEDGE, DRIVER, features; true if the device accepted them.
        pub fn negotiate(&self, features: u64) -> bool {
            let status = u64::from(VIRTIO_MMIO_STATUS);
            self.w32(status, 0);
            assert_eq!(self.status(), 0);
            self.w32(status, VIRTIO_CONFIG_S_ACKNOWLEDGE);
            self.w32(status, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
            self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL.into(), 1);
            self.w32(VIRTIO_MMIO_DRIVER_FEATURES.into(), (features >> 32) as u32);
            self.w32(VIRTIO_MMIO_DRIVER_FEATURES_SEL.into(), 0);
            self.w32(VIRTIO_MMIO_DRIVER_FEATURES.into(), features as u32);
            self.w32(
                status,
                VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
            );
            self.status() & VIRTIO_CONFIG_S_FEATURES_OK != 0
        }

        /// Sets up queue 0 (size, rings) and writes QueueReady; true if it reads back 1.
        pub fn setup_queue(&self, num: u32, desc: u64, avail: u64, used: u64) -> bool {
            self.setup_queue_on(0, num, desc, avail, used)
        }

        /// Sets up queue `q` (size, rings) and writes QueueReady; true if it reads back 1.
        pub fn setup_queue_on(&self, q: u32, num: u32, desc: u64, avail: u64, used: u64) -> bool {
            self.w32(VIRTIO_MMIO_QUEUE_SEL.into(), q);
            assert_eq!(self.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
            assert_eq!(self.r32(VIRTIO_MMIO_QUEUE_NUM_MAX.into()), 256);
            self.w32(VIRTIO_MMIO_QUEUE_NUM.into(), num);
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                (VIRTIO_MMIO_QUEUE_USED_LOW, used),
            ] {
                self.w32(low.into(), addr as u32);
                self.w32(u64::from(low) + 4, (addr >> 32) as u32);
            }
            self.w32(VIRTIO_MMIO_QUEUE_READY.into(), 1);
            self.r32(VIRTIO_MMIO_QUEUE_READY.into()) == 1
        }

        /// The driver's initialisation sequence, with fresh rings for every queue (of
        /// [`QSIZE`] entries, at [`rings`]).
        pub fn init(&mut self) {
            for q in 0..self.queues.len() {
                let (desc, _, _) = rings(q);
                self.mem
                    .write_slice(&[0u8; 0x3000], GuestAddress(desc))
                    .unwrap();
                self.queues[q] = DriverQueue::default();
            }
            let offered = self.device_features();
            assert!(self.negotiate(offered));
            for q in 0..self.queues.len() {
                let (desc, avail, used) = rings(q);
                assert!(self.setup_queue_on(q as u32, QSIZE.into(), desc, avail, used));
            }
            let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK;
            self.w32(VIRTIO_MMIO_STATUS.into(), status);
            assert_eq!(self.status(), status);
        }

        /// Writes descriptor `index` of queue 0.
        pub fn put_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            self.put_desc_on(0, index, addr, len, flags, next)
        }

        /// Writes descriptor `index` of queue `q`.
        pub fn put_desc_on(
            &self,
            q: usize,
            index: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let at = rings(q).0 + 16 * u64::from(index);
            self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
            self.mem
                .write_obj(len.to_le(), GuestAddress(at + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(at + 12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), GuestAddress(at + 14))
                .unwrap();
        }

        /// Makes the chain at `head` of queue 0 available, without notifying.
        pub fn publish(&mut self, head: u16) {
            self.publish_on(0, head)
        }

        /// Makes the chain at `head` of queue `q` available, without notifying.
        pub fn publish_on(&mut self, q: usize, head: u16) {
            let avail = rings(q).1;
            let driver = &mut self.queues[q];
            let slot = avail + 4 + 2 * u64::from(driver.avail_idx % QSIZE);
            self.mem
                .write_obj(head.to_le(), GuestAddress(slot))
                .unwrap();
            driver.avail_idx = driver.avail_idx.wrapping_add(1);
            self.mem
                .store(
                    driver.avail_idx.to_le(),
                    GuestAddress(avail + 2),
                    Ordering::Release,
                )
                .unwrap();
        }

        /// Notifies queue 0.
        pub fn notify(&self) {
            self.notify_on(0);
        }

        /// Notifies queue `q`.
        pub fn notify_on(&self, q: u32) {
            self.w32(VIRTIO_MMIO_QUEUE_NOTIFY.into(), q);
        }

        /// Writes `bufs` as one chain of queue 0 and makes it available; returns its head.
        pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
            self.add_chain_on(0, bufs)
        }

        /// Writes `bufs` as one chain of queue `q` and makes it available; returns its
        /// head.
        pub fn add_chain_on(&mut self, q: usize, bufs: &[Buf]) -> u16 {
            let head = self.queues[q].next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let index = (head + i as u16) % QSIZE;
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.put_desc_on(q, index, addr, len, flags, (index + 1) % QSIZE);
            }
            self.queues[q].next_desc = (head + bufs.len() as u16) % QSIZE;
            self.publish_on(q, head);
            head
        }

        /// The used ring's index of queue 0.
        pub fn used_index(&self) -> u16 {
            self.used_index_on(0)
        }

        /// The used ring's index of queue `q`.
        pub fn used_index_on(&self, q: usize) -> u16 {
            u16::from_le(
                self.mem
                    .load(GuestAddress(rings(q).2 + 2), Ordering::Acquire)
                    .unwrap(),
            )
        }

        /// Waits (a few seconds at most) for the next used element of queue 0: (id, len).
        pub fn wait_used(&mut self) -> (u32, u32) {
            self.wait_used_on(0)
        }

        /// Waits (a few seconds at most) for the next used element of queue `q`:
        /// (id, len).
        pub fn wait_used_on(&mut self, q: usize) -> (u32, u32) {
            self.try_wait_used_on(q, Duration::from_secs(5))
                .expect("the device did not return the chain")
        }

        /// The next used element of queue `q` ((id, len)), if one comes within `wait`.
        pub fn try_wait_used_on(&mut self, q: usize, wait: Duration) -> Option<(u32, u32)> {
            let deadline = Instant::now() + wait;
            while self.used_index_on(q) == self.queues[q].used_idx {
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let driver = &mut self.queues[q];
            let at = rings(q).2 + 4 + 8 * u64::from(driver.used_idx % QSIZE);
            driver.used_idx = driver.used_idx.wrapping_add(1);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            Some((u32::from_le(id), u32::from_le(len)))
        }

        /// Waits (a few seconds at most) for an interrupt after `before` pulses.
        pub fn wait_interrupt(&self, before: usize) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.irq.pulses.load(Ordering::SeqCst) <= before {
                assert!(Instant::now() < deadline, "no interrupt");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        pub fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    /// The block device's rig: a [`Rig`] with the device's image.
    struct BlockRig {
        rig: Rig<Block>,
        image: TempFile,
    }

    impl std::ops::Deref for BlockRig {
        type Target = Rig<Block>;
        fn deref(&self) -> &Rig<Block> {
            &self.rig
        }
    }

    impl std::ops::DerefMut for BlockRig {
        fn deref_mut(&mut self) -> &mut Rig<Block> {
            &mut self.rig
        }
    }

    impl BlockRig {
        fn new(content: &[u8], read_only: bool) -> BlockRig {
            let image = TempFile::new(content);
            let disk = DiskImage::open(&image.path, read_only).unwrap();
            BlockRig {
                rig: Rig::with(Block::new(disk)),
                image,
            }
        }

        /// A device on a 64 KiB image of the test pattern, initialised by the driver.
        fn ready(read_only: bool) -> BlockRig {
            let mut rig = BlockRig::new(&pattern(IMAGE_LEN), read_only);
            rig.init();
            rig
        }

        /// Submits `bufs` as one chain, notifies, waits: (status byte at STATUS, used len).
        fn run(&mut self, bufs: &[Buf]) -> (u8, u32) {
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let head = self.add_chain(bufs);
            self.notify();
            let (id, len) = self.wait_used();
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }

        /// Writes a request header at HEADER.
        fn header(&self, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        }

        /// A request of the usual shape: header, data buffers (lengths; at separate places
        /// from DATA), status. Returns (status, used len, the data buffers' addresses).
        fn request(
            &mut self,
            kind: u32,
            sector: u64,
            data: &[u32],
            write: bool,
        ) -> (u8, u32, Vec<u64>) {
            self.header(kind, sector);
            let mut bufs = vec![(HEADER, 16, false)];
            let mut addrs = Vec::new();
            let mut at = DATA;
            for &len in data {
                addrs.push(at);
                bufs.push((at, len, write));
                at += (u64::from(len) + 0x1fff) & !0xfff;
            }
            bufs.push((STATUS, 1, true));
            let (status, len) = self.run(&bufs);
            (status, len, addrs)
        }
    }

    /// A device for the transport's own tests: two queues; its worker returns each chain
    /// with the number of its descriptors as the used length, serves at most two chains
    /// of a queue per turn, and logs (queue, head) in the order it served them.
    #[derive(Default)]
    struct Echo {
        log: Mutex<Vec<(usize, u16)>>,
    }

    impl VirtioDevice for Echo {
        const NAME: &'static str = "virtio-echo";
        const DEVICE_ID: u32 = 0x7e;

        fn features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }

        fn config(&self) -> &[u8] {
            b"echo"
        }

        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }

        fn run(&self, worker: &mut Worker<'_, Self>) {
            loop {
                let events = worker.wait(None);
                if events.stop {
                    return;
                }
                for q in (0..2).filter(|&q| events.kicked(q)) {
                    worker.drain(q, 2, |w, chain| {
                        let head = chain.head_index();
                        let descriptors = chain.count() as u32;
                        lock(&self.log).push((q, head));
                        w.complete(q, head, |_| Ok(descriptors))
                    });
                }
            }
        }
    }

    #[test]
    fn a_device_is_its_trait_and_queues_take_turns() {
        let mut rig = Rig::with(Echo::default());
        assert_eq!(rig.r32(VIRTIO_MMIO_DEVICE_ID.into()), 0x7e);
        assert_eq!(rig.r32(0x100), u32::from_le_bytes(*b"echo"));
        assert_eq!(rig.r32(0x104), 0);
        assert!(rig.negotiate(1 << VIRTIO_F_VERSION_1));
        for q in 0..2 {
            let (desc, avail, used) = rings(q);
            assert!(rig.setup_queue_on(q as u32, QSIZE.into(), desc, avail, used));
        }
        // Five chains on queue 0 (one of three descriptors), one on queue 1, all made
        // available before DRIVER_OK: both queues are kicked at once when it comes.
        let heads: Vec<u16> = (0..5)
            .map(|i| {
                let n = if i == 2 { 3 } else { 1 };
                rig.add_chain_on(0, &vec![(DATA, 8, false); n])
            })
            .collect();
        let other = rig.add_chain_on(1, &[(DATA, 8, true), (DATA, 8, true)]);
        rig.w32(
            VIRTIO_MMIO_STATUS.into(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        for (i, &head) in heads.iter().enumerate() {
            let n = if i == 2 { 3 } else { 1 };
            assert_eq!(rig.wait_used_on(0), (u32::from(head), n));
        }
        assert_eq!(rig.wait_used_on(1), (u32::from(other), 2));
        // Two of queue 0, then queue 1's turn, then queue 0 again, two at a time.
        assert_eq!(
            *lock(&rig.dev.device().log),
            [
                (0, heads[0]),
                (0, heads[1]),
                (1, other),
                (0, heads[2]),
                (0, heads[3]),
                (0, heads[4])
            ]
        );
        // Queue 1 alone: stopped by QueueReady 0, its notifications are ignored.
        rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 1);
        rig.w32(VIRTIO_MMIO_QUEUE_READY.into(), 0);
        rig.add_chain_on(1, &[(DATA, 8, true)]);
        rig.notify_on(1);
        let head = rig.add_chain_on(0, &[(DATA, 8, false)]);
        rig.notify_on(0);
        assert_eq!(rig.wait_used_on(0), (u32::from(head), 1));
        rig.dev.shutdown();
        assert_eq!(rig.used_index_on(1), 1);
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn device_is_shareable() {
        fn shareable<T: Send + Sync>() {}
        shareable::<MmioBlock>();
        shareable::<DiskImage>();
    }

    #[test]
    fn registers_read_correctly() {
        let rig = BlockRig::new(&pattern(IMAGE_LEN), false);
        assert_eq!(rig.r32(0x000), 0x7472_6976);
        assert_eq!(rig.r32(0x004), 2);
        assert_eq!(rig.r32(0x008), 2);
        assert_eq!(rig.r32(0x00c), 0x4d4d_5644);
        let features = rig.device_features();
        for bit in [32, 9, 2, 6] {
            assert_ne!(features & (1 << bit), 0, "feature {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        // Not offered: indirect descriptors, event index.
        assert_eq!(features & (1 << 28 | 1 << 29), 0);
        rig.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL.into(), 2);
        assert_eq!(rig.r32(VIRTIO_MMIO_DEVICE_FEATURES.into()), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_NUM_MAX.into()), 256);
        rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 1);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_NUM_MAX.into()), 0);
        rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 0);
        assert_eq!(rig.status(), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_CONFIG_GENERATION.into()), 0);
        // Configuration space: capacity (any access size), seg_max, blk_size.
        let mut capacity = [0u8; 8];
        rig.dev.mmio_read(0x100, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), (IMAGE_LEN / 512) as u64);
        assert_eq!(rig.r32(0x100), (IMAGE_LEN / 512) as u32);
        assert_eq!(rig.r32(0x104), 0);
        let mut low = [0u8; 2];
        rig.dev.mmio_read(0x100, &mut low);
        assert_eq!(u16::from_le_bytes(low), (IMAGE_LEN / 512) as u16);
        assert_eq!(rig.r32(0x10c), 254);
        assert_eq!(rig.r32(0x114), 512);
        // Sub-word register reads, unknown offsets, past the configuration space.
        let mut b = [0u8; 1];
        rig.dev.mmio_read(0x001, &mut b);
        assert_eq!(b[0], b'i');
        assert_eq!(rig.r32(0x0f0), 0);
        assert_eq!(rig.r32(0x1fc), 0);
        assert_eq!(rig.r32(0x400), 0);
        // Writes to the configuration space and sub-word register writes are ignored.
        rig.dev.mmio_write(0x100, &[0xff; 8]);
        assert_eq!(rig.r32(0x100), (IMAGE_LEN / 512) as u32);
        rig.dev.mmio_write(VIRTIO_MMIO_STATUS.into(), &[1]);
        assert_eq!(rig.status(), 0);
        // A 64-bit write sets both halves of an address.
        rig.dev.mmio_write(
            VIRTIO_MMIO_QUEUE_DESC_LOW.into(),
            &0x1234_5678_9abc_def0u64.to_le_bytes(),
        );
        let mut desc = [0u8; 8];
        rig.dev
            .mmio_read(VIRTIO_MMIO_QUEUE_DESC_LOW.into(), &mut desc);
        assert_eq!(u64::from_le_bytes(desc), 0x1234_5678_9abc_def0);
    }

    #[test]
    fn read_only_disk_offers_ro() {
        let rig = BlockRig::new(&pattern(IMAGE_LEN), true);
        assert_ne!(rig.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let rig = BlockRig::new(&pattern(IMAGE_LEN), false);
        let offered = rig.device_features();
        assert!(!rig.negotiate(offered & !(1 << VIRTIO_F_VERSION_1)));
        // Features the device did not offer are refused too.
        assert!(!rig.negotiate(offered | 1 << 29));
        // DRIVER_OK without FEATURES_OK is refused.
        rig.w32(
            VIRTIO_MMIO_STATUS.into(),
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(rig.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
        assert!(rig.negotiate(offered));
    }

    #[test]
    fn read_request_returns_file_bytes() {
        let mut rig = BlockRig::ready(false);
        let file = rig.image.content();
        // Three data descriptors of odd sizes (1536 bytes together) from sector 5.
        let (status, len, addrs) = rig.request(VIRTIO_BLK_T_IN, 5, &[100, 1000, 436], true);
        assert_eq!(status, OK);
        assert_eq!(len, 1536 + 1);
        let mut got = rig.read_guest(addrs[0], 100);
        got.extend(rig.read_guest(addrs[1], 1000));
        got.extend(rig.read_guest(addrs[2], 436));
        assert_eq!(got, &file[5 * 512..5 * 512 + 1536]);
        // The last sector, with the status byte in the data's descriptor.
        rig.header(VIRTIO_BLK_T_IN, (IMAGE_LEN / 512 - 1) as u64);
        rig.mem.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
        rig.add_chain(&[(HEADER, 16, false), (DATA, 513, true)]);
        rig.notify();
        assert_eq!(rig.wait_used().1, 513);
        assert_eq!(rig.read_guest(DATA + 512, 1), [OK]);
        assert_eq!(rig.read_guest(DATA, 512), &file[IMAGE_LEN - 512..]);
        assert_eq!(rig.image.content(), file);
    }

    #[test]
    fn write_request_changes_exactly_those_bytes() {
        let mut rig = BlockRig::ready(false);
        let mut expected = rig.image.content();
        let new: Vec<u8> = (0..1024).map(|i| (i * 7 + 3) as u8).collect();
        // Header and the first 512 bytes in one descriptor, the rest in another.
        rig.header(VIRTIO_BLK_T_OUT, 3);
        let mut first = rig.read_guest(HEADER, 16);
        first.extend_from_slice(&new[..512]);
        rig.mem.write_slice(&first, GuestAddress(DATA)).unwrap();
        rig.mem
            .write_slice(&new[512..], GuestAddress(DATA + 0x2000))
            .unwrap();
        let (status, len) = rig.run(&[
            (DATA, 16 + 512, false),
            (DATA + 0x2000, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!((status, len), (OK, 1));
        expected[3 * 512..5 * 512].copy_from_slice(&new);
        assert_eq!(rig.image.content(), expected);
        // Read back through the device.
        let (status, _, addrs) = rig.request(VIRTIO_BLK_T_IN, 3, &[1024], true);
        assert_eq!(status, OK);
        assert_eq!(rig.read_guest(addrs[0], 1024), new);
    }

    #[test]
    fn flush_and_get_id() {
        let mut rig = BlockRig::ready(false);
        let (status, len, _) = rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
        assert_eq!((status, len), (OK, 1));
        let (status, len, addrs) = rig.request(VIRTIO_BLK_T_GET_ID, 0, &[20], true);
        assert_eq!((status, len), (OK, 21));
        let mut id = b"dvmm-disk".to_vec();
        id.resize(20, 0);
        assert_eq!(rig.read_guest(addrs[0], 20), id);
        // Unknown request types.
        let (status, len, _) = rig.request(99, 0, &[512], true);
        assert_eq!((status, len), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    }

    #[test]
    fn out_of_range_requests_fail() {
        let mut rig = BlockRig::ready(false);
        let file = rig.image.content();
        let sectors = (IMAGE_LEN / 512) as u64;
        for (sector, len) in [
            (sectors, 512),
            (sectors - 1, 1024),
            (u64::MAX / 256, 512),
            (u64::MAX, 512),
        ] {
            assert_eq!(
                rig.request(VIRTIO_BLK_T_IN, sector, &[len], true).0,
                IOERR,
                "read {sector}"
            );
            assert_eq!(
                rig.request(VIRTIO_BLK_T_OUT, sector, &[len], false).0,
                IOERR,
                "write {sector}"
            );
        }
        // Lengths that are not whole sectors.
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[100], true).0, IOERR);
        assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &[700], false).0, IOERR);
        assert_eq!(
            rig.request(VIRTIO_BLK_T_OUT, 0, &[512, 100], false).0,
            IOERR
        );
        assert_eq!(rig.image.content(), file);
        let stats = rig.dev.stats();
        assert_eq!(stats.errors, 11);
        assert_eq!(stats.bytes_written, 0);
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut rig = BlockRig::ready(true);
        let file = rig.image.content();
        rig.mem
            .write_slice(&[0x55; 512], GuestAddress(DATA))
            .unwrap();
        let (status, len, _) = rig.request(VIRTIO_BLK_T_OUT, 0, &[512], false);
        assert_eq!((status, len), (IOERR, 1));
        assert_eq!(rig.image.content(), file);
        // Reads and flushes are fine.
        let (status, _, addrs) = rig.request(VIRTIO_BLK_T_IN, 0, &[512], true);
        assert_eq!(status, OK);
        assert_eq!(rig.read_guest(addrs[0], 512), &file[..512]);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
    }

    #[test]
    fn malformed_chains_fail() {
        let mut rig = BlockRig::ready(false);
        let file = rig.image.content();
        rig.mem
            .write_slice(&[0x55; 1024], GuestAddress(DATA))
            .unwrap();
        rig.header(VIRTIO_BLK_T_OUT, 0);
        let cases: [(&str, Vec<Buf>, (u8, u32)); 5] = [
            (
                "short header",
                vec![(HEADER, 8, false), (STATUS, 1, true)],
                (IOERR, 1),
            ),
            (
                "writable header",
                vec![(HEADER, 16, true), (DATA, 512, true), (STATUS, 1, true)],
                (IOERR, 1),
            ),
            (
                "write with writable data",
                vec![(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
                (IOERR, 1),
            ),
            (
                "data outside guest memory",
                vec![
                    (HEADER, 16, false),
                    (OUTSIDE, 512, false),
                    (STATUS, 1, true),
                ],
                (IOERR, 1),
            ),
            (
                "readable after writable",
                vec![
                    (HEADER, 16, false),
                    (STATUS, 1, true),
                    (DATA, 512, false),
                    (STATUS, 1, true),
                ],
                (IOERR, 1),
            ),
        ];
        for (what, bufs, expected) in cases {
            assert_eq!(rig.run(&bufs), expected, "{what}");
        }
        // A read whose data descriptor is readable.
        rig.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            rig.run(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
            (IOERR, 1)
        );
        assert_eq!(rig.read_guest(DATA, 512), [0x55; 512]);
        // Without a writable status byte: returned with length 0, the status untouched.
        for bufs in [
            vec![(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, false)],
            vec![(HEADER, 16, false), (DATA, 512, true), (STATUS, 0, true)],
            vec![(HEADER, 16, false), (DATA, 512, true), (OUTSIDE, 1, true)],
            vec![(HEADER, 16, false)],
        ] {
            assert_eq!(rig.run(&bufs), (0xff, 0), "{bufs:?}");
        }
        assert_eq!(rig.read_guest(DATA, 512), [0x55; 512]);
        // A chain that loops (0 -> 1 -> 0): ends after the queue size.
        rig.header(VIRTIO_BLK_T_OUT, 0);
        rig.put_desc(0, HEADER, 16, VRING_DESC_F_NEXT as u16, 1);
        rig.put_desc(1, DATA, 512, VRING_DESC_F_NEXT as u16, 0);
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        rig.publish(0);
        rig.notify();
        assert_eq!(rig.wait_used(), (0, 0));
        // A head index beyond the queue: nothing to do, and the device goes on.
        rig.publish(QSIZE + 3);
        rig.notify();
        rig.queues[0].next_desc = 2;
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
        assert_eq!(rig.image.content(), file);
        let stats = rig.dev.stats();
        assert_eq!(stats.bytes_written, 0);
        assert_eq!(stats.errors, stats.requests - 1);
    }

    #[test]
    fn interrupt_is_pulsed_and_acknowledged() {
        let mut rig = BlockRig::ready(false);
        assert_eq!(rig.irq.pulses.load(Ordering::SeqCst), 0);
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[512], true).0, OK);
        // The pulse follows the used ring update: wait for it the same way.
        rig.wait_interrupt(0);
        assert_eq!(rig.irq.pin.load(Ordering::SeqCst), PIN);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 1);
        rig.w32(VIRTIO_MMIO_INTERRUPT_ACK.into(), 1);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 0);
    }

    #[test]
    fn reset_stops_the_queue() {
        let mut rig = BlockRig::ready(false);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
        rig.w32(VIRTIO_MMIO_STATUS.into(), 0);
        assert_eq!(rig.status(), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_DESC_LOW.into()), 0);
        // A request and a notification after the reset: ignored.
        rig.header(VIRTIO_BLK_T_FLUSH, 0);
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        rig.add_chain(&[(HEADER, 16, false), (STATUS, 1, true)]);
        rig.notify();
        let used = rig.used_index();
        // The worker ends after what it was given: nothing.
        rig.dev.shutdown();
        assert_eq!(rig.used_index(), used);
        assert_eq!(rig.read_guest(STATUS, 1), [0xff]);
        assert_eq!(rig.dev.stats().requests, 1);
    }

    #[test]
    fn reset_and_initialise_again() {
        let mut rig = BlockRig::ready(false);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
        // A new queue starts from index 0 again.
        rig.init();
        let (status, _, addrs) = rig.request(VIRTIO_BLK_T_IN, 1, &[512], true);
        assert_eq!(status, OK);
        assert_eq!(
            rig.read_guest(addrs[0], 512),
            &rig.image.content()[512..1024]
        );
        assert_eq!(rig.used_index(), 1);
        // QueueReady 0 stops the queue too.
        rig.w32(VIRTIO_MMIO_QUEUE_READY.into(), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
        rig.add_chain(&[(HEADER, 16, false), (STATUS, 1, true)]);
        rig.notify();
        rig.dev.shutdown();
        assert_eq!(rig.used_index(), 1);
    }

    #[test]
    fn invalid_queues_stay_disabled() {
        let mut rig = BlockRig::new(&pattern(IMAGE_LEN), false);
        assert!(rig.negotiate(rig.device_features()));
        assert!(!rig.setup_queue(100, DESC, AVAIL, USED));
        assert!(!rig.setup_queue(512, DESC, AVAIL, USED));
        assert!(!rig.setup_queue(0, DESC, AVAIL, USED));
        assert!(!rig.setup_queue(16, DESC + 1, AVAIL, USED));
        assert!(!rig.setup_queue(16, DESC, AVAIL, USED + 2));
        assert!(!rig.setup_queue(16, OUTSIDE, AVAIL, USED));
        assert!(!rig.setup_queue(16, DESC, AVAIL, MEM_SIZE as u64 - 0x40));
        assert!(!rig.setup_queue(16, DESC, 0, USED));
        // Another queue than 0 cannot be made ready.
        rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 1);
        rig.w32(VIRTIO_MMIO_QUEUE_READY.into(), 1);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
        rig.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 0);
        assert_eq!(rig.r32(VIRTIO_MMIO_QUEUE_READY.into()), 0);
        // DRIVER_OK with no ready queue; notifications are ignored.
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        rig.w32(VIRTIO_MMIO_STATUS.into(), status);
        assert_eq!(rig.status(), status);
        rig.header(VIRTIO_BLK_T_FLUSH, 0);
        rig.add_chain(&[(HEADER, 16, false), (STATUS, 1, true)]);
        rig.notify();
        rig.dev.shutdown();
        assert_eq!(rig.used_index(), 0);
        assert_eq!(rig.dev.stats(), BlockStats::default());
    }

    #[test]
    fn chains_made_available_before_driver_ok_are_served() {
        let mut rig = BlockRig::new(&pattern(IMAGE_LEN), false);
        assert!(rig.negotiate(rig.device_features()));
        assert!(rig.setup_queue(QSIZE.into(), DESC, AVAIL, USED));
        rig.header(VIRTIO_BLK_T_FLUSH, 0);
        rig.add_chain(&[(HEADER, 16, false), (STATUS, 1, true)]);
        rig.notify();
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        rig.w32(VIRTIO_MMIO_STATUS.into(), status);
        assert_eq!(rig.wait_used(), (0, 1));
    }

    #[test]
    fn shutdown_finishes_notified_requests() {
        let mut rig = BlockRig::ready(false);
        let mut expected = rig.image.content();
        // Four writes of one sector each (sectors 10..14), one notification.
        for i in 0..4u64 {
            let header = HEADER + 0x100 * i;
            let data = DATA + 0x1000 * i;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&(10 + i).to_le_bytes());
            rig.mem.write_slice(&h, GuestAddress(header)).unwrap();
            rig.mem
                .write_slice(&[i as u8 + 1; 512], GuestAddress(data))
                .unwrap();
            rig.add_chain(&[
                (header, 16, false),
                (data, 512, false),
                (STATUS + i, 1, true),
            ]);
            let at = (10 + i as usize) * 512;
            expected[at..at + 512].fill(i as u8 + 1);
        }
        rig.notify();
        rig.dev.shutdown();
        assert_eq!(rig.used_index(), 4);
        assert_eq!(rig.read_guest(STATUS, 4), [OK; 4]);
        assert_eq!(rig.image.content(), expected);
        let stats = rig.dev.stats();
        assert_eq!(stats.requests, 4);
        assert_eq!(stats.bytes_written, 4 * 512);
        assert_eq!(stats.errors, 0);
        // Shutting down twice (and on drop) is fine.
        rig.dev.shutdown();
    }

    #[test]
    fn large_requests_cross_the_bounce_buffer() {
        // A request larger than the worker's buffer, in page-sized descriptors.
        let len = block::CHUNK + 8192;
        let mut rig = BlockRig::new(&pattern(len * 2), false);
        rig.init();
        let pages = len / 4096;
        let mut bufs = vec![(HEADER, 16, false)];
        for p in 0..pages as u64 {
            bufs.push((DATA + 0x1000 * p, 4096, true));
        }
        bufs.push((STATUS, 1, true));
        // Needs a bigger queue than QSIZE: set one up of 256.
        assert!(bufs.len() > usize::from(QSIZE));
        let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK;
        rig.w32(VIRTIO_MMIO_STATUS.into(), 0);
        assert!(rig.negotiate(rig.device_features()));
        // Rings for 256 entries: descriptors 4 KiB, then avail and used rings.
        let (desc, avail, used) = (0x100000, 0x101000, 0x102000);
        assert!(rig.setup_queue(256, desc, avail, used));
        rig.w32(VIRTIO_MMIO_STATUS.into(), status);
        rig.header(VIRTIO_BLK_T_IN, 1);
        for (i, &(addr, l, write)) in bufs.iter().enumerate() {
            let at = desc + 16 * i as u64;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            rig.mem.write_obj(addr, GuestAddress(at)).unwrap();
            rig.mem.write_obj(l, GuestAddress(at + 8)).unwrap();
            rig.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            rig.mem
                .write_obj(i as u16 + 1, GuestAddress(at + 14))
                .unwrap();
        }
        rig.mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
        rig.mem
            .store(1u16, GuestAddress(avail + 2), Ordering::Release)
            .unwrap();
        rig.notify();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rig
            .mem
            .load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
            .unwrap()
            == 0
        {
            assert!(
                Instant::now() < deadline,
                "the device did not return the chain"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let used_len: u32 = rig.mem.read_obj(GuestAddress(used + 8)).unwrap();
        assert_eq!(used_len as usize, len + 1);
        assert_eq!(rig.read_guest(STATUS, 1), [OK]);
        assert_eq!(
            rig.read_guest(DATA, len),
            &rig.image.content()[512..512 + len]
        );
        assert_eq!(rig.dev.stats().bytes_read, len as u64);
    }
}
