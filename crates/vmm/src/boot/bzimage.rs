//! A bzImage unpacked by the VMM: its setup header, the compressed kernel inside it, and
//! that kernel decompressed into the ELF vmlinux it was made from.
//!
//! A bzImage (Documentation/arch/x86/boot.rst in the kernel) is the real-mode setup code
//! with its header, then the protected-mode part: the kernel's own decompressor and,
//! inside it, the compressed payload. From boot protocol 2.08 the header says where the
//! payload is (`payload_offset`, from the start of the protected-mode part, and
//! `payload_length`). The payload is `vmlinux.bin` (the vmlinux ELF with its symbols
//! stripped, plus relocation records on a relocatable kernel) compressed as the kernel's
//! configuration chose, followed by its uncompressed size as 4 little-endian bytes (for
//! gzip, the ISIZE field of the gzip trailer is that very size).
//!
//! Unpacking here takes a fraction of a second; the kernel's decompressor takes minutes
//! on a host whose KVM runs guest kernel code through an instruction emulator
//! (docs/COMPAT.md). Who unpacks is chosen in one place, [`Unpacker::choose`].

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

use crate::compat::HostKind;

/// Largest kernel the VMM unpacks (the ELF vmlinux inside a bzImage). A distribution
/// kernel unpacks to about 60 MiB.
pub const UNPACK_LIMIT: u64 = 512 << 20;

/// Where the setup header starts in the file.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The `HdrS` magic at 0x202.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot sector's 0xaa55 at 0x1fe.
const BOOT_FLAG: u16 = 0xaa55;
/// The first boot protocol that gives the payload's place (`payload_offset/length`).
const MIN_PROTOCOL: u16 = 0x0208;
/// Legacy lz4 framing (`lz4 -l`, what the kernel build uses).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Uncompressed size of a legacy lz4 block (at most).
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// How a bzImage payload is compressed (CONFIG_KERNEL_*), told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// gzip (1f 8b).
    Gzip,
    /// bzip2 (`BZh`).
    Bzip2,
    /// The legacy .lzma format (5d 00 00: lc=3 lp=0 pb=2 and a dictionary size).
    Lzma,
    /// xz (fd `7zXZ` 00), with the x86 BCJ filter as the kernel build makes it.
    Xz,
    /// lzop (89 `LZO` 00 0d 0a 1a 0a): recognised, not unpacked by the VMM.
    Lzo,
    /// lz4 in its legacy framing (02 21 4c 18).
    Lz4,
    /// zstd (28 b5 2f fd).
    Zstd,
}

impl Compression {
    /// The format of `payload`, from its magic bytes.
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: [(&[u8], Compression); 7] = [
            (&[0x1f, 0x8b], Compression::Gzip),
            (b"BZh", Compression::Bzip2),
            (&[0x5d, 0x00, 0x00], Compression::Lzma),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Compression::Xz),
            (
                &[0x89, b'L', b'Z', b'O', 0x00, 0x0d, 0x0a, 0x1a, 0x0a],
                Compression::Lzo,
            ),
            (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4),
            (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|(_, c)| *c)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Xz => "xz",
            Compression::Lzo => "lzo",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        })
    }
}

/// Why a bzImage cannot be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// No boot sector flag or no `HdrS` magic: not a bzImage at all.
    #[error("not a bzImage (no 0xaa55 boot flag at 0x1fe and 'HdrS' magic at 0x202)")]
    NotBzImage,
    /// The boot protocol predates `payload_offset` (2.08).
    #[error(
        "boot protocol {}.{:02} is older than 2.08, which is needed to find the compressed kernel",
        .0 >> 8,
        .0 & 0xff
    )]
    OldProtocol(u16),
    /// The file ends before something the header points to.
    #[error("truncated bzImage: {what} needs {need} bytes, the file has {len}")]
    Truncated {
        /// What is cut off.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// File size.
        len: u64,
    },
    /// The payload starts with no known magic.
    #[error("unknown compression of the kernel payload (it starts with {0:02x?})")]
    UnknownCompression(Vec<u8>),
    /// A known format the VMM does not unpack.
    #[error("the kernel payload is {0}-compressed, which the VMM does not unpack")]
    Unsupported(Compression),
    /// The decoder failed: a corrupt or cut-off stream.
    #[error("corrupt {format} stream in the kernel payload: {source}")]
    Corrupt {
        /// Format.
        format: Compression,
        /// The decoder's error.
        source: std::io::Error,
    },
    /// The payload unpacks beyond the limit.
    #[error("the kernel payload unpacks to more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// The unpacked size differs from the size recorded after the stream.
    #[error("the {format} payload unpacked to {got} bytes, but the image records {expected}")]
    SizeMismatch {
        /// Format.
        format: Compression,
        /// Size recorded in the payload's last 4 bytes.
        expected: u32,
        /// Size unpacked.
        got: u64,
    },
    /// What came out is not an ELF file.
    #[error("the unpacked kernel is not an ELF vmlinux (it starts with {0:02x?})")]
    NotElf([u8; 4]),
    /// An ELF file, but not a 64-bit little-endian x86-64 one.
    #[error("the unpacked kernel is an ELF file for machine {machine} (class {class}, data {data}), not x86-64")]
    NotX86_64 {
        /// EI_CLASS (2: 64-bit).
        class: u8,
        /// EI_DATA (1: little-endian).
        data: u8,
        /// e_machine (62: x86-64).
        machine: u16,
    },
}

