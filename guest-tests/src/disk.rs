//! The test disk: `/dev/vda` (ext4, built by `zc-image disk`) mounted on `/mnt`; the
//! scratch disk (ext4, `zc-image scratch`) found by its label and mounted on
//! `/scratch`; and dropping the page cache so that reads come from the device.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::mounts::Mount;
use crate::sys;

/// The test disk: the first virtio-blk device.
pub const DEVICE: &str = "/dev/vda";
/// Where it is mounted.
pub const MOUNT_POINT: &str = "/mnt";
/// How long to wait for [`DEVICE`] after `virtio_blk` was loaded (devtmpfs creates
/// the node when the driver has read the capacity).
pub const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// Waits up to `timeout` for `path` to exist; returns how long it took.
pub fn wait_for(path: &str, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() >= timeout {
            return Err(Error::new(format!(
                "no {path} after {:.1} s: is the VMM's virtio-blk device configured (disk image given) and virtio_blk in the module list?",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(start.elapsed())
}

/// Mounts [`DEVICE`] on [`MOUNT_POINT`] as ext4.
///
/// `noatime`: reading a file must not dirty its inode, or every cold-cache send
/// would be followed by metadata writes in the device log that no method asked for.
pub fn mount(read_only: bool) -> Result<()> {
    wait_for(DEVICE, DEVICE_WAIT)?;
    std::fs::create_dir_all(MOUNT_POINT).context(|| format!("creating {MOUNT_POINT}"))?;
    let mut flags = libc::MS_NOATIME;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    Mount {
        source: DEVICE,
        target: MOUNT_POINT,
        fstype: "ext4",
        flags,
        data: None,
    }
    .mount()
}

/// Where the scratch disk is mounted.
pub const SCRATCH_MOUNT_POINT: &str = "/scratch";
/// The scratch disk's ext4 label.
pub const SCRATCH_LABEL: &str = zc_protocol::disk::SCRATCH_DISK_LABEL;

/// The ext4 volume label of block device `path`, if it holds ext4.
fn ext4_label(path: &str) -> Option<String> {
    use std::os::unix::fs::FileExt;
    // The superblock is at byte 1024: magic at +56, volume name (16 bytes) at +120.
    let mut sb = [0u8; 136];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut sb, 1024)
        .ok()?;
    if sb[56..58] != [0x53, 0xef] {
        return None;
    }
    let name = &sb[120..136];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..len]).into_owned())
}

/// Waits up to `timeout` for a virtio-blk disk (`/dev/vda`..`/dev/vdh`) labelled
/// `label`; returns its device path. By label, because which disk the guest names
/// `vda` depends on the transport's probe order, not on the VMM's.
pub fn find_by_label(label: &str, timeout: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        for letter in 'a'..='h' {
            let path = format!("/dev/vd{letter}");
            if ext4_label(&path).as_deref() == Some(label) {
                return Ok(path);
            }
        }
        if start.elapsed() >= timeout {
            return Err(Error::new(format!(
                "no virtio-blk disk labelled {label} after {:.1} s: give the VMM a scratch disk (zc-vmm run --scratch-disk PATH, made by `zc-image scratch`)",
                timeout.as_secs_f64()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mounts the scratch disk read-write on [`SCRATCH_MOUNT_POINT`]; returns its device.
pub fn mount_scratch() -> Result<String> {
    let device = find_by_label(SCRATCH_LABEL, DEVICE_WAIT)?;
    std::fs::create_dir_all(SCRATCH_MOUNT_POINT)
        .context(|| format!("creating {SCRATCH_MOUNT_POINT}"))?;
    Mount {
        source: &device,
        target: SCRATCH_MOUNT_POINT,
        fstype: "ext4",
        flags: libc::MS_NOATIME,
        data: None,
    }
    .mount()?;
    Ok(device)
}

/// Writes back all dirty data, then drops the page cache, dentries and inodes
/// (`echo 3 > /proc/sys/vm/drop_caches`), so the next read of a file is DMA from disk.
///
/// The sync comes first because drop_caches only drops clean pages.
pub fn drop_caches() -> Result<()> {
    sys::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context(|| "writing 3 to /proc/sys/vm/drop_caches".to_string())
}
