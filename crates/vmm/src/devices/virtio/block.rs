//! The block device behind the transport ([`Block`], a [`VirtioDevice`]): the disk image,
//! the device's features and configuration space, its worker (one queue, served chain by
//! chain) and the execution of one request (one descriptor chain).
//!
//! A request is a header (type, reserved, sector: 16 bytes the device reads), data
//! (read by the device for `T_OUT`, written by it for `T_IN` and `T_GET_ID`) and a status
//! byte the device writes last. The descriptors may split this byte stream anywhere (the
//! device makes no assumption about the framing): the readable descriptors come first
//! (header, then the data of a write), the writable ones after (the data of a read, then
//! the status, the last byte of the chain).
//!
//! Nothing the guest puts in a chain can make the device read or write outside the image
//! or outside guest memory: every descriptor is checked against guest memory, every
//! request against the size of the image, and a malformed request ends with
//! `VIRTIO_BLK_S_IOERR` (or, without a writable status byte, with a used length of 0).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::mmio::{VirtioDevice, VirtioMmio, Worker, QUEUE_SIZE_MAX};
use super::stream::Stream;

/// The sector size of the virtio block protocol (and the block size the device reports).
pub const SECTOR_SIZE: u64 = 512;

/// The identifier a `VIRTIO_BLK_T_GET_ID` request returns (zero-padded to 20 bytes).
pub const DISK_ID: &[u8] = b"dvmm-disk";

/// The size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u64 = 16;

/// The largest piece of a request the worker moves between the image and guest memory in
/// one step (the size of its bounce buffer).
pub(crate) const CHUNK: usize = 256 << 10;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image cannot be opened or examined (missing, no permission, ...).
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The path names a directory.
    #[error("disk image {} is a directory", path.display())]
    Directory {
        /// The image.
        path: PathBuf,
    },
    /// The path names something other than a regular file or a block device.
    #[error("disk image {} is not a regular file or a block device", path.display())]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// The image has no bytes.
    #[error("disk image {} is empty", path.display())]
    Empty {
        /// The image.
        path: PathBuf,
    },
    /// The size of the image is not a whole number of 512-byte sectors.
    #[error("disk image {} has {size} bytes, not a multiple of 512", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The image was to be opened for writing, but it cannot be written.
    #[error("disk image {} is not writable (use the read-only option)", path.display())]
    NotWritable {
        /// The image.
        path: PathBuf,
    },
}

/// A disk image the guest sees as its virtio block device: an open file (or block device)
/// whose size is a whole number of sectors.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    size: u64,
    read_only: bool,
    path: PathBuf,
}

impl DiskImage {
    /// Opens an image file, for reading only if `read_only`, else for reading and writing.
    ///
    /// Refuses a missing or unreadable file, a directory, an image of 0 bytes or of a size
    /// that is not a multiple of 512 bytes, and (for writing) a file that cannot be written
    /// (no write permission bit at all, even for root, or the system refuses).
    pub fn open(path: &Path, read_only: bool) -> Result<DiskImage, DiskError> {
        let owned = || path.to_path_buf();
        let meta = std::fs::metadata(path).map_err(|source| DiskError::Open {
            path: owned(),
            source,
        })?;
        let kind = meta.file_type();
        if kind.is_dir() {
            return Err(DiskError::Directory { path: owned() });
        }
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::NotAFile { path: owned() });
        }
        if !read_only && meta.permissions().readonly() {
            return Err(DiskError::NotWritable { path: owned() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| {
                let refused = matches!(
                    source.raw_os_error(),
                    Some(libc::EACCES | libc::EPERM | libc::EROFS | libc::ETXTBSY)
                );
                if !read_only && refused {
                    DiskError::NotWritable { path: owned() }
                } else {
                    DiskError::Open {
                        path: owned(),
                        source,
                    }
                }
            })?;
        // The end of a block device is its size; for a regular file it is the length.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Open {
                path: owned(),
                source,
            })?;
        if size == 0 {
            return Err(DiskError::Empty { path: owned() });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size {
                path: owned(),
                size,
            });
        }
        Ok(DiskImage {
            file,
            size,
            read_only,
            path: owned(),
        })
    }

    /// The size of the image in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the guest may only read the image.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The path the image was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `len` bytes from sector `sector` lie inside the image.
    fn contains(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= self.size)
    }
}