impl BzImageError {
    /// The image may well be a good bzImage, but not one this module unpacks (too old a
    /// boot protocol, a format it does not know): the kernel's own decompressor can
    /// still boot it. Every other error means a broken file.
    pub fn guest_may_unpack(&self) -> bool {
        matches!(
            self,
            BzImageError::OldProtocol(_)
                | BzImageError::UnknownCompression(_)
                | BzImageError::Unsupported(_)
        )
    }
}

/// A parsed bzImage: its setup header and its compressed payload.
#[derive(Debug, Clone, Copy)]
pub struct BzImage<'a> {
    /// The setup header as the file has it (what a boot loader copies into the zero
    /// page).
    pub header: setup_header,
    /// The payload, with its trailing 4-byte size.
    pub payload: &'a [u8],
}

impl<'a> BzImage<'a> {
    /// Whether `image` has a bzImage setup header (boot flag and `HdrS`).
    pub fn is_bzimage(image: &[u8]) -> bool {
        let le16 = |o: usize| {
            image
                .get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let le32 = |o: usize| {
            image
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        le16(0x1fe) == Some(BOOT_FLAG) && le32(0x202) == Some(HDRS_MAGIC)
    }

    /// Reads the setup header and finds the payload.
    pub fn parse(image: &'a [u8]) -> Result<Self, BzImageError> {
        if !Self::is_bzimage(image) {
            return Err(BzImageError::NotBzImage);
        }
        let len = image.len() as u64;
        let mut header = setup_header::default();
        let hdr_end = SETUP_HEADER_OFFSET + header.as_slice().len();
        let bytes = image
            .get(SETUP_HEADER_OFFSET..hdr_end)
            .ok_or(BzImageError::Truncated {
                what: "the setup header",
                need: hdr_end as u64,
                len,
            })?;
        header.as_mut_slice().copy_from_slice(bytes);
        if header.version < MIN_PROTOCOL {
            return Err(BzImageError::OldProtocol(header.version));
        }
        // setup_sects == 0 means 4 (boot.rst); the boot sector itself adds one.
        let setup_sects = match header.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let pm_start = (setup_sects + 1) * 512;
        let start = pm_start + u64::from(header.payload_offset);
        let end = start + u64::from(header.payload_length);
        if end > len {
            return Err(BzImageError::Truncated {
                what: "the compressed kernel (setup_sects, payload_offset, payload_length)",
                need: end,
                len,
            });
        }
        // The ISIZE of a gzip trailer or the size the kernel build appends: 4 bytes.
        if header.payload_length < 4 {
            return Err(BzImageError::Truncated {
                what: "the compressed kernel (payload_length)",
                need: 4,
                len: u64::from(header.payload_length),
            });
        }
        Ok(BzImage {
            header,
            payload: &image[start as usize..end as usize],
        })
    }

    /// The payload's format.
    pub fn compression(&self) -> Result<Compression, BzImageError> {
        Compression::detect(self.payload).ok_or_else(|| {
            BzImageError::UnknownCompression(self.payload[..self.payload.len().min(8)].to_vec())
        })
    }

    /// The uncompressed size the payload records in its last 4 bytes.
    pub fn unpacked_size(&self) -> u32 {
        let n = self.payload.len();
        let t = &self.payload[n - 4..];
        u32::from_le_bytes([t[0], t[1], t[2], t[3]])
    }

    /// Decompresses the payload into the ELF vmlinux, refusing more than `limit` bytes.
    pub fn unpack(&self, limit: u64) -> Result<Vec<u8>, BzImageError> {
        let format = self.compression()?;
        let expected = self.unpacked_size();
        // gzip's own trailer ends in the size; the other formats have it appended after
        // the stream, where their decoders must not see it.
        let stream = match format {
            Compression::Gzip => self.payload,
            _ => &self.payload[..self.payload.len() - 4],
        };
        let out = decompress(format, stream, limit, expected)?;
        if out.len() as u64 != u64::from(expected) {
            return Err(BzImageError::SizeMismatch {
                format,
                expected,
                got: out.len() as u64,
            });
        }
        if out.get(..4) != Some(b"\x7fELF") {
            let mut m = [0u8; 4];
            let n = out.len().min(4);
            m[..n].copy_from_slice(&out[..n]);
            return Err(BzImageError::NotElf(m));
        }
        let (class, data) = (out[4], out.get(5).copied().unwrap_or(0));
        let machine = out
            .get(18..20)
            .map_or(0, |m| u16::from_le_bytes([m[0], m[1]]));
        if (class, data, machine) != (2, 1, 62) {
            return Err(BzImageError::NotX86_64 {
                class,
                data,
                machine,
            });
        }
        Ok(out)
    }
}

/// Decompresses one `format` stream (without the kernel build's appended size),
/// refusing more than `limit` bytes. `size_hint` is the expected size (preallocated up
/// to the limit).
pub fn decompress(
    format: Compression,
    stream: &[u8],
    limit: u64,
    size_hint: u32,
) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |source| BzImageError::Corrupt { format, source };
    // The LZMA decoders allocate the dictionary the stream header asks for: no more
    // than the output may fill, plus room for the probability tables.
    let mem_limit_kb = u32::try_from((limit >> 10) + (16 << 10)).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(u64::from(size_hint).min(limit) as usize);
    let read = |r: &mut dyn Read, out: &mut Vec<u8>| {
        r.take(limit.saturating_add(1))
            .read_to_end(out)
            .map_err(corrupt)
    };
    match format {
        Compression::Gzip => read(&mut flate2::read::GzDecoder::new(stream), &mut out)?,
        Compression::Bzip2 => read(&mut bzip2::read::BzDecoder::new(stream), &mut out)?,
        Compression::Lzma => {
            let mut r = lzma_rust2::LzmaReader::new_mem_limit(stream, mem_limit_kb, None)
                .map_err(corrupt)?;
            read(&mut r, &mut out)?
        }
        Compression::Xz => read(
            &mut lzma_rust2::XzReader::new_mem_limit(stream, false, mem_limit_kb),
            &mut out,
        )?,
        Compression::Zstd => zstd(stream, limit, &mut out).map_err(corrupt)?,
        Compression::Lz4 => lz4_legacy(stream, limit, &mut out).map_err(corrupt)?,
        Compression::Lzo => return Err(BzImageError::Unsupported(format)),
    };
    if out.len() as u64 > limit {
        return Err(BzImageError::TooLarge { limit });
    }
    Ok(out)
}

/// One zstd frame, its content checksum verified when it has one.
fn zstd(stream: &[u8], limit: u64, out: &mut Vec<u8>) -> std::io::Result<usize> {
    // The kernel build uses `zstd -22 --ultra`: a window of up to 2^27 bytes, which is
    // the decoder's default maximum.
    let dec = ruzstd::decoding::FrameDecoder::new();
    let mut r = ruzstd::decoding::StreamingDecoder::new_with_decoder(stream, dec)
        .map_err(std::io::Error::other)?;
    let n = (&mut r).take(limit.saturating_add(1)).read_to_end(out)?;
    if n as u64 > limit {
        return Ok(n);
    }
    let dec = r.into_frame_decoder();
    match (dec.get_checksum_from_data(), dec.get_calculated_checksum()) {
        (Some(want), Some(got)) if want != got => Err(std::io::Error::other(format!(
            "content checksum {got:08x}, the frame says {want:08x}"
        ))),
        _ => Ok(n),
    }
}

/// The legacy lz4 framing (`lz4 -l`): the magic, then blocks of a 4-byte compressed
/// size and at most 8 MiB once decompressed; another magic may start a new stream.
fn lz4_legacy(stream: &[u8], limit: u64, out: &mut Vec<u8>) -> std::io::Result<usize> {
    let bad = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);
    let mut rest = stream
        .strip_prefix(&LZ4_LEGACY_MAGIC.to_le_bytes())
        .ok_or_else(|| bad("no legacy lz4 magic".into()))?;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while !rest.is_empty() {
        let Some((size, tail)) = rest.split_first_chunk::<4>() else {
            return Err(bad(format!("{} stray bytes at the end", rest.len())));
        };
        let size = u32::from_le_bytes(*size);
        rest = tail;
        if size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let data = rest.get(..size as usize).ok_or_else(|| {
            bad(format!(
                "a block of {size} bytes, but only {} remain",
                rest.len()
            ))
        })?;
        let n =
            lz4_flex::block::decompress_into(data, &mut block).map_err(|e| bad(e.to_string()))?;
        out.extend_from_slice(&block[..n]);
        if out.len() as u64 > limit {
            break;
        }
        rest = &rest[size as usize..];
    }
    Ok(out.len())
}

