//! The port-I/O devices of the PC the guest sees: the console UART (COM1), the control
//! channel UART (COM2), the keyboard controller (only for its reset line) and the ACPI
//! power-management port. Everything else reads as an empty bus (`0xff`).

use std::io;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zc_devices::console::ConsoleSink;
use zc_devices::control::ControlChannel;

use crate::acpi::{self, PowerRequest};

/// COM1: the guest's console, `ttyS0`.
pub const COM1_BASE: u16 = 0x3f8;
/// COM2: the control channel, `ttyS1`.
pub const COM2_BASE: u16 = zc_protocol::addr::CONTROL_UART_BASE;
/// Legacy IRQ (and GSI, with KVM's default routing) of COM1.
pub const COM1_GSI: u32 = 4;
/// Legacy IRQ of COM2.
pub const COM2_GSI: u32 = 3;
/// Keyboard controller data port.
pub const I8042_DATA: u16 = 0x60;
/// Keyboard controller command/status port: `0xfe` written here pulses CPU reset.
pub const I8042_COMMAND: u16 = 0x64;
const UART_PORTS: u16 = 8;
/// The guest writes a 32-bit sample label here (`outl`) to have the VMM sample KVM's
/// dirty-page log (`docs/method-suite.md`). Free in the PC's port map and beside the
/// ACPI PM block (0x600..0x603) that the VMM already owns.
pub const SAMPLE_PORT: u16 = zc_protocol::addr::DIRTY_SAMPLE_PORT;

/// An interrupt line: an eventfd the VMM registers with KVM as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    fn new() -> io::Result<Self> {
        Ok(EventFdTrigger(EventFd::new(EFD_NONBLOCK)?))
    }
}

/// What a port write asked of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing: the guest goes on.
    Continue,
    /// A complete control-channel line may be waiting.
    ControlData,
    /// The guest asked for power-off.
    Shutdown,
    /// The guest asked for a reset (reboot, or a panic with `panic=-1`).
    Reset,
    /// The guest asked for a dirty-page sample with this label.
    DirtySample(u32),
}

/// The legacy port-I/O devices.
pub struct LegacyIo {
    console: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
    control: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ControlChannel>,
    i8042: I8042Device<EventFdTrigger>,
}

impl LegacyIo {
    /// Builds the devices around a console sink and a control channel.
    pub fn new(console: ConsoleSink, control: ControlChannel) -> io::Result<LegacyIo> {
        Ok(LegacyIo {
            console: Serial::new(EventFdTrigger::new()?, console),
            control: Serial::new(EventFdTrigger::new()?, control),
            i8042: I8042Device::new(EventFdTrigger::new()?),
        })
    }

    /// The interrupt eventfds with their GSIs, to register as irqfds.
    pub fn irq_lines(&self) -> [(&EventFd, u32); 2] {
        [
            (&self.console.interrupt_evt().0, COM1_GSI),
            (&self.control.interrupt_evt().0, COM2_GSI),
        ]
    }

    /// Handles a port read; unknown ports read as all ones, like an empty ISA bus.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if in_uart(p, COM1_BASE) => self.console.read(offset_in(p, COM1_BASE)),
            p if in_uart(p, COM2_BASE) => self.control.read(offset_in(p, COM2_BASE)),
            I8042_DATA | I8042_COMMAND => self.i8042.read(offset_in(port, I8042_DATA)),
            _ => 0xff,
        };
        data.fill(value);
    }

    /// Handles a port write and says what the VMM must do about it.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PioAction {
        if port == SAMPLE_PORT {
            let mut label = [0u8; 4];
            let n = data.len().min(4);
            label[..n].copy_from_slice(&data[..n]);
            return PioAction::DirtySample(u32::from_le_bytes(label));
        }
        let Some(&value) = data.first() else {
            return PioAction::Continue;
        };
        if let Some(request) = acpi::decode_pm_write(port, value) {
            return match request {
                PowerRequest::Shutdown => PioAction::Shutdown,
                PowerRequest::Reset => PioAction::Reset,
            };
        }
        match port {
            p if in_uart(p, COM1_BASE) => {
                // A failed interrupt injection only delays the guest's driver; it
                // polls the line status too, so the console keeps working.
                let _ = self.console.write(offset_in(p, COM1_BASE), value);
                PioAction::Continue
            }
            p if in_uart(p, COM2_BASE) => {
                let _ = self.control.write(offset_in(p, COM2_BASE), value);
                PioAction::ControlData
            }
            I8042_DATA | I8042_COMMAND => {
                let _ = self.i8042.write(offset_in(port, I8042_DATA), value);
                // The controller signals CPU reset through its eventfd.
                if self.i8042.reset_evt().0.read().is_ok() {
                    PioAction::Reset
                } else {
                    PioAction::Continue
                }
            }
            _ => PioAction::Continue,
        }
    }
}

fn in_uart(port: u16, base: u16) -> bool {
    (base..base + UART_PORTS).contains(&port)
}

/// The register offset of `port` in a device whose few ports start at `base`.
fn offset_in(port: u16, base: u16) -> u8 {
    u8::try_from(port - base).expect("a port of the device's small range")
}

#[cfg(test)]
mod tests {
    use super::*;
    use zc_devices::control::ControlMessage;

    fn legacy() -> (
        LegacyIo,
        zc_devices::console::ConsoleTail,
        zc_devices::control::ControlMessages,
    ) {
        let (console, tail) = ConsoleSink::new(Box::new(io::sink()));
        let (control, messages) = ControlChannel::new();
        (LegacyIo::new(console, control).unwrap(), tail, messages)
    }

    #[test]
    fn uart_bytes_reach_console_and_control_channel() {
        let (mut io, tail, messages) = legacy();
        for b in b"hello console\n" {
            assert_eq!(io.write(COM1_BASE, &[*b]), PioAction::Continue);
        }
        for b in b"exit 7\n" {
            assert_eq!(io.write(COM2_BASE, &[*b]), PioAction::ControlData);
        }
        assert_eq!(tail.lines(), vec!["hello console".to_string()]);
        assert_eq!(messages.drain(), vec![ControlMessage::Exit { code: 7 }]);
    }

    #[test]
    fn line_status_reports_transmitter_empty() {
        let (mut io, _, _) = legacy();
        let mut lsr = [0u8];
        io.read(COM2_BASE + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THRE must be set so the guest can send");
    }

    #[test]
    fn keyboard_controller_reset_is_reported() {
        let (mut io, _, _) = legacy();
        assert_eq!(io.write(I8042_COMMAND, &[0x20]), PioAction::Continue);
        assert_eq!(io.write(I8042_COMMAND, &[0xfe]), PioAction::Reset);
    }

    #[test]
    fn sample_port_passes_the_label() {
        let (mut io, _, _) = legacy();
        assert_eq!(
            io.write(SAMPLE_PORT, &7u32.to_le_bytes()),
            PioAction::DirtySample(7)
        );
        assert_eq!(io.write(SAMPLE_PORT, &[3]), PioAction::DirtySample(3));
    }

    #[test]
    fn unknown_ports_read_as_empty_bus() {
        let (mut io, _, _) = legacy();
        let mut data = [0u8; 2];
        io.read(0x3e8, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(io.write(0x80, &[0x12]), PioAction::Continue);
        assert_eq!(io.write(0x80, &[]), PioAction::Continue);
    }
}
