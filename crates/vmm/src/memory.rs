//! Guest physical memory layout.
//!
//! RAM starts at 0. Up to 3 GiB it is one region; the rest goes above 4 GiB so that the
//! 32-bit hole below 4 GiB stays free for the LAPIC (0xFEE0_0000) and IOAPIC
//! (0xFEC0_0000) pages.

use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// First address above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Smallest guest that can boot Linux sensibly.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest this build accepts (the host must also be able to back it).
pub const MAX_MEMORY: u64 = 1 << 40;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size out of the accepted range.
    #[error("memory size {0} bytes is not possible: it must be between 64 MiB and 1 TiB and a multiple of 2 MiB")]
    BadSize(u64),
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The guest-physical ranges (start, length) that hold RAM for a guest of `size` bytes.
pub fn ram_ranges(size: u64) -> Result<Vec<(u64, u64)>, MemoryError> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(2 << 20) {
        return Err(MemoryError::BadSize(size));
    }
    Ok(if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (HIGH_RAM_START, size - MMIO_HOLE_START),
        ]
    })
}

/// The guest-physical ranges (start, length) of the bytes `offsets` of guest RAM counted
/// in RAM order (offset 0 = guest-physical 0; the RAM above 4 GiB follows the RAM below
/// the hole), for a guest of `size` bytes. This is how a node's memory share (a range of
/// DSM pages) maps to guest-physical memory.
pub fn gpa_ranges(
    size: u64,
    offsets: std::ops::Range<u64>,
) -> Result<Vec<(u64, u64)>, MemoryError> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size)? {
        let lo = offsets.start.max(offset);
        let hi = offsets.end.min(offset + len);
        if lo < hi {
            out.push((start + (lo - offset), hi - lo));
        }
        offset += len;
    }
    Ok(out)
}

/// Creates the host mapping for guest RAM (anonymous, private, not yet touched).
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)?
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

/// A size (`--memory`, a node's memory share) that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with an optional K, M, G or T unit.
    #[error("invalid size '{0}': use a number with K, M, G or T")]
    Invalid(String),
    /// The number of bytes does not fit in 64 bits.
    #[error("invalid size '{0}': too large")]
    TooLarge(String),
}

/// Parses a size such as `512M`, `1G`, `2048K` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (t, 1u64),
        Some((i, _)) => {
            let unit = t[i..]
                .trim_end_matches(['B', 'b', 'i'])
                .to_ascii_uppercase();
            let m = match unit.as_str() {
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(SizeError::Invalid(s.to_string())),
            };
            (&t[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| SizeError::Invalid(s.to_string()))?;
    n.checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

/// Builds the guest memory map over an existing host mapping of `size` bytes (e.g. the
/// DSM region): guest RAM range after range, at consecutive offsets of the mapping.
///
/// # Safety
/// `host` must point to a live, read-write mapping of at least `size` bytes that
/// outlives the returned object and every VM that uses it.
pub unsafe fn guest_memory_over(host: *mut u8, size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    use vm_memory::mmap::MmapRegion;
    use vm_memory::GuestRegionMmap;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(size)? {
        // SAFETY: the caller guarantees the mapping covers `size` bytes, and the ranges
        // add up to `size`.
        let mapping = unsafe {
            MmapRegion::build_raw(
                host.add(offset as usize),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            )
        }
        .map_err(|_| MemoryError::BadSize(size))?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(MemoryError::BadSize(size))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::BadSize(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999T").is_err());
        assert_eq!(
            parse_size("lots").unwrap_err().to_string(),
            "invalid size 'lots': use a number with K, M, G or T"
        );
        assert_eq!(
            parse_size("99999999999999T").unwrap_err().to_string(),
            "invalid size '99999999999999T': too large"
        );
    }

    #[test]
    fn ranges_split_around_hole() {
        assert_eq!(ram_ranges(512 << 20).unwrap(), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30).unwrap(),
            vec![
                (0, MMIO_HOLE_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_HOLE_START)
            ]
        );
        assert!(ram_ranges(1 << 20).is_err());
        // A share that spans the hole is split around it.
        let g = 1u64 << 30;
        assert_eq!(gpa_ranges(4 * g, 0..2 * g).unwrap(), vec![(0, 2 * g)]);
        assert_eq!(
            gpa_ranges(4 * g, 2 * g..4 * g).unwrap(),
            vec![(2 * g, g), (HIGH_RAM_START, g)]
        );
        assert_eq!(
            gpa_ranges(4 * g, 3 * g..4 * g).unwrap(),
            vec![(HIGH_RAM_START, g)]
        );
        assert!(ram_ranges((512 << 20) + 4096).is_err());
    }
}
