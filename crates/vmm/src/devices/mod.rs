//! Devices of the I/O node: the 16550 serial console (vm-superio) and the handful of
//! legacy ports a PC guest touches. Port accesses from any vCPU end up in [`Devices`]
//! (directly on the I/O node, forwarded from other nodes).

pub mod console;
pub mod virtio;

use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

pub use console::{ConsoleOut, ConsoleWatch};

use crate::boot::acpi::{S5_WRITE, SLEEP_CONTROL_PORT, SLEEP_ENABLE};
use crate::layout::COM1_RANGE;
pub use crate::layout::{COM1_BASE, COM1_IRQ};

/// Something that can raise an IOAPIC input line (the interrupt router).
pub trait IrqLine: Send + Sync {
    /// Pulses the edge-triggered line `pin`.
    fn pulse(&self, pin: usize);
}

/// vm-superio's interrupt trigger, connected to an IOAPIC pin.
pub struct PinTrigger {
    line: Arc<dyn IrqLine>,
    pin: usize,
}

impl Trigger for PinTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.line.pulse(self.pin);
        Ok(())
    }
}

/// What a port write asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum PortEvent {
    /// Nothing beyond the write.
    None,
    /// The guest asked for a reset (i8042 command 0xfe, or port 0xcf9).
    Reset,
    /// The guest kernel announced its power-off on the console (see [`console`]) on a
    /// machine without ACPI: the end of the run.
    PowerOff,
    /// The guest entered S5 through the ACPI sleep control register: the end of the run.
    AcpiPowerOff,
    /// The guest kernel announced its power-off on the console on a machine with ACPI:
    /// the ACPI power-off should follow; the VMM ends the run after a grace period if
    /// it does not (a kernel without ACPI, or booted with `acpi=off`).
    PowerOffAnnounced,
}

/// The legacy devices.
pub struct Devices {
    serial: Serial<PinTrigger, NoEvents, ConsoleOut>,
    watch: ConsoleWatch,
    pic_imr: [u8; 2],
    cmos_index: u8,
    port_0x61: u8,
    /// Whether the guest was given ACPI tables (power-off through the sleep registers).
    acpi: bool,
}

impl Devices {
    /// Creates the devices; the serial console writes to `console` and interrupts `line`.
    /// `acpi`: the guest has ACPI tables, whose sleep registers are here.
    pub fn new(console: ConsoleOut, line: Arc<dyn IrqLine>, acpi: bool) -> Self {
        Devices {
            watch: console.watch(),
            serial: Serial::new(
                PinTrigger {
                    line,
                    pin: COM1_IRQ,
                },
                console,
            ),
            pic_imr: [0xff, 0xff],
            cmos_index: 0,
            port_0x61: 0,
            acpi,
        }
    }