/// When a bzImage's kernel is unpacked by the VMM (`--unpack-bzimage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum UnpackBzImage {
    /// As suits the host ([`Unpacker::choose`]).
    #[default]
    Auto,
    /// Always by the VMM (an error if it cannot).
    Always,
    /// Never: the kernel's own decompressor runs in the guest.
    Never,
}

impl UnpackBzImage {
    /// The names the option takes.
    pub const NAMES: [&'static str; 3] = ["auto", "always", "never"];
}

impl FromStr for UnpackBzImage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(UnpackBzImage::Auto),
            "always" => Ok(UnpackBzImage::Always),
            "never" => Ok(UnpackBzImage::Never),
            _ => Err(format!("'{s}': expected auto, always or never")),
        }
    }
}

impl fmt::Display for UnpackBzImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnpackBzImage::Auto => "auto",
            UnpackBzImage::Always => "always",
            UnpackBzImage::Never => "never",
        })
    }
}

/// Who unpacks a bzImage's compressed kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpacker {
    /// The VMM, which then boots the ELF inside at its 64-bit entry. `strict`: fail if
    /// it cannot; otherwise an image it cannot unpack (see
    /// [`BzImageError::guest_may_unpack`]) goes to the guest's decompressor.
    Vmm {
        /// No fallback to the guest's decompressor.
        strict: bool,
    },
    /// The kernel's own decompressor, entered at the bzImage's 64-bit entry.
    Guest,
}