/// Counters of a block device, for statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Requests (descriptor chains) served.
    pub requests: u64,
    /// Bytes read from the image into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: u64,
    /// Requests that ended with an error status, or that were malformed.
    pub errors: u64,
}

/// The counters of a block device.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// The virtio block device (device ID 2) on a disk image, behind a [`VirtioMmio`]
/// transport ([`MmioBlock`]): one request queue; the worker thread does the file I/O.
pub struct Block {
    disk: DiskImage,
    features: u64,
    config: [u8; CONFIG_LEN],
    counters: Counters,
    /// A host I/O failure was warned about.
    warned_io: AtomicBool,
}

/// The virtio block device on its virtio-mmio transport.
pub type MmioBlock = VirtioMmio<Block>;

/// The size of the block device's queue (`QueueNumMax`).
const QUEUE_SIZE: u16 = QUEUE_SIZE_MAX;

impl Block {
    /// The device for `disk`.
    pub fn new(disk: DiskImage) -> Block {
        Block {
            features: device_features(&disk),
            config: config_space(&disk, QUEUE_SIZE),
            disk,
            counters: Counters::default(),
            warned_io: AtomicBool::new(false),
        }
    }

    /// The disk image behind the device.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// The device's counters: requests, bytes read, bytes written, errors.
    pub fn stats(&self) -> BlockStats {
        let c = &self.counters;
        BlockStats {
            requests: c.requests.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_written: c.bytes_written.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
        }
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
            if !self.warned_io.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "virtio-blk: I/O on disk image {} failed: {kind}",
                    self.disk.path().display()
                );
            }
        }
    }
}

impl VirtioDevice for Block {
    const NAME: &'static str = "virtio-blk";
    const DEVICE_ID: u32 = VIRTIO_ID_BLOCK;

    fn features(&self) -> u64 {
        self.features
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    /// Serves the request queue: each chain is executed, its status byte written, and
    /// the chain returned.
    fn run(&self, worker: &mut Worker<'_, Self>) {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let events = worker.wait(None);
            if events.stop {
                return;
            }
            if !events.kicked(0) {
                continue;
            }
            worker.drain(0, u32::MAX, |w, chain| {
                let head = chain.head_index();
                let done = {
                    let live = || w.live(0);
                    execute(&self.disk, w.mem(), chain, &mut buf, &live)
                };
                self.count(&done);
                w.complete(0, head, |mem| {
                    if let Some(at) = done.status_at {
                        // Checked to be in guest memory when the chain was parsed.
                        mem.write_obj(done.status, at).map_err(|e| e.to_string())?;
                    }
                    Ok(done.used_len)
                })
            });
        }
    }
}

impl VirtioMmio<Block> {
    /// The device's counters: requests, bytes read, bytes written, errors.
    pub fn stats(&self) -> BlockStats {
        self.device().stats()
    }

    /// The disk image behind the device.
    pub fn disk(&self) -> &DiskImage {
        self.device().disk()
    }
}

/// The largest number of data segments in one request the device announces (`seg_max`):
/// a request must fit in the queue with its header and status descriptors.
pub(crate) fn seg_max(queue_size: u16) -> u32 {
    u32::from(queue_size).saturating_sub(2).max(1)
}

/// The feature bits the device offers for `disk`.
pub(crate) fn device_features(disk: &DiskImage) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE);
    if disk.read_only {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    }
    features
}

/// The length of the configuration space (`struct virtio_blk_config`).
pub(crate) const CONFIG_LEN: usize = std::mem::size_of::<virtio_blk_config>();

