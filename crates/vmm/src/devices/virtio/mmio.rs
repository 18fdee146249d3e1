//! The virtio-mmio transport (version 2) of the block device, and its worker thread.
//!
//! [`MmioBlock`] is one MMIO window of [`MMIO_WINDOW`] bytes: the registers from 0, the
//! configuration space of the block device from 0x100. Register accesses (vCPU threads,
//! accesses forwarded from other nodes) only change registers under a mutex and never
//! wait for the disk: a `QueueNotify` wakes the worker thread ("virtio-blk"), which pops
//! the descriptor chains, does the file I/O, writes the status byte, returns the chain in
//! the used ring, sets bit 0 of `InterruptStatus` and pulses the interrupt line.
//!
//! The worker keeps its own copy of the queue (built from the registers when the queue
//! went live), so the registers' lock is never held during the I/O or while the worker
//! reads descriptors. A reset (or `QueueReady` 0) stops the queue: it bumps a generation
//! number the worker checks before each piece of data it moves into guest memory and
//! before it returns a chain, and waits (only) for a return already under way, a few
//! guest-memory writes, so that once the reset is done the device no longer touches the
//! rings.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
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
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::block::{self, BlockStats, Completion, DiskImage, CONFIG_LEN};
use crate::devices::IrqLine;
use crate::lock;

/// The size of one virtio-mmio device window: registers, then the configuration space.
pub const MMIO_WINDOW: u64 = 0x200;

/// The largest queue the device accepts (`QueueNumMax`).
pub const QUEUE_SIZE_MAX: u16 = 256;

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
const SIGNAL_BATCH: u32 = 32;

/// Problems the device warns about, once per device each (the guest controls how often
/// they happen).
#[derive(Debug, Clone, Copy)]
enum Problem {
    QueueSize,
    QueueAlign,
    QueueMemory,
    Features,
    StatusOrder,
    AccessSize,
    UsedRing,
    HostIo,
}