impl Unpacker {
    /// The one place that decides who unpacks a bzImage.
    ///
    /// On a software-KVM host the guest kernel's code runs in KVM's instruction
    /// emulator (docs/COMPAT.md), where the kernel's decompressor takes minutes; the
    /// VMM's decoders take a fraction of a second, so the VMM unpacks. On a hardware
    /// host the decompressor runs at full speed and is the boot path every boot loader
    /// uses (it also applies KASLR and relocations when the kernel asks for them), so
    /// it is kept. `--unpack-bzimage always|never` overrides either choice.
    pub fn choose(option: UnpackBzImage, host: HostKind) -> Self {
        match (option, host) {
            (UnpackBzImage::Always, _) => Unpacker::Vmm { strict: true },
            (UnpackBzImage::Never, _) => Unpacker::Guest,
            (UnpackBzImage::Auto, HostKind::Software) => Unpacker::Vmm { strict: false },
            (UnpackBzImage::Auto, HostKind::Hardware) => Unpacker::Guest,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// A small x86-64 ELF executable with two PT_LOAD segments, entry 0x1000000 (like a
    /// vmlinux), padded to `len` bytes (at least 0x1100).
    pub(crate) fn tiny_elf(len: usize) -> Vec<u8> {
        assert!(len >= 0x1100);
        let mut e = vec![0u8; len];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little-endian
        e[6] = 1; // version
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes()); // e_entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        for (i, (off, paddr, filesz, memsz)) in [
            (0x1000u64, 0x100_0000u64, 0x80u64, 0x80u64),
            (0x1080, 0x120_0000, 0x80, 0x2000),
        ]
        .into_iter()
        .enumerate()
        {
            let p = 64 + 56 * i;
            e[p..p + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            e[p + 4..p + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
            e[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
            e[p + 16..p + 24].copy_from_slice(&(paddr | 0xffff_ffff_8000_0000).to_le_bytes());
            e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
            e[p + 32..p + 40].copy_from_slice(&filesz.to_le_bytes());
            e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        // Recognisable segment contents, and some compressible filler after them.
        for (i, b) in e[0x1000..0x1100].iter_mut().enumerate() {
            *b = i as u8;
        }
        for (i, b) in e[0x1100..].iter_mut().enumerate() {
            *b = (i % 251) as u8 ^ 0x5a;
        }
        e
    }

    /// `data` compressed as the kernel build compresses a payload.
    pub(crate) fn compress(format: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = match format {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                // gzip carries its size in its own trailer: nothing is appended.
                return e.finish().unwrap();
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Lzma => {
                // Unknown size and an end marker, as `lzma -9` writes from a pipe.
                let opts = lzma_rust2::LzmaOptions::with_preset(1);
                let mut e =
                    lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, None).unwrap();
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                // CRC32 and the x86 BCJ filter, as scripts/xz_wrap.sh asks.
                let mut opts = lzma_rust2::XzOptions::with_preset(1);
                opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
                let mut e = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => {
                ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
            }
            Compression::Lz4 => {
                let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
                for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
                    let c = lz4_flex::block::compress(chunk);
                    out.extend_from_slice(&(c.len() as u32).to_le_bytes());
                    out.extend_from_slice(&c);
                }
                out
            }
            Compression::Lzo => panic!("no lzo encoder"),
        };
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    /// A bzImage: boot sector + `setup_sects` sectors with a protocol-2.15 header, then
    /// a fake decompressor of `pad` bytes and `payload` after it.
    pub(crate) fn bzimage(payload: &[u8], setup_sects: u8, pad: usize) -> Vec<u8> {
        let sects = if setup_sects == 0 { 4 } else { setup_sects };
        let pm_start = (usize::from(sects) + 1) * 512;
        let mut img = vec![0u8; pm_start + pad + payload.len() + 100];
        let mut h = setup_header {
            setup_sects,
            boot_flag: BOOT_FLAG,
            jump: 0x66eb,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: 1,
            code32_start: 0x10_0000,
            kernel_alignment: 0x20_0000,
            relocatable_kernel: 0,
            cmdline_size: 2047,
            payload_offset: pad as u32,
            payload_length: payload.len() as u32,
            init_size: 0x100_0000,
            ..Default::default()
        };
        h.syssize = ((img.len() - pm_start) / 16) as u32;
        img[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + h.as_slice().len()]
            .copy_from_slice(h.as_slice());
        img[pm_start + pad..pm_start + pad + payload.len()].copy_from_slice(payload);
        img
    }

    const UNPACKED: [Compression; 6] = [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lz4,
        Compression::Zstd,
    ];

    #[test]
    fn every_format_unpacks_to_the_elf() {
        let elf = tiny_elf(64 << 10);
        for format in UNPACKED {
            let payload = compress(format, &elf);
            assert_eq!(Compression::detect(&payload), Some(format));
            let img = bzimage(&payload, 4, 0x3210);
            let bz = BzImage::parse(&img).unwrap();
            assert_eq!(bz.payload, &payload[..], "{format}");
            assert_eq!(bz.compression().unwrap(), format);
            assert_eq!(bz.unpacked_size() as usize, elf.len(), "{format}");
            assert_eq!(bz.unpack(UNPACK_LIMIT).unwrap(), elf, "{format}");
        }
    }

    #[test]
    fn lz4_streams_of_several_blocks_and_concatenated_streams() {
        let data: Vec<u8> = (0..(LZ4_LEGACY_BLOCK + 12345))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let mut two = compress(Compression::Lz4, &data[..1000]);
        two.truncate(two.len() - 4);
        two.extend_from_slice(&compress(Compression::Lz4, &data[1000..]));
        two.truncate(two.len() - 4);
        assert_eq!(
            decompress(Compression::Lz4, &two, UNPACK_LIMIT, 0).unwrap(),
            data
        );
    }

    #[test]
    fn header_checks() {
        let payload = compress(Compression::Gzip, &tiny_elf(0x1100));
        let good = bzimage(&payload, 0, 0x100);
        // setup_sects 0 means 4.
        assert_eq!(BzImage::parse(&good).unwrap().payload, &payload[..]);

        let mut no_magic = good.clone();
        no_magic[0x202] = b'X';
        assert!(matches!(
            BzImage::parse(&no_magic),
            Err(BzImageError::NotBzImage)
        ));
        assert!(!BzImage::is_bzimage(&no_magic));
        let mut no_flag = good.clone();
        no_flag[0x1fe] = 0;
        assert!(matches!(
            BzImage::parse(&no_flag),
            Err(BzImageError::NotBzImage)
        ));
        assert!(matches!(
            BzImage::parse(&good[..0x100]),
            Err(BzImageError::NotBzImage)
        ));
        assert!(matches!(
            BzImage::parse(b"\x7fELF not a bzImage"),
            Err(BzImageError::NotBzImage)
        ));

        let mut old = good.clone();
        old[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
        let e = BzImage::parse(&old).unwrap_err();
        assert!(matches!(e, BzImageError::OldProtocol(0x0207)));
        assert!(e.to_string().contains("2.07"), "{e}");
        assert!(e.guest_may_unpack());
    }

    #[test]
    fn truncated_images_are_refused() {
        let payload = compress(Compression::Xz, &tiny_elf(0x4000));
        let img = bzimage(&payload, 4, 0x200);
        let end = 5 * 512 + 0x200 + payload.len();
        // The header itself cut off.
        let e = BzImage::parse(&img[..0x210]).unwrap_err();
        assert!(matches!(e, BzImageError::Truncated { .. }), "{e}");
        // The payload cut off.
        let e = BzImage::parse(&img[..end - 1]).unwrap_err();
        assert!(
            matches!(e, BzImageError::Truncated { need, .. } if need == end as u64),
            "{e}"
        );
        assert!(e.to_string().contains("truncated bzImage"), "{e}");
        assert!(!e.guest_may_unpack());
        // A payload_length that runs past the file.
        let mut long = img.clone();
        long[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 200).to_le_bytes());
        assert!(matches!(
            BzImage::parse(&long),
            Err(BzImageError::Truncated { .. })
        ));
        assert!(BzImage::parse(&img[..end]).is_ok());
    }

    #[test]
    fn cut_or_corrupt_streams_are_refused() {
        let elf = tiny_elf(32 << 10);
        for format in UNPACKED {
            let payload = compress(format, &elf);
            // The stream cut short (the image's size trailer kept at the end).
            let mut cut = payload[..payload.len() / 2].to_vec();
            cut.extend_from_slice(&payload[payload.len() - 4..]);
            let e = BzImage::parse(&bzimage(&cut, 4, 0))
                .unwrap()
                .unpack(UNPACK_LIMIT)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    BzImageError::Corrupt { .. } | BzImageError::SizeMismatch { .. }
                ),
                "{format}: {e}"
            );
            // Bytes flipped in the middle.
            let mut bad = payload.clone();
            let mid = bad.len() / 2;
            for b in &mut bad[mid..mid + 8] {
                *b ^= 0xa5;
            }
            let r = BzImage::parse(&bzimage(&bad, 4, 0))
                .unwrap()
                .unpack(UNPACK_LIMIT);
            // gzip, bzip2 and xz (CRC32 as the kernel build asks) carry checksums; lzma
            // and legacy lz4 have none, and a flipped literal may go unnoticed there.
            if matches!(
                format,
                Compression::Gzip | Compression::Bzip2 | Compression::Xz
            ) {
                assert!(r.is_err(), "{format}: corruption not noticed");
            } else if let Ok(out) = r {
                assert_eq!(out.len(), elf.len(), "{format}");
            }
            // A wrong size record.
            let mut wrong = payload.clone();
            let n = wrong.len();
            wrong[n - 4..].copy_from_slice(&(elf.len() as u32 + 1).to_le_bytes());
            let e = BzImage::parse(&bzimage(&wrong, 4, 0))
                .unwrap()
                .unpack(UNPACK_LIMIT)
                .unwrap_err();
            // gzip checks its own ISIZE; the others are caught by the size comparison.
            assert!(
                matches!(
                    e,
                    BzImageError::Corrupt { .. } | BzImageError::SizeMismatch { .. }
                ),
                "{format}: {e}"
            );
        }
    }

    #[test]
    fn unknown_and_unsupported_formats() {
        let img = bzimage(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08", 4, 0);
        let e = BzImage::parse(&img)
            .unwrap()
            .unpack(UNPACK_LIMIT)
            .unwrap_err();
        assert!(matches!(e, BzImageError::UnknownCompression(_)), "{e}");
        assert!(e.to_string().contains("00, 01, 02"), "{e}");
        assert!(e.guest_may_unpack());
        let lzo = bzimage(b"\x89LZO\x00\x0d\x0a\x1a\x0a\x10\x30 rest", 4, 0);
        let bz = BzImage::parse(&lzo).unwrap();
        assert_eq!(bz.compression().unwrap(), Compression::Lzo);
        let e = bz.unpack(UNPACK_LIMIT).unwrap_err();
        assert!(
            matches!(e, BzImageError::Unsupported(Compression::Lzo)),
            "{e}"
        );
        assert!(e.guest_may_unpack());
    }

    #[test]
    fn the_size_bound_holds() {
        // 4 MiB of zeros compress to little; a 1 MiB limit refuses them in every format.
        let big = vec![0u8; 4 << 20];
        for format in UNPACKED {
            let payload = compress(format, &big);
            let e = BzImage::parse(&bzimage(&payload, 4, 0))
                .unwrap()
                .unpack(1 << 20)
                .unwrap_err();
            assert!(
                matches!(e, BzImageError::TooLarge { limit } if limit == 1 << 20),
                "{format}: {e}"
            );
            // Exactly at the limit is fine (and then not an ELF).
            let e = BzImage::parse(&bzimage(&payload, 4, 0))
                .unwrap()
                .unpack(4 << 20)
                .unwrap_err();
            assert!(
                matches!(e, BzImageError::NotElf([0, 0, 0, 0])),
                "{format}: {e}"
            );
        }
    }

    /// The repository's root (for the paths `make guest` writes).
    fn repo_root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    /// A file named by `var`, else the first of `known` that exists; panics with `how`
    /// if there is none.
    fn real_file(var: &str, known: &[&str], how: &str) -> std::path::PathBuf {
        if let Some(p) = std::env::var_os(var) {
            let p = std::path::PathBuf::from(p);
            assert!(p.is_file(), "{var}={} is not a file", p.display());
            return p;
        }
        known
            .iter()
            .map(|k| repo_root().join(k))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no {how}: set {var}, or run `make guest-bzimage`"))
    }

    /// A PT_LOAD segment: (p_vaddr, p_paddr, p_filesz, p_memsz, file bytes).
    type Segment<'a> = (u64, u64, u64, u64, &'a [u8]);

    /// e_entry and the PT_LOAD segments of a 64-bit ELF file.
    fn loads(elf: &[u8]) -> (u64, Vec<Segment<'_>>) {
        let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
        let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
        let segs = (0..usize::from(phnum))
            .map(|i| phoff + i * phentsize)
            .filter(|&p| u32_at(p) == 1)
            .map(|p| {
                let (off, filesz) = (u64_at(p + 8) as usize, u64_at(p + 32));
                let bytes = &elf[off..off + filesz as usize];
                (
                    u64_at(p + 16),
                    u64_at(p + 24),
                    filesz,
                    u64_at(p + 40),
                    bytes,
                )
            })
            .collect();
        (u64_at(24), segs)
    }

    /// The real thing: the project's kernel as a bzImage (`make guest-bzimage`, or
    /// DVMM_BZIMAGE) unpacks to the same kernel as its vmlinux (`make guest`, or
    /// DVMM_VMLINUX): same entry, same PT_LOAD segments, byte for byte.
    #[test]
    #[ignore = "needs a real bzImage and its vmlinux: `make guest-bzimage` (or DVMM_BZIMAGE, DVMM_VMLINUX)"]
    fn a_real_bzimage_unpacks_to_its_vmlinux() {
        let bz_path = real_file(
            "DVMM_BZIMAGE",
            &["guest/out/bzImage"],
            "bzImage of the guest kernel",
        );
        let vm_path = real_file("DVMM_VMLINUX", &["guest/out/vmlinux"], "vmlinux");
        let image = std::fs::read(&bz_path).unwrap();
        let bz = BzImage::parse(&image).unwrap();
        let format = bz.compression().unwrap();
        let t = std::time::Instant::now();
        let elf = bz.unpack(UNPACK_LIMIT).unwrap();
        let took = t.elapsed();
        println!(
            "{}: boot protocol {}.{:02}, {format} payload of {} bytes at {:#x}, unpacked to {} bytes in {:.0} ms",
            bz_path.display(),
            { bz.header.version } >> 8,
            { bz.header.version } & 0xff,
            bz.payload.len(),
            bz.payload.as_ptr() as usize - image.as_ptr() as usize,
            elf.len(),
            took.as_secs_f64() * 1e3,
        );
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!((elf[4], elf[5]), (2, 1), "64-bit little-endian");
        assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 62, "EM_X86_64");

        let vmlinux = std::fs::read(&vm_path).unwrap();
        let (entry, segs) = loads(&elf);
        let (want_entry, want_segs) = loads(&vmlinux);
        println!("entry {entry:#x} (vmlinux {want_entry:#x})");
        for (v, p, f, m, _) in &segs {
            println!("PT_LOAD vaddr {v:#x} paddr {p:#x} filesz {f:#x} memsz {m:#x}");
        }
        assert_eq!(entry, want_entry, "e_entry");
        assert_eq!(segs.len(), want_segs.len(), "number of PT_LOAD segments");
        for (i, (a, b)) in segs.iter().zip(&want_segs).enumerate() {
            assert_eq!((a.0, a.1, a.2, a.3), (b.0, b.1, b.2, b.3), "PT_LOAD {i}");
            assert!(a.4 == b.4, "PT_LOAD {i}: contents differ");
        }
        println!(
            "{} PT_LOAD segments equal to {}'s, byte for byte",
            segs.len(),
            vm_path.display()
        );
        // And through the boot path: the same entry, the same bytes in guest memory.
        let ram = || {
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)])
                .unwrap()
        };
        let (bz_mem, vm_mem) = (ram(), ram());
        let from_bz =
            super::super::load_kernel(&bz_mem, &bz_path, Unpacker::Vmm { strict: true }).unwrap();
        let from_vm = super::super::load_kernel(&vm_mem, &vm_path, Unpacker::Guest).unwrap();
        assert_eq!(from_bz.entry, from_vm.entry);
        assert_eq!({ from_bz.setup_header.unwrap().version }, {
            bz.header.version
        });
        let (lo, hi) = (segs[0].1, segs.iter().map(|s| s.1 + s.3).max().unwrap());
        let mut a = vec![0u8; (hi - lo) as usize];
        let mut b = a.clone();
        use vm_memory::Bytes;
        bz_mem
            .read_slice(&mut a, vm_memory::GuestAddress(lo))
            .unwrap();
        vm_mem
            .read_slice(&mut b, vm_memory::GuestAddress(lo))
            .unwrap();
        assert!(a == b, "guest memory differs");
        println!(
            "boot::load_kernel: entry {:#x}, guest memory {lo:#x}..{hi:#x} equal",
            from_bz.entry
        );
    }

    /// Streams made by the very commands the kernel build runs (scripts/Makefile.lib,
    /// scripts/xz_wrap.sh) from a real vmlinux unpack to it.
    #[test]
    #[ignore = "needs a vmlinux (`make guest`, or DVMM_VMLINUX) and gzip, bzip2, lzma, xz, lz4, zstd"]
    fn streams_of_the_kernel_build_tools_unpack() {
        let vm_path = real_file("DVMM_VMLINUX", &["guest/out/vmlinux"], "vmlinux");
        let vmlinux = std::fs::read(&vm_path).unwrap();
        let tools: [(Compression, &str); 6] = [
            (Compression::Gzip, "gzip -n -f -9"),
            (Compression::Bzip2, "bzip2 -9"),
            (Compression::Lzma, "lzma -9"),
            (
                Compression::Xz,
                "xz --check=crc32 --x86 --lzma2=,dict=32MiB",
            ),
            (Compression::Lz4, "lz4 -l -9 - -"),
            (Compression::Zstd, "zstd -22 --ultra"),
        ];
        for (format, cmd) in tools {
            let mut child = std::process::Command::new("sh")
                .args(["-c", &format!("{cmd} < \"$0\"")])
                .arg(&vm_path)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stream = Vec::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_end(&mut stream)
                .unwrap();
            assert!(
                child.wait().unwrap().success(),
                "`{cmd}` failed (installed?)"
            );
            if format != Compression::Gzip {
                stream.extend_from_slice(&(vmlinux.len() as u32).to_le_bytes());
            }
            let img = bzimage(&stream, 27, 0x4000);
            let t = std::time::Instant::now();
            let out = BzImage::parse(&img).unwrap().unpack(UNPACK_LIMIT).unwrap();
            println!(
                "{format:>5} ({cmd}): {} -> {} bytes in {:.0} ms",
                stream.len(),
                out.len(),
                t.elapsed().as_secs_f64() * 1e3
            );
            assert!(out == vmlinux, "{format}: unpacked bytes differ");
        }
    }

    #[test]
    fn who_unpacks() {
        use HostKind::*;
        use UnpackBzImage::*;
        assert_eq!(
            Unpacker::choose(Auto, Software),
            Unpacker::Vmm { strict: false }
        );
        assert_eq!(Unpacker::choose(Auto, Hardware), Unpacker::Guest);
        assert_eq!(
            Unpacker::choose(Always, Hardware),
            Unpacker::Vmm { strict: true }
        );
        assert_eq!(
            Unpacker::choose(Always, Software),
            Unpacker::Vmm { strict: true }
        );
        assert_eq!(Unpacker::choose(Never, Software), Unpacker::Guest);
        for name in UnpackBzImage::NAMES {
            assert_eq!(name.parse::<UnpackBzImage>().unwrap().to_string(), name);
        }
        assert!("sometimes".parse::<UnpackBzImage>().is_err());
    }
}