/// The configuration space of the device (little-endian `struct virtio_blk_config`):
/// the capacity in 512-byte sectors, `seg_max` and the block size; the rest is 0.
pub(crate) fn config_space(disk: &DiskImage, queue_size: u16) -> [u8; CONFIG_LEN] {
    fn put(config: &mut [u8; CONFIG_LEN], at: usize, bytes: &[u8]) {
        if let Some(dst) = config.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
    let mut config = [0u8; CONFIG_LEN];
    put(
        &mut config,
        std::mem::offset_of!(virtio_blk_config, capacity),
        &(disk.size / SECTOR_SIZE).to_le_bytes(),
    );
    put(
        &mut config,
        std::mem::offset_of!(virtio_blk_config, seg_max),
        &seg_max(queue_size).to_le_bytes(),
    );
    put(
        &mut config,
        std::mem::offset_of!(virtio_blk_config, blk_size),
        &(SECTOR_SIZE as u32).to_le_bytes(),
    );
    config
}

/// How one request ended: what the worker writes back to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Completion {
    /// Where the status byte goes: `None` if the chain has no writable last byte.
    pub status_at: Option<GuestAddress>,
    /// The status (`VIRTIO_BLK_S_*`).
    pub status: u8,
    /// The used length reported to the driver: the bytes the device wrote into the chain
    /// (0 without a status byte).
    pub used_len: u32,
    /// Bytes read from the image into guest memory.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image.
    pub bytes_written: u64,
    /// The image could not be read or written (a host error, not the guest's).
    pub host_error: Option<io::ErrorKind>,
}

impl Completion {
    /// Whether the request failed (error status or no status at all).
    pub fn failed(&self) -> bool {
        self.status_at.is_none() || self.status != VIRTIO_BLK_S_OK as u8
    }
}

/// The outcome of a request before it is tied to its status byte.
struct Outcome {
    status: u32,
    /// Bytes written into the chain before the status byte.
    wrote: u64,
    bytes_read: u64,
    bytes_written: u64,
    host_error: Option<io::ErrorKind>,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Outcome {
            status,
            wrote: 0,
            bytes_read: 0,
            bytes_written: 0,
            host_error: None,
        }
    }

    fn ioerr() -> Self {
        Outcome::status(VIRTIO_BLK_S_IOERR)
    }

    fn host(e: &io::Error) -> Self {
        Outcome {
            host_error: Some(e.kind()),
            ..Outcome::ioerr()
        }
    }
}

/// Executes the request in the descriptors `chain` against `disk`, moving data through
/// `buf` (at least one byte; [`CHUNK`] bytes is a good size). `live()` is asked before each
/// piece of data moves into guest memory: once it answers false (the driver reset the
/// device meanwhile), the request is abandoned with an error.
///
/// Does not write the status byte: the caller does, from the returned [`Completion`].
pub(crate) fn execute(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: impl Iterator<Item = Descriptor>,
    buf: &mut [u8],
    live: &dyn Fn() -> bool,
) -> Completion {
    let mut readable = Stream::default();
    let mut writable = Stream::default();
    let mut malformed = false;
    let mut seen_writable = false;
    let mut last: Option<Descriptor> = None;
    for desc in chain {
        let len = desc.len();
        let in_memory = usize::try_from(len)
            .is_ok_and(|l| GuestMemoryBackend::check_range(mem, desc.addr(), l));
        if !in_memory {
            malformed = true;
        }
        if desc.is_write_only() {
            seen_writable = true;
            writable.push(desc.addr(), len);
        } else if seen_writable {
            // A readable descriptor after a writable one.
            malformed = true;
        } else {
            readable.push(desc.addr(), len);
        }
        last = Some(desc);
    }

    // The status is the last byte of the chain, in a writable descriptor inside guest memory.
    let status_at = last
        .filter(|d| d.is_write_only() && d.len() > 0)
        .filter(|d| GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize))
        .and_then(|d| d.addr().checked_add(u64::from(d.len()) - 1));
    let Some(status_at) = status_at else {
        return Completion {
            status_at: None,
            status: VIRTIO_BLK_S_IOERR as u8,
            used_len: 0,
            bytes_read: 0,
            bytes_written: 0,
            host_error: None,
        };
    };

    let outcome = if malformed {
        Outcome::ioerr()
    } else {
        request(disk, mem, &readable, &writable, buf, live)
    };
    // The used length counts the data written into the chain and the status byte; the
    // chain is at most 4 GiB long (virtio-queue ends it there).
    let used_len = u32::try_from(outcome.wrote.saturating_add(1)).unwrap_or(u32::MAX);
    Completion {
        status_at: Some(status_at),
        status: outcome.status as u8,
        used_len,
        bytes_read: outcome.bytes_read,
        bytes_written: outcome.bytes_written,
        host_error: outcome.host_error,
    }
}

