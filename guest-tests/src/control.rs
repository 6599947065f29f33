//! The guest → VMM control channel's sending end: the messages are
//! `zc_protocol::ControlMessage`s, formatted by it, one line each on the control
//! UART (COM2, `zc_protocol::addr::CONTROL_UART_BASE`).
//!
//! The bytes go straight to the UART's transmit register with `outb`, not through
//! the kernel's tty layer: each byte is one synchronous port exit, so by the time
//! `mark` returns the VMM has the whole line, which is what lets marks delimit
//! device activity exactly.

use std::io::{self, Write};

use zc_protocol::ControlMessage;

use crate::error::{Context, Result};

/// The I/O base of COM2, the control UART.
pub use zc_protocol::addr::CONTROL_UART_BASE as COM2;

/// Line status register offset from the UART's base.
const LSR: u16 = 5;
/// LSR bit: transmit holding register empty.
const LSR_THRE: u8 = 0x20;
/// How many LSR reads to wait for THRE before sending anyway: the VMM's UART always
/// reports empty, so this only bounds the wait on a UART that never drains (PID 1
/// must not hang on its own reporting).
const THRE_SPINS: u32 = 100_000;

/// Writes control messages to a byte sink: [`UartTx`] in the guest, a `Vec<u8>` in
/// tests.
#[derive(Debug)]
pub struct Control<W: Write> {
    sink: W,
}

impl<W: Write> Control<W> {
    /// Wraps a byte sink.
    pub fn new(sink: W) -> Control<W> {
        Control { sink }
    }

    /// Gives the sink back (tests read what was written).
    // Part of the protocol the per-method tests use; only unit tests call it yet.
    #[allow(dead_code)]
    pub fn into_inner(self) -> W {
        self.sink
    }

    fn send(&mut self, message: ControlMessage) -> io::Result<()> {
        self.sink.write_all(&message.to_line())?;
        self.sink.flush()
    }

    /// `hello <release>`: the program started on this kernel (`uname -r`).
    pub fn hello(&mut self, kernel_release: &str) -> io::Result<()> {
        self.send(ControlMessage::Hello {
            kernel_release: kernel_release.to_string(),
        })
    }

    /// `uptime <seconds>`: the kernel's uptime when this program started.
    pub fn uptime(&mut self, seconds: f64) -> io::Result<()> {
        self.send(ControlMessage::Uptime { seconds })
    }

    /// `log <text>`: a human-readable line for the VMM's log.
    pub fn log(&mut self, text: &str) -> io::Result<()> {
        self.send(ControlMessage::Log {
            text: text.to_string(),
        })
    }

    /// `mark <label>`: splits the device logs at this point (label must not be empty).
    pub fn mark(&mut self, label: &str) -> io::Result<()> {
        self.send(ControlMessage::Mark {
            label: label.to_string(),
        })
    }

    /// `report <json>`: a machine-readable result, one JSON value on one line.
    pub fn report(&mut self, json: &str) -> io::Result<()> {
        self.send(ControlMessage::Report {
            json: json.to_string(),
        })
    }

    /// `exit <code>`: the program's final status; the VMM exits with it.
    pub fn exit(&mut self, code: i32) -> io::Result<()> {
        self.send(ControlMessage::Exit { code })
    }
}

/// The transmit side of a 16550 UART, driven with port I/O from user space.
#[derive(Debug)]
pub struct UartTx {
    base: u16,
}

impl UartTx {
    /// Gets access to the UART's 8 ports with `ioperm` (needs `CAP_SYS_RAWIO`, which
    /// PID 1 has).
    pub fn open(base: u16) -> Result<UartTx> {
        // SAFETY: ioperm only changes this process's I/O permission bitmap; the
        // arguments are plain integers.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(base), 8, 1) };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context(|| format!("ioperm({base:#x}, 8) for the control UART"));
        }
        Ok(UartTx { base })
    }

    fn put(&self, byte: u8) {
        for _ in 0..THRE_SPINS {
            // SAFETY: `open` was granted access to base..base+8 by ioperm; reading the
            // LSR has no side effect on memory.
            if unsafe { inb(self.base + LSR) } & LSR_THRE != 0 {
                break;
            }
            std::hint::spin_loop();
        }
        // SAFETY: as above; writing THR (offset 0) only sends the byte.
        unsafe { outb(self.base, byte) };
    }
}

impl Write for UartTx {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &byte in buf {
            self.put(byte);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one byte to an I/O port.
///
/// # Safety
/// The process must have permission for `port` (ioperm), and writing it must not
/// disturb anything memory safety depends on.
unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller upholds the contract above; `out` touches no memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") port, in("al") value,
            options(nomem, nostack, preserves_flags));
    }
}

/// Reads one byte from an I/O port.
///
/// # Safety
/// The process must have permission for `port` (ioperm), and reading it must not
/// disturb anything memory safety depends on.
unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: the caller upholds the contract above; `in` touches no memory.
    unsafe {
        std::arch::asm!("in al, dx", out("al") value, in("dx") port,
            options(nomem, nostack, preserves_flags));
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Control<Vec<u8>>) -> io::Result<()>) -> String {
        let mut control = Control::new(Vec::new());
        f(&mut control).unwrap();
        String::from_utf8(control.into_inner()).unwrap()
    }

    #[test]
    fn formats_each_message() {
        assert_eq!(
            written(|c| c.hello("6.1.0-56-cloud-amd64")),
            "hello 6.1.0-56-cloud-amd64\n"
        );
        assert_eq!(written(|c| c.uptime(1.234)), "uptime 1.23\n");
        assert_eq!(written(|c| c.log("3 modules")), "log 3 modules\n");
        assert_eq!(
            written(|c| c.mark(&zc_protocol::Marker::begin(zc_protocol::Method::Sendfile).label())),
            "mark BEGIN sendfile\n"
        );
        assert_eq!(written(|c| c.report(r#"{"a":1}"#)), "report {\"a\":1}\n");
        assert_eq!(written(|c| c.exit(0)), "exit 0\n");
        assert_eq!(written(|c| c.exit(-1)), "exit -1\n");
    }

    #[test]
    fn sequence_is_one_line_per_message() {
        let out = written(|c| {
            c.hello("6.1")?;
            c.uptime(0.5)?;
            c.exit(3)
        });
        assert_eq!(out, "hello 6.1\nuptime 0.50\nexit 3\n");
    }

    #[test]
    fn control_characters_cannot_split_a_message() {
        let out = written(|c| c.log("line one\nline two\r\n\x1b[31mred\x7f"));
        assert_eq!(out, "log line one line two   [31mred \n");
        assert_eq!(out.matches('\n').count(), 1);
        // Non-ASCII text passes through untouched.
        assert_eq!(written(|c| c.log("héllo")), "log héllo\n");
    }

    #[test]
    fn empty_text_has_no_trailing_space() {
        assert_eq!(written(|c| c.log("")), "log\n");
    }
}
