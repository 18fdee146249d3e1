//! Where the guest's serial output goes: the terminal (or a capture for tests), with a
//! watch on the stream for the lines that end a run (a kernel panic).

use std::io::Write;
use std::sync::{Arc, Mutex};

const PANIC_MARK: &[u8] = b"Kernel panic - not syncing";
/// What `kernel_power_off()` prints. Without ACPI an x86 Linux kernel has no way to
/// power the machine off: it prints this line and carries on, so the VMM takes the line
/// itself as the power-off request.
const POWER_OFF_MARK: &[u8] = b"reboot: Power down";
/// What `kernel_halt()` prints; `poweroff -f` from user space becomes a halt when the
/// kernel has no power-off method (no ACPI). Every CPU then stops with interrupts
/// disabled: a single-node VM sees that, a cluster's nodes each see only their own
/// vCPUs, so the line ends the run too.
const HALT_MARK: &[u8] = b"reboot: System halted";
const MARK_MAX: usize = 32;

#[derive(Default)]
struct WatchState {
    tail: Vec<u8>,
    panicked: bool,
    powered_off: bool,
    capture: Option<Vec<u8>>,
}

/// A read handle on what the console has seen.
#[derive(Clone, Default)]
pub struct ConsoleWatch(Arc<Mutex<WatchState>>);

impl ConsoleWatch {
    /// Whether the guest printed a kernel panic.
    pub fn panicked(&self) -> bool {
        self.0.lock().map(|s| s.panicked).unwrap_or(false)
    }
    /// Whether the guest kernel announced its power-off.
    pub fn powered_off(&self) -> bool {
        self.0.lock().map(|s| s.powered_off).unwrap_or(false)
    }
    /// Everything written so far (capture mode only).
    pub fn captured(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|s| s.capture.clone())
            .unwrap_or_default()
    }
}

/// The serial console's output sink.
pub struct ConsoleOut {
    out: Option<Box<dyn Write + Send>>,
    watch: ConsoleWatch,
}

impl ConsoleOut {
    /// Writes to `out` (normally stdout).
    pub fn new(out: Box<dyn Write + Send>) -> (Self, ConsoleWatch) {
        let watch = ConsoleWatch::default();
        (
            ConsoleOut {
                out: Some(out),
                watch: watch.clone(),
            },
            watch,
        )
    }

    /// Keeps everything in memory (tests).
    pub fn capture() -> (Self, ConsoleWatch) {
        let watch = ConsoleWatch::default();
        if let Ok(mut s) = watch.0.lock() {
            s.capture = Some(Vec::new());
        }
        (
            ConsoleOut {
                out: None,
                watch: watch.clone(),
            },
            watch,
        )
    }

    /// The watch handle.
    pub fn watch(&self) -> ConsoleWatch {
        self.watch.clone()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut s) = self.watch.0.lock() {
            s.tail.extend_from_slice(buf);
            if !s.panicked && s.tail.windows(PANIC_MARK.len()).any(|w| w == PANIC_MARK) {
                s.panicked = true;
            }
            if !s.powered_off
                && [POWER_OFF_MARK, HALT_MARK]
                    .iter()
                    .any(|m| s.tail.windows(m.len()).any(|w| w == *m))
            {
                s.powered_off = true;
            }
            let keep = MARK_MAX;
            if s.tail.len() > 4 * keep {
                let cut = s.tail.len() - keep;
                s.tail.drain(..cut);
            }
            if let Some(c) = s.capture.as_mut() {
                c.extend_from_slice(buf);
            }
        }
        match self.out.as_mut() {
            Some(o) => {
                o.write_all(buf)?;
                Ok(buf.len())
            }
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.out.as_mut() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spots_panic_across_writes() {
        let (mut c, w) = ConsoleOut::capture();
        c.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!w.panicked());
        c.write_all(b"ic - not syncing: oops\n").unwrap();
        assert!(w.panicked());
        assert!(!w.powered_off());
        for b in b"[ 37.1] reboot: Power down\n" {
            c.write_all(&[*b]).unwrap();
        }
        assert!(w.powered_off());
        let (mut c, w) = ConsoleOut::capture();
        c.write_all(b"[ 9.2] reboot: System ha").unwrap();
        assert!(!w.powered_off());
        c.write_all(b"lted\r\n").unwrap();
        assert!(w.powered_off(), "a halt ends the run as well");
    }
}