/// The registers of the queue, as the driver wrote them.
#[derive(Debug, Clone, Copy)]
struct QueueRegs {
    num: u32,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl Default for QueueRegs {
    fn default() -> Self {
        QueueRegs {
            num: u32::from(QUEUE_SIZE_MAX),
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

impl QueueRegs {
    /// The queue as virtio-queue sees it (before the worker used any of it).
    fn state(&self) -> QueueState {
        QueueState {
            max_size: QUEUE_SIZE_MAX,
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
#[derive(Debug, Default)]
struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queue: QueueRegs,
    interrupt_status: u32,
    /// Bumped whenever the queue starts or stops: the worker's copy of the queue, and any
    /// request it is serving, belong to one generation.
    generation: u64,
    /// The driver notified the queue since the worker last looked.
    kick: bool,
    /// The worker is returning a chain (status byte, used ring) of the current generation.
    completing: bool,
    /// The worker is to end.
    stop: bool,
    /// The problems already warned about (bits of [`Problem`]).
    warned: u32,
}

impl Regs {
    /// Whether the worker serves the queue.
    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.queue.ready
    }

    /// True the first time `problem` happens on this device.
    fn first(&mut self, problem: Problem) -> bool {
        let bit = 1u32 << (problem as u32);
        let first = self.warned & bit == 0;
        self.warned |= bit;
        first
    }
}

/// The device's counters.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// What the register side and the worker share.
struct Shared {
    regs: Mutex<Regs>,
    /// The worker waits here for a notification (or the end).
    work: Condvar,
    /// A reset waits here for the worker to finish returning a chain.
    idle: Condvar,
    disk: DiskImage,
    mem: GuestMemoryMmap,
    irq: Arc<dyn IrqLine>,
    pin: usize,
    features: u64,
    config: [u8; CONFIG_LEN],
    counters: Counters,
    /// Set by [`MmioBlock::shutdown`]: the worker finishes what is queued, then ends.
    stopping: AtomicBool,
}

/// One virtio-mmio block device window (0x200 bytes: registers + config space) whose
/// requests a worker thread serves.
pub struct MmioBlock {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl MmioBlock {
    /// Creates the device for `disk` in guest memory `mem`, interrupting through `irq` on
    /// IOAPIC pin `pin` (edge), and starts its worker thread ("virtio-blk").
    ///
    /// Guest memory accesses may block (on a cluster, pages may come from another node);
    /// only the worker makes them, never [`mmio_read`](Self::mmio_read) or
    /// [`mmio_write`](Self::mmio_write).
    pub fn new(
        disk: DiskImage,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
        pin: usize,
    ) -> io::Result<MmioBlock> {
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            features: block::device_features(&disk),
            config: block::config_space(&disk, QUEUE_SIZE_MAX),
            disk,
            mem,
            irq,
            pin,
            counters: Counters::default(),
            stopping: AtomicBool::new(false),
        });
        let worker = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("virtio-blk".into())
                .spawn(move || shared.run())?
        };
        Ok(MmioBlock {
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
                    "virtio-blk: {}-byte register write at {offset:#x} ignored (registers take aligned 32-bit writes)",
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

    /// Stops the worker (also done on drop) and waits for it to end: the requests the
    /// driver made available before are finished first (at most one ring's worth more).
    /// The registers keep answering; notifications no longer do anything.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        lock(&self.shared.regs).stop = true;
        self.shared.work.notify_all();
        let worker = lock(&self.worker).take();
        if let Some(worker) = worker {
            if worker.join().is_err() {
                tracing::warn!(
                    "virtio-blk: the worker thread of {} panicked",
                    self.shared.disk.path().display()
                );
            }
        }
    }

    /// The device's counters: requests, bytes read, bytes written, errors.
    pub fn stats(&self) -> BlockStats {
        let c = &self.shared.counters;
        BlockStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
    }

    /// The disk image behind the device.
    pub fn disk(&self) -> &DiskImage {
        &self.shared.disk
    }
}

impl Drop for MmioBlock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    /// The byte at `at` in the window.
    fn byte_at(&self, regs: &Regs, at: u64) -> u8 {
        if at < CONFIG_OFFSET {
            let word = self.read_reg(regs, at & !3).to_le_bytes();
            word[(at & 3) as usize]
        } else {
            usize::try_from(at - CONFIG_OFFSET)
                .ok()
                .and_then(|i| self.config.get(i))
                .copied()
                .unwrap_or(0)
        }
    }

    /// The 32-bit register at `offset` (a multiple of 4 below the configuration space).
    fn read_reg(&self, regs: &Regs, offset: u64) -> u32 {
        let Ok(offset) = u32::try_from(offset) else {
            return 0;
        };
        let queue0 = regs.queue_sel == 0;
        let q = &regs.queue;
        let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => VIRTIO_ID_BLOCK,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match regs.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX if queue0 => u32::from(QUEUE_SIZE_MAX),
            VIRTIO_MMIO_QUEUE_NUM if queue0 => q.num,
            VIRTIO_MMIO_QUEUE_READY if queue0 => u32::from(q.ready),
            VIRTIO_MMIO_INTERRUPT_STATUS => regs.interrupt_status,
            VIRTIO_MMIO_STATUS => regs.status,
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue0 => half(q.desc, false),
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue0 => half(q.desc, true),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue0 => half(q.avail, false),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue0 => half(q.avail, true),
            VIRTIO_MMIO_QUEUE_USED_LOW if queue0 => half(q.used, false),
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue0 => half(q.used, true),
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
        // The queue's registers are only for queue 0, and only while it is not ready.
        let queue_setup = regs.queue_sel == 0 && !regs.queue.ready;
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => regs.device_features_sel = value,
            // The driver's features are settled once FEATURES_OK is set.
            VIRTIO_MMIO_DRIVER_FEATURES if regs.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match regs.driver_features_sel {
                    0 => set_half(&mut regs.driver_features, false, value),
                    1 => set_half(&mut regs.driver_features, true, value),
                    _ => {}
                }
            }
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => regs.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => regs.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM if queue_setup => regs.queue.num = value,
            VIRTIO_MMIO_QUEUE_DESC_LOW if queue_setup => {
                set_half(&mut regs.queue.desc, false, value)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH if queue_setup => {
                set_half(&mut regs.queue.desc, true, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW if queue_setup => {
                set_half(&mut regs.queue.avail, false, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH if queue_setup => {
                set_half(&mut regs.queue.avail, true, value)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW if queue_setup => {
                set_half(&mut regs.queue.used, false, value)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH if queue_setup => {
                set_half(&mut regs.queue.used, true, value)
            }
            VIRTIO_MMIO_QUEUE_READY if regs.queue_sel == 0 => {
                if value != 0 && !regs.queue.ready {
                    match self.check_queue(&regs.queue) {
                        Ok(()) => {
                            regs.queue.ready = true;
                            self.start(&mut regs);
                        }
                        Err((problem, why)) => {
                            if regs.first(problem) {
                                tracing::warn!("virtio-blk: {why}: the queue stays disabled");
                            }
                        }
                    }
                } else if value == 0 && regs.queue.ready {
                    regs.queue.ready = false;
                    regs = self.stop_queue(regs);
                }
            }
            // The value is the queue's index; the device has queue 0 only.
            VIRTIO_MMIO_QUEUE_NOTIFY if value == 0 && regs.live() => {
                regs.kick = true;
                self.work.notify_one();
            }
            VIRTIO_MMIO_INTERRUPT_ACK => regs.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => regs = self.write_status(regs, value),
            _ => {}
        }
        regs
    }

    /// Whether the queue the driver set up can be used: `Err` names the problem.
    fn check_queue(&self, q: &QueueRegs) -> Result<(), (Problem, String)> {
        let num = q.num;
        let size_ok = (1..=u32::from(QUEUE_SIZE_MAX)).contains(&num) && num.is_power_of_two();
        if !size_ok {
            return Err((
                Problem::QueueSize,
                format!("queue size {num} is not a power of 2 from 1 to {QUEUE_SIZE_MAX}"),
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
                    "virtio-blk: the driver cleared status bits ({old:#x} to {value:#x}) without a reset: ignored"
                );
            }
            return regs;
        }
        // DEVICE_NEEDS_RESET is the device's to set.
        let mut status = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let added = status & !old;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let introduced = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
            let features = regs.driver_features;
            let acceptable = status & introduced == introduced
                && features & (1u64 << VIRTIO_F_VERSION_1) != 0
                && features & !self.features == 0;
            if !acceptable {
                // The driver reads the status back and sees the features refused.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
                if regs.first(Problem::Features) {
                    tracing::warn!(
                        "virtio-blk: the driver's features {features:#x} are refused (offered {:#x}, VERSION_1 required)",
                        self.features
                    );
                }
            }
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            if regs.first(Problem::StatusOrder) {
                tracing::warn!("virtio-blk: DRIVER_OK without FEATURES_OK: ignored");
            }
        }
        regs.status = status;
        if status & added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.start(&mut regs);
        }
        regs
    }

    /// The queue may just have gone live: if so, a new generation, and the worker looks
    /// at the available ring (buffers made available before DRIVER_OK).
    fn start(&self, regs: &mut Regs) {
        if regs.live() {
            regs.generation = regs.generation.wrapping_add(1);
            regs.kick = true;
            self.work.notify_one();
        }
    }

    /// Stops the queue: a new generation, then waits for a chain being returned to be
    /// returned (a few guest-memory writes, no disk I/O). Afterwards the worker no longer
    /// touches the rings.
    fn stop_queue<'a>(&'a self, mut regs: MutexGuard<'a, Regs>) -> MutexGuard<'a, Regs> {
        regs.generation = regs.generation.wrapping_add(1);
        regs.kick = false;
        while regs.completing {
            regs = self.idle.wait(regs).unwrap_or_else(PoisonError::into_inner);
        }
        regs
    }

    /// A device reset (`Status` 0): the queue stops, and the registers go back to their
    /// initial values.
    fn reset<'a>(&'a self, regs: MutexGuard<'a, Regs>) -> MutexGuard<'a, Regs> {
        let mut regs = self.stop_queue(regs);
        *regs = Regs {
            generation: regs.generation,
            stop: regs.stop,
            warned: regs.warned,
            ..Regs::default()
        };
        regs
    }

    /// The worker thread.
    fn run(&self) {
        let mut queue: Option<(u64, Queue)> = None;
        let mut buf = vec![0u8; block::CHUNK];
        // Once a shutdown is requested, at most one ring's worth of chains more (a guest
        // that keeps making requests cannot hold the worker up).
        let mut after_stop = u32::from(QUEUE_SIZE_MAX);
        loop {
            let generation = {
                let mut regs = lock(&self.regs);
                loop {
                    if std::mem::take(&mut regs.kick) && regs.live() && after_stop > 0 {
                        break;
                    }
                    if regs.stop {
                        return;
                    }
                    regs = self.work.wait(regs).unwrap_or_else(PoisonError::into_inner);
                }
                if queue.as_ref().map(|(g, _)| *g) != Some(regs.generation) {
                    // Checked when the driver set QueueReady.
                    queue = Queue::try_from(regs.queue.state())
                        .ok()
                        .map(|q| (regs.generation, q));
                }
                regs.generation
            };
            if let Some((_, q)) = queue.as_mut() {
                self.serve(q, generation, &mut buf, &mut after_stop);
            }
        }
    }

    /// Serves the chains available in `q` (of generation `generation`) until it runs
    /// empty, the queue stops, or (after a shutdown request) `after_stop` runs out.
    fn serve(&self, q: &mut Queue, generation: u64, buf: &mut [u8], after_stop: &mut u32) {
        let mem = &self.mem;
        let live = || lock(&self.regs).generation == generation;
        let mut unsignalled = 0u32;
        'serve: loop {
            // No notifications while the worker is at it anyway; errors here only cost
            // notifications.
            let _ = q.disable_notification(mem);
            let mut popped = false;
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                let done = block::execute(&self.disk, mem, chain, buf, &live);
                self.count(&done);
                if !self.complete(q, generation, head, &done) {
                    break 'serve;
                }
                unsignalled += 1;
                if unsignalled >= SIGNAL_BATCH {
                    self.signal(generation);
                    unsignalled = 0;
                }
                if self.stopping.load(Ordering::Relaxed) {
                    *after_stop = after_stop.saturating_sub(1);
                    if *after_stop == 0 {
                        break 'serve;
                    }
                }
            }
            // More chains since the last look? (Nothing popped although the ring says so:
            // a ring the driver broke; its next notification tries again.)
            match q.enable_notification(mem) {
                Ok(true) if popped => {}
                _ => break,
            }
        }
        if unsignalled > 0 {
            self.signal(generation);
        }
    }

    /// Returns the chain `head` with its status: false if the queue stopped meanwhile
    /// (the chain is then left alone).
    fn complete(&self, q: &mut Queue, generation: u64, head: u16, done: &Completion) -> bool {
        {
            let mut regs = lock(&self.regs);
            if regs.generation != generation {
                return false;
            }
            regs.completing = true;
        }
        let mut result = Ok(());
        if let Some(at) = done.status_at {
            // Checked to be in guest memory when the chain was parsed.
            result = self
                .mem
                .write_obj(done.status, at)
                .map_err(|e| e.to_string());
        }
        if result.is_ok() {
            result = q
                .add_used(&self.mem, head, done.used_len)
                .map_err(|e| e.to_string());
        }
        {
            let mut regs = lock(&self.regs);
            regs.completing = false;
            if let Err(e) = result {
                if regs.first(Problem::UsedRing) {
                    tracing::warn!(
                        "virtio-blk: chain {head} cannot be returned to the driver: {e}"
                    );
                }
            }
        }
        self.idle.notify_all();
        true
    }

    /// Tells the driver about returned chains: `InterruptStatus` bit 0 and a pulse.
    fn signal(&self, generation: u64) {
        {
            let mut regs = lock(&self.regs);
            if regs.generation != generation {
                return;
            }
            regs.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        }
        self.irq.pulse(self.pin);
    }

    /// Counts a request.
    fn count(&self, done: &Completion) {
        let c = &self.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(done.bytes_read, Ordering::Relaxed);
        c.bytes_written
            .fetch_add(done.bytes_written, Ordering::Relaxed);
        if done.failed() {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(kind) = done.host_error {
            if lock(&self.regs).first(Problem::HostIo) {
                tracing::warn!(
                    "virtio-blk: I/O on disk image {} failed: {kind}",
                    self.disk.path().display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::tests::{pattern, TempFile};
    use std::sync::atomic::AtomicUsize;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const MEM_SIZE: usize = 4 << 20;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HEADER: u64 = 0x10000;
    const STATUS: u64 = 0x11000;
    const DATA: u64 = 0x20000;
    const QSIZE: u16 = 16;
    const PIN: usize = 5;
    const IMAGE_LEN: usize = 64 << 10;
    /// An address beyond guest memory.
    const OUTSIDE: u64 = 0x1_0000_0000;

    /// Counts the pulses of the interrupt line.
    #[derive(Default)]
    struct CountingIrq {
        pulses: AtomicUsize,
        pin: AtomicUsize,
    }

    impl IrqLine for CountingIrq {
        fn pulse(&self, pin: usize) {
            self.pin.store(pin, Ordering::SeqCst);
            self.pulses.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A buffer of a chain: guest address, length, device-writable.
    type Buf = (u64, u32, bool);

    /// The device, its guest memory and image, and the driver's side of the queue.
    struct Rig {
        dev: MmioBlock,
        mem: GuestMemoryMmap,
        irq: Arc<CountingIrq>,
        image: TempFile,
        next_desc: u16,
        avail_idx: u16,
        used_idx: u16,
    }

    impl Rig {
        fn new(content: &[u8], read_only: bool) -> Rig {
            let image = TempFile::new(content);
            let disk = DiskImage::open(&image.path, read_only).unwrap();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let irq = Arc::new(CountingIrq::default());
            let dev = MmioBlock::new(disk, mem.clone(), irq.clone(), PIN).unwrap();
            Rig {
                dev,
                mem,
                irq,
                image,
                next_desc: 0,
                avail_idx: 0,
                used_idx: 0,
            }
        }

        /// A device on a 64 KiB image of the test pattern, initialised by the driver.
        fn ready(read_only: bool) -> Rig {
            let mut rig = Rig::new(&pattern(IMAGE_LEN), read_only);
            rig.init();
            rig
        }

        fn r32(&self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            self.dev.mmio_read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn w32(&self, offset: u64, value: u32) {
            self.dev.mmio_write(offset, &value.to_le_bytes());
        }

        fn status(&self) -> u32 {
            self.r32(VIRTIO_MMIO_STATUS.into())
        }

        fn device_features(&self) -> u64 {
            self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL.into(), 1);
            let high = self.r32(VIRTIO_MMIO_DEVICE_FEATURES.into());
            self.w32(VIRTIO_MMIO_DEVICE_FEATURES_SEL.into(), 0);
            let low = self.r32(VIRTIO_MMIO_DEVICE_FEATURES.into());
            (u64::from(high) << 32) | u64::from(low)
        }

        /// Reset, ACKNOWLEDGE, DRIVER, features; true if the device accepted them.
        fn negotiate(&self, features: u64) -> bool {
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
        fn setup_queue(&self, num: u32, desc: u64, avail: u64, used: u64) -> bool {
            self.w32(VIRTIO_MMIO_QUEUE_SEL.into(), 0);
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

        /// The driver's initialisation sequence, with fresh rings.
        fn init(&mut self) {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
                .unwrap();
            self.next_desc = 0;
            self.avail_idx = 0;
            self.used_idx = 0;
            let offered = self.device_features();
            assert!(self.negotiate(offered));
            assert!(self.setup_queue(QSIZE.into(), DESC, AVAIL, USED));
            let status = VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK;
            self.w32(VIRTIO_MMIO_STATUS.into(), status);
            assert_eq!(self.status(), status);
        }

        /// Writes descriptor `index`.
        fn put_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = DESC + 16 * u64::from(index);
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

        /// Makes the chain at `head` available, without notifying.
        fn publish(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            self.mem
                .write_obj(head.to_le(), GuestAddress(slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .store(
                    self.avail_idx.to_le(),
                    GuestAddress(AVAIL + 2),
                    Ordering::Release,
                )
                .unwrap();
        }

        fn notify(&self) {
            self.w32(VIRTIO_MMIO_QUEUE_NOTIFY.into(), 0);
        }

        /// Writes `bufs` as one chain and makes it available; returns its head.
        fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, write)) in bufs.iter().enumerate() {
                let index = (head + i as u16) % QSIZE;
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.put_desc(index, addr, len, flags, (index + 1) % QSIZE);
            }
            self.next_desc = (head + bufs.len() as u16) % QSIZE;
            self.publish(head);
            head
        }

        fn used_index(&self) -> u16 {
            u16::from_le(
                self.mem
                    .load(GuestAddress(USED + 2), Ordering::Acquire)
                    .unwrap(),
            )
        }

        /// Waits (a few seconds at most) for the next used element: (id, len).
        fn wait_used(&mut self) -> (u32, u32) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.used_index() == self.used_idx {
                assert!(
                    Instant::now() < deadline,
                    "the device did not return the chain"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let at = USED + 4 + 8 * u64::from(self.used_idx % QSIZE);
            self.used_idx = self.used_idx.wrapping_add(1);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            (u32::from_le(id), u32::from_le(len))
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

        fn read_guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
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
        let rig = Rig::new(&pattern(IMAGE_LEN), false);
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
        let rig = Rig::new(&pattern(IMAGE_LEN), true);
        assert_ne!(rig.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let rig = Rig::new(&pattern(IMAGE_LEN), false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::ready(true);
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
        let mut rig = Rig::ready(false);
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
        rig.next_desc = 2;
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[], false).0, OK);
        assert_eq!(rig.image.content(), file);
        let stats = rig.dev.stats();
        assert_eq!(stats.bytes_written, 0);
        assert_eq!(stats.errors, stats.requests - 1);
    }

    #[test]
    fn interrupt_is_pulsed_and_acknowledged() {
        let mut rig = Rig::ready(false);
        assert_eq!(rig.irq.pulses.load(Ordering::SeqCst), 0);
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &[512], true).0, OK);
        // The pulse follows the used ring update: wait for it the same way.
        let deadline = Instant::now() + Duration::from_secs(5);
        while rig.irq.pulses.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(rig.irq.pin.load(Ordering::SeqCst), PIN);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 1);
        rig.w32(VIRTIO_MMIO_INTERRUPT_ACK.into(), 1);
        assert_eq!(rig.r32(VIRTIO_MMIO_INTERRUPT_STATUS.into()), 0);
    }

    #[test]
    fn reset_stops_the_queue() {
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::new(&pattern(IMAGE_LEN), false);
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
        let mut rig = Rig::new(&pattern(IMAGE_LEN), false);
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
        let mut rig = Rig::ready(false);
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
        let mut rig = Rig::new(&pattern(len * 2), false);
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
