//! Control messages between nodes (transport channel [`CTRL_CHANNEL`]): start-up,
//! interrupts, EOIs, forwarded device accesses and the end of the run. Encoded with
//! postcard; the VMM's own types ([`IoAccess`], [`PortEvent`], [`GuestEnd`]) travel as
//! themselves, so a frame carries no hand-made codes: one that does not decode (an
//! unknown variant, a truncated or over-long frame) is refused, logged and dropped.

use irqchip::Interrupt;
use serde::{Deserialize, Serialize};
use vmm::devices::PortEvent;
use vmm::{GuestEnd, IoAccess};

/// The transport channel of control messages ([`transport::channel::CTRL`]).
pub const CTRL_CHANNEL: u8 = transport::channel::CTRL;

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ctrl {
    /// Node 0 has written the boot data: create your VM with this TSC base.
    Start {
        /// Guest TSC = host TSC - tsc_base.
        tsc_base: u64,
    },
    /// A node created its VM and its vCPUs wait for INIT/SIPI.
    Ready,
    /// Deliver an interrupt to a vCPU of the receiving node.
    Irq {
        /// Target vCPU.
        vcpu: u32,
        /// The interrupt.
        irq: Interrupt,
    },
    /// A vCPU's logical destination registers changed.
    Logical {
        /// vCPU.
        vcpu: u32,
        /// LDR.
        ldr: u32,
        /// DFR.
        dfr: u32,
    },
    /// A level-triggered EOI for the IOAPIC (to node 0).
    Eoi {
        /// Vector.
        vector: u8,
    },
    /// A device access forwarded to node 0.
    IoReq {
        /// Requesting vCPU (one outstanding request per vCPU).
        vcpu: u32,
        /// The access: port or MMIO, read or write, and where.
        access: IoAccess,
        /// Data (writes) or the size to read (reads: zeroes of that length).
        data: Vec<u8>,
    },
    /// The answer to an [`Ctrl::IoReq`].
    IoResp {
        /// The vCPU that asked.
        vcpu: u32,
        /// What the access asked the machine to do.
        event: PortEvent,
        /// Data read.
        data: Vec<u8>,
    },
    /// The run ended on the sender: how the guest ended, or an error.
    End {
        /// The outcome.
        outcome: Result<GuestEnd, String>,
    },
    /// Someone asked the sender to stop the guest (SIGTERM, `dvmm stop`): node 0 asks
    /// the guest to power off. Last: the variant indices are the codes on the wire.
    StopRequest,
}

/// Why a frame is not a control message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// postcard refused it (unknown variant, bad varint, truncated...).
    #[error("{0}")]
    Postcard(#[from] postcard::Error),
    /// A message followed by bytes that belong to none.
    #[error("{0} trailing byte(s) after the message")]
    Trailing(usize),
}

impl Ctrl {
    /// Encodes for the wire.
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_allocvec(self)
    }
    /// Decodes from the wire: the frame must be exactly one message.
    pub fn decode(b: &[u8]) -> Result<Ctrl, DecodeError> {
        let (m, rest) = postcard::take_from_bytes(b)?;
        if rest.is_empty() {
            Ok(m)
        } else {
            Err(DecodeError::Trailing(rest.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Ctrl> {
        let mut v = vec![
            Ctrl::Start { tsc_base: 42 },
            Ctrl::Start { tsc_base: u64::MAX },
            Ctrl::Ready,
            Ctrl::Irq {
                vcpu: 3,
                irq: Interrupt::fixed(0x40),
            },
            Ctrl::Logical {
                vcpu: 2,
                ldr: 0x0400_0000,
                dfr: 0xffff_ffff,
            },
            Ctrl::Eoi { vector: 0x31 },
        ];
        for access in [
            IoAccess::PioRead(0x3f8),
            IoAccess::PioWrite(0xcf9),
            IoAccess::MmioRead(0xfec0_0000),
            IoAccess::MmioWrite(u64::MAX),
        ] {
            v.push(Ctrl::IoReq {
                vcpu: 1,
                access,
                data: vec![b'x'; 4],
            });
        }
        for event in [
            PortEvent::None,
            PortEvent::Reset,
            PortEvent::PowerOff,
            PortEvent::AcpiPowerOff,
            PortEvent::PowerOffAnnounced,
        ] {
            v.push(Ctrl::IoResp {
                vcpu: 7,
                event,
                data: vec![0xab, 0xcd],
            });
        }
        for outcome in [
            Ok(GuestEnd::PowerOff),
            Ok(GuestEnd::Reboot),
            Ok(GuestEnd::AcpiPowerOff),
            Err("node 2: triple fault".to_string()),
        ] {
            v.push(Ctrl::End { outcome });
        }
        v.push(Ctrl::StopRequest);
        v
    }

    #[test]
    fn every_variant_round_trips() {
        for m in all() {
            let b = m.encode().unwrap();
            assert_eq!(Ctrl::decode(&b).unwrap(), m, "{b:?}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(Ctrl::decode(&[]).is_err());
        assert!(Ctrl::decode(&[0xff, 0xff, 0xff]).is_err());
        // Variant indices past the last one (StopRequest = 8).
        assert_eq!(Ctrl::decode(&[8]).unwrap(), Ctrl::StopRequest);
        assert!(Ctrl::decode(&[9]).is_err());
        assert!(Ctrl::decode(&[200]).is_err());
    }

    #[test]
    fn unknown_codes_are_refused() {
        // IoReq { vcpu: 1, access: <variant 4>, .. }: there is no fifth access kind.
        let mut b = Ctrl::IoReq {
            vcpu: 1,
            access: IoAccess::MmioWrite(0x10),
            data: vec![1],
        }
        .encode()
        .unwrap();
        assert_eq!(&b[..3], &[5, 1, 3]);
        b[2] = 4;
        assert!(Ctrl::decode(&b).is_err());
        // IoResp { vcpu: 0, event: <variant 5>, .. }.
        let mut b = Ctrl::IoResp {
            vcpu: 0,
            event: PortEvent::PowerOff,
            data: vec![],
        }
        .encode()
        .unwrap();
        assert_eq!(&b[..3], &[6, 0, 2]);
        b[2] = 5;
        assert!(Ctrl::decode(&b).is_err());
        // End { outcome: Ok(<variant 3>) }.
        let mut b = Ctrl::End {
            outcome: Ok(GuestEnd::Reboot),
        }
        .encode()
        .unwrap();
        assert_eq!(b, [7, 0, 1]);
        b[2] = 3;
        assert!(Ctrl::decode(&b).is_err());
        // Neither Ok nor Err.
        b[1] = 2;
        assert!(Ctrl::decode(&b).is_err());
    }

    #[test]
    fn truncated_and_trailing_are_refused() {
        for m in all() {
            let b = m.encode().unwrap();
            for n in 0..b.len() {
                assert!(Ctrl::decode(&b[..n]).is_err(), "{m:?} cut at {n}");
            }
            let mut long = b.clone();
            long.push(0);
            assert!(matches!(Ctrl::decode(&long), Err(DecodeError::Trailing(1))));
        }
    }
}