/// Executes a well-formed chain: `readable` then `writable`, whose last byte is the status.
fn request(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    readable: &Stream,
    writable: &Stream,
    buf: &mut [u8],
    live: &dyn Fn() -> bool,
) -> Outcome {
    let mut header = [0u8; HEADER_LEN as usize];
    if readable.len < HEADER_LEN || !readable.read(mem, 0, &mut header) {
        return Outcome::ioerr();
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    // The data the device may write: everything writable but the status byte.
    let writable_data = writable.len.saturating_sub(1);
    let readable_data = readable.len - HEADER_LEN;

    match kind {
        VIRTIO_BLK_T_IN => {
            if readable_data != 0 {
                return Outcome::ioerr();
            }
            read_image(disk, mem, writable, sector, writable_data, buf, live)
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 || disk.read_only {
                return Outcome::ioerr();
            }
            write_image(disk, mem, readable, sector, readable_data, buf, live)
        }
        VIRTIO_BLK_T_FLUSH => match disk.file.sync_data() {
            Ok(()) => Outcome::status(VIRTIO_BLK_S_OK),
            Err(e) => Outcome::host(&e),
        },
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = DISK_ID.len().min(id.len());
            id[..n].copy_from_slice(&DISK_ID[..n]);
            let len = usize::try_from(writable_data).map_or(id.len(), |w| w.min(id.len()));
            if !writable.write(mem, 0, &id[..len]) {
                return Outcome::ioerr();
            }
            Outcome {
                wrote: len as u64,
                ..Outcome::status(VIRTIO_BLK_S_OK)
            }
        }
        _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
    }
}

/// Whether a data transfer of `len` bytes at `sector` is acceptable.
fn transfer_ok(disk: &DiskImage, sector: u64, len: u64) -> bool {
    len.is_multiple_of(SECTOR_SIZE) && disk.contains(sector, len)
}

/// `T_IN`: `len` bytes of the image from `sector` into the stream `dst`.
fn read_image(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    dst: &Stream,
    sector: u64,
    len: u64,
    buf: &mut [u8],
    live: &dyn Fn() -> bool,
) -> Outcome {
    if !transfer_ok(disk, sector, len) || buf.is_empty() {
        return Outcome::ioerr();
    }
    let start = sector * SECTOR_SIZE;
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(buf.len(), |r| r.min(buf.len()));
        let piece = &mut buf[..n];
        if let Err(e) = disk.file.read_exact_at(piece, start + done) {
            return Outcome::host(&e);
        }
        if !live() || !dst.write(mem, done, piece) {
            return Outcome::ioerr();
        }
        done += n as u64;
    }
    Outcome {
        wrote: len,
        bytes_read: len,
        ..Outcome::status(VIRTIO_BLK_S_OK)
    }
}

