//! Control messages between nodes (transport channel [`CTRL_CHANNEL`]): start-up,
//! interrupts, EOIs, forwarded device accesses and the end of the run. Encoded with
//! postcard; a frame that does not decode is logged and dropped.

use irqchip::Interrupt;
use serde::{Deserialize, Serialize};

/// Transport channel of control messages (the DSM uses its own channel).
pub const CTRL_CHANNEL: u8 = 2;

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
        /// 0 = port read, 1 = port write, 2 = MMIO read, 3 = MMIO write.
        kind: u8,
        /// Port or address.
        addr: u64,
        /// Data (writes) or the size to read (reads: zeroes of that length).
        data: Vec<u8>,
    },
    /// The answer to an [`Ctrl::IoReq`].
    IoResp {
        /// The vCPU that asked.
        vcpu: u32,
        /// 0 = nothing, 1 = reset, 2 = power off.
        event: u8,
        /// Data read.
        data: Vec<u8>,
    },
    /// The run ended on the sender: `Ok(0)` power off, `Ok(1)` reboot, or an error.
    End {
        /// The outcome.
        outcome: Result<u8, String>,
    },
}

impl Ctrl {
    /// Encodes for the wire.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
    /// Decodes from the wire.
    pub fn decode(b: &[u8]) -> Result<Ctrl, postcard::Error> {
        postcard::from_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_garbage() {
        let msgs = [
            Ctrl::Start { tsc_base: 42 },
            Ctrl::Ready,
            Ctrl::Irq {
                vcpu: 3,
                irq: Interrupt::fixed(0x40),
            },
            Ctrl::IoReq {
                vcpu: 1,
                kind: 1,
                addr: 0x3f8,
                data: vec![b'x'],
            },
            Ctrl::End {
                outcome: Err("node 2: triple fault".into()),
            },
        ];
        for m in msgs {
            assert_eq!(Ctrl::decode(&m.encode()).unwrap(), m);
        }
        assert!(Ctrl::decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
