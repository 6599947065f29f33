//! The dirty-page sample request: a 32-bit `outl` of the chunk number to the I/O
//! port `zc_protocol::addr::DIRTY_SAMPLE_PORT` (the VMM's `vmm/src/pio.rs`).
//!
//! One port write is one synchronous vCPU exit and no system call: the VMM reads
//! KVM's dirty log before the guest's next instruction, so every sample sits
//! exactly between two chunks and adds nothing to the method's syscall counts.

use std::io;

use crate::error::{Context, Result};

/// The sample port.
pub use zc_protocol::addr::DIRTY_SAMPLE_PORT as SAMPLE_PORT;

/// Access to [`SAMPLE_PORT`].
#[derive(Debug)]
pub struct SamplePort {
    /// The port number ([`SAMPLE_PORT`]), granted by ioperm.
    port: u16,
}

impl SamplePort {
    /// Gets access to the port's 4 bytes with `ioperm` (PID 1 has CAP_SYS_RAWIO).
    /// Done once before the suite, outside every method's span.
    pub fn open() -> Result<SamplePort> {
        // SAFETY: ioperm only changes this process's I/O permission bitmap; the
        // arguments are plain integers.
        let rc = unsafe { libc::ioperm(libc::c_ulong::from(SAMPLE_PORT), 4, 1) };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .context(|| format!("ioperm({SAMPLE_PORT:#x}, 4) for dirty-page samples"));
        }
        Ok(SamplePort { port: SAMPLE_PORT })
    }

    /// Asks the VMM for a dirty-page sample labelled `chunk`.
    pub fn request(&self, chunk: u32) {
        // SAFETY: `open` was granted access to the port by ioperm; the VMM's
        // handler only records the value, nothing memory safety depends on.
        unsafe {
            std::arch::asm!("out dx, eax", in("dx") self.port, in("eax") chunk,
                options(nomem, nostack, preserves_flags));
        }
    }
}