/// `T_OUT`: `len` bytes of the stream `src` after the header into the image at `sector`.
fn write_image(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    src: &Stream,
    sector: u64,
    len: u64,
    buf: &mut [u8],
    live: &dyn Fn() -> bool,
) -> Outcome {
    if !transfer_ok(disk, sector, len) || buf.is_empty() {
        return Outcome::ioerr();
    }
    let start = sector * SECTOR_SIZE;
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).map_or(buf.len(), |r| r.min(buf.len()));
        let piece = &mut buf[..n];
        if !live() || !src.read(mem, HEADER_LEN + done, piece) {
            return Outcome {
                bytes_written: done,
                ..Outcome::ioerr()
            };
        }
        if let Err(e) = disk.file.write_all_at(piece, start + done) {
            return Outcome {
                bytes_written: done,
                ..Outcome::host(&e)
            };
        }
        done += n as u64;
    }
    Outcome {
        bytes_written: len,
        ..Outcome::status(VIRTIO_BLK_S_OK)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A temporary file, removed on drop.
    pub(crate) struct TempFile {
        pub path: PathBuf,
    }

    impl TempFile {
        /// A new file with `content` (a unique name: pid and a counter).
        pub fn new(content: &[u8]) -> TempFile {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "dvmm-virtio-blk-{}-{}.img",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, content).unwrap();
            TempFile { path }
        }

        /// The file's bytes now.
        pub fn content(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// `len` bytes of a recognisable pattern (no two sectors alike).
    pub(crate) fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8) ^ ((i / 512) as u8).wrapping_mul(31))
            .collect()
    }

    #[test]
    fn open_reports_size_and_mode() {
        let f = TempFile::new(&pattern(4096));
        let disk = DiskImage::open(&f.path, false).unwrap();
        assert_eq!(disk.size(), 4096);
        assert!(!disk.read_only());
        assert_eq!(disk.path(), f.path.as_path());
        let disk = DiskImage::open(&f.path, true).unwrap();
        assert!(disk.read_only());
    }

    #[test]
    fn open_refuses_missing_file() {
        let path = std::env::temp_dir().join(format!("dvmm-virtio-missing-{}", std::process::id()));
        let e = DiskImage::open(&path, true).unwrap_err();
        assert!(matches!(e, DiskError::Open { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn open_refuses_directory() {
        let e = DiskImage::open(&std::env::temp_dir(), true).unwrap_err();
        assert!(matches!(e, DiskError::Directory { .. }), "{e}");
    }

    #[test]
    fn open_refuses_empty_and_odd_sizes() {
        let empty = TempFile::new(&[]);
        let e = DiskImage::open(&empty.path, true).unwrap_err();
        assert!(matches!(e, DiskError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("empty"), "{e}");

        let odd = TempFile::new(&[0u8; 1000]);
        let e = DiskImage::open(&odd.path, false).unwrap_err();
        assert!(matches!(e, DiskError::Size { size: 1000, .. }), "{e}");
        assert!(e.to_string().contains("512"), "{e}");
    }

    #[test]
    fn open_refuses_writing_a_read_only_file() {
        use std::os::unix::fs::PermissionsExt;
        let f = TempFile::new(&[0u8; 1024]);
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = DiskImage::open(&f.path, false).unwrap_err();
        assert!(matches!(e, DiskError::NotWritable { .. }), "{e}");
        assert!(e.to_string().contains("use the read-only option"), "{e}");
        // Read-only, it is fine.
        assert!(DiskImage::open(&f.path, true).unwrap().read_only());
    }

    #[test]
    fn config_space_layout() {
        let f = TempFile::new(&[0u8; 8192]);
        let disk = DiskImage::open(&f.path, false).unwrap();
        let config = config_space(&disk, 256);
        assert_eq!(&config[0..8], &16u64.to_le_bytes());
        assert_eq!(&config[12..16], &254u32.to_le_bytes());
        assert_eq!(&config[20..24], &512u32.to_le_bytes());
        assert_eq!(device_features(&disk) & (1 << VIRTIO_BLK_F_RO), 0);
        let ro = DiskImage::open(&f.path, true).unwrap();
        assert_ne!(device_features(&ro) & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(device_features(&ro) & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
