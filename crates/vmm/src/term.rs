//! The user's terminal: whole-line messages on stderr, raw mode while the guest's
//! console has the keyboard, and the pump that forwards typed (or piped) bytes to the
//! guest's serial port.
//!
//! The escape is **Ctrl-A x**: it stops the VM (every node). **Ctrl-A Ctrl-A** sends one
//! Ctrl-A to the guest. Everything else, Ctrl-C included, goes to the guest.

use std::io::Write;
use std::os::fd::RawFd;
use std::time::Duration;

/// The escape prefix (Ctrl-A).
pub const ESCAPE: u8 = 0x01;
/// The byte after the prefix that stops the VM.
pub const ESCAPE_QUIT: u8 = b'x';

/// Writes `line` (a newline is added) to stderr with one write, so that lines of
/// several processes sharing the stream never cut into each other.
pub fn eprint_line(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(s.as_bytes());
}

/// Raw input on a terminal for as long as it lives; the saved settings come back on
/// drop. Output processing stays on, so `\n` still starts a new line.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts `fd` in raw input mode if it is a terminal; None if it is not.
    pub fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
        raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
        raw.c_cflag |= libc::CS8;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// What the escape filter made of some input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes for the guest.
    pub bytes: Vec<u8>,
    /// Ctrl-A x was typed.
    pub quit: bool,
}

/// Finds the escape sequence in a byte stream (state carries over between reads).
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// Filters one chunk of input.
    pub fn feed(&mut self, input: &[u8]) -> Filtered {
        let mut f = Filtered::default();
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    ESCAPE_QUIT | b'X' => {
                        f.quit = true;
                        return f;
                    }
                    ESCAPE => f.bytes.push(ESCAPE),
                    other => {
                        f.bytes.push(ESCAPE);
                        f.bytes.push(other);
                    }
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                f.bytes.push(b);
            }
        }
        f
    }
}

/// Where console input goes.
pub trait ConsoleSink: Send + Sync + 'static {
    /// Offers bytes to the guest's serial port; returns how many it took (0: full).
    fn offer(&self, bytes: &[u8]) -> usize;
    /// Whether the VM has stopped (the pump ends).
    fn stopped(&self) -> bool;
    /// Ctrl-A x was typed.
    fn quit(&self);
}

/// Starts the thread that forwards this process's stdin to `sink`. With a terminal the
/// escape filter applies (the caller puts the terminal in raw mode); piped input is
/// forwarded as it is. End of input ends the thread, not the VM.
pub fn spawn_console_input(sink: impl ConsoleSink) -> std::io::Result<()> {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(0) } == 1;
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || pump(0, tty, &sink))
        .map(|_| ())
}

fn pump(fd: RawFd, tty: bool, sink: &dyn ConsoleSink) {
    let mut filter = EscapeFilter::default();
    let mut buf = [0u8; 256];
    while !sink.stopped() {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, 200) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if r == 0 {
            continue;
        }
        // SAFETY: reads into a buffer this function owns, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return; // end of input
        }
        let chunk = &buf[..n as usize];
        let out = if tty {
            filter.feed(chunk)
        } else {
            Filtered {
                bytes: chunk.to_vec(),
                quit: false,
            }
        };
        let mut rest = &out.bytes[..];
        while !rest.is_empty() && !sink.stopped() {
            let took = sink.offer(rest);
            rest = &rest[took..];
            if took == 0 {
                // The guest has not read the FIFO yet.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if out.quit {
            sink.quit();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[test]
    fn escape_filter() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.feed(b"ls\r").bytes, b"ls\r");
        // Ctrl-A Ctrl-A sends one Ctrl-A; Ctrl-A then another key sends both.
        assert_eq!(f.feed(&[1, 1, b'a']).bytes, vec![1, b'a']);
        assert_eq!(f.feed(&[1, b'b']).bytes, vec![1, b'b']);
        // The sequence split across reads.
        let a = f.feed(&[b'z', 1]);
        assert_eq!((a.bytes, a.quit), (vec![b'z'], false));
        let b = f.feed(b"xignored");
        assert!(b.quit);
        assert!(b.bytes.is_empty());
        assert!(!f.feed(&[3]).quit, "Ctrl-C goes to the guest");
    }

    #[derive(Default)]
    struct Sink {
        got: Mutex<Vec<u8>>,
        quit: AtomicBool,
        room: Mutex<usize>,
    }
    impl ConsoleSink for Arc<Sink> {
        fn offer(&self, bytes: &[u8]) -> usize {
            let mut room = self.room.lock().unwrap();
            let n = bytes.len().min(*room);
            self.got.lock().unwrap().extend_from_slice(&bytes[..n]);
            // The "guest" reads 3 bytes per offer.
            *room = 3;
            n
        }
        fn stopped(&self) -> bool {
            self.quit.load(Ordering::SeqCst)
        }
        fn quit(&self) {
            self.quit.store(true, Ordering::SeqCst);
        }
    }

    /// A real pipe: every byte arrives, in order, through a FIFO that takes few at a
    /// time; end of input ends the pump without quitting.
    #[test]
    fn pump_forwards_a_pipe_with_flow_control() {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two-element array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let msg = b"echo hello | wc -c\r\x01x".repeat(10);
        // SAFETY: writes from a live buffer to the pipe's write end, then closes it.
        unsafe {
            assert_eq!(
                libc::write(fds[1], msg.as_ptr().cast(), msg.len()),
                msg.len() as isize
            );
            libc::close(fds[1]);
        }
        let sink = Arc::new(Sink::default());
        pump(fds[0], false, &sink);
        // SAFETY: closes the read end this test opened.
        unsafe { libc::close(fds[0]) };
        assert_eq!(
            *sink.got.lock().unwrap(),
            msg,
            "piped input is not filtered"
        );
        assert!(!sink.quit.load(Ordering::SeqCst));
    }
}