    /// Queues bytes typed on the console for the guest. Returns how many were taken.
    pub fn console_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the serial receive FIFO.
    pub fn console_input_room(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// A port read. Unclaimed ports read as all ones, as on a PC with nothing there.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let v: u8 = match port {
            p if COM1_RANGE.contains(&p) => self.serial.read((p - COM1_BASE) as u8),
            // 8259 PICs: remember the mask registers so that probing finds them, but
            // every interrupt goes through the IOAPIC.
            0x21 => self.pic_imr[0],
            0xa1 => self.pic_imr[1],
            0x20 | 0xa0 => 0,
            0x61 => {
                // Speaker / PIT channel-2 gate port: toggle the refresh bit so loops
                // waiting on it make progress.
                self.port_0x61 ^= 0x10;
                self.port_0x61
            }
            // PIT channel 2 counter: there is no PIT, and a counter that reads as not
            // counting down from 0xffff makes the kernel's quick PIT calibration give up
            // after one read instead of polling it 100,000 times (the TSC frequency
            // comes from `tsc_early_khz`).
            0x42 => 0,
            0x64 => 0x1c, // i8042 status: input/output buffers empty
            0x60 => 0,
            0x71 => self.cmos_read(),
            _ => 0xff,
        };
        data.iter_mut().for_each(|b| *b = 0xff);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    /// A port write.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PortEvent {
        let Some(&v) = data.first() else {
            return PortEvent::None;
        };
        match port {
            p if COM1_RANGE.contains(&p) => {
                // The trigger is infallible; a full output only drops bytes.
                let _ = self.serial.write((p - COM1_BASE) as u8, v);
                if p == COM1_BASE && self.watch.powered_off() {
                    return if self.acpi {
                        PortEvent::PowerOffAnnounced
                    } else {
                        PortEvent::PowerOff
                    };
                }
            }
            0x21 => self.pic_imr[0] = v,
            0xa1 => self.pic_imr[1] = v,
            0x61 => self.port_0x61 = (self.port_0x61 & 0x10) | (v & !0x10),
            0x64 if v == 0xfe => return PortEvent::Reset,
            0xcf9 if v & 0x04 != 0 => return PortEvent::Reset,
            SLEEP_CONTROL_PORT if self.acpi && v & SLEEP_ENABLE != 0 => {
                if v == S5_WRITE {
                    return PortEvent::AcpiPowerOff;
                }
                // Only S5 is declared; a guest asking for another state stays awake.
                tracing::warn!(
                    value = v,
                    "the guest asked for an ACPI sleep state other than S5; ignored"
                );
            }
            0x70 => self.cmos_index = v & 0x7f,
            _ => {}
        }
        PortEvent::None
    }

    fn cmos_read(&self) -> u8 {
        match self.cmos_index {
            // Status register A: update not in progress; B: 24h, binary.
            0x0a => 0x26,
            0x0b => 0x06,
            0x0d => 0x80, // valid RAM and time
            _ => 0,
        }
    }

    /// The console writer (for tests and the end-of-run summary).
    pub fn console(&self) -> &ConsoleOut {
        self.serial.writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::acpi::SLEEP_STATUS_PORT;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl IrqLine for Count {
        fn pulse(&self, pin: usize) {
            assert_eq!(pin, COM1_IRQ);
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn serial_prints_and_interrupts() {
        let line = Arc::new(Count(AtomicUsize::new(0)));
        let (out, watch) = ConsoleOut::capture();
        let mut d = Devices::new(out, line.clone(), false);
        // Enable THR-empty interrupt, then write a byte.
        d.pio_write(COM1_BASE + 1, &[0x02]);
        d.pio_write(COM1_BASE, b"A");
        assert_eq!(watch.captured(), b"A");
        assert!(line.0.load(Ordering::SeqCst) >= 1);
    }

    #[test]
    fn reset_and_unclaimed_ports() {
        let (out, _w) = ConsoleOut::capture();
        let mut d = Devices::new(out, Arc::new(Count(AtomicUsize::new(0))), false);
        assert_eq!(d.pio_write(0x64, &[0xfe]), PortEvent::Reset);
        // No ACPI: the sleep control register is an unclaimed port.
        assert_eq!(
            d.pio_write(SLEEP_CONTROL_PORT, &[S5_WRITE]),
            PortEvent::None
        );
        assert_eq!(d.pio_write(0x64, &[0xd1]), PortEvent::None);
        let mut b = [0u8; 2];
        d.pio_read(0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.pio_write(0x21, &[0xfb]);
        let mut m = [0u8];
        d.pio_read(0x21, &mut m);
        assert_eq!(m[0], 0xfb);
    }

    #[test]
    fn acpi_power_off_and_the_console_fallback() {
        for acpi in [false, true] {
            let (out, _w) = ConsoleOut::capture();
            let mut d = Devices::new(out, Arc::new(Count(AtomicUsize::new(0))), acpi);
            let mut ev = PortEvent::None;
            for b in b"[ 1.0] reboot: Power down\n" {
                ev = d.pio_write(COM1_BASE, &[*b]);
            }
            if acpi {
                assert_eq!(ev, PortEvent::PowerOffAnnounced);
                // WAK_STS cleared, then S1 (ignored), then S5.
                assert_eq!(d.pio_write(SLEEP_STATUS_PORT, &[0x80]), PortEvent::None);
                assert_eq!(
                    d.pio_write(SLEEP_CONTROL_PORT, &[(1 << 2) | SLEEP_ENABLE]),
                    PortEvent::None
                );
                assert_eq!(d.pio_write(SLEEP_CONTROL_PORT, &[5 << 2]), PortEvent::None);
                assert_eq!(
                    d.pio_write(SLEEP_CONTROL_PORT, &[S5_WRITE]),
                    PortEvent::AcpiPowerOff
                );
            } else {
                assert_eq!(ev, PortEvent::PowerOff);
            }
        }
    }
}
