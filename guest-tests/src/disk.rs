//! The test disk: `/dev/vda` (ext4, built by `zc-image disk`) mounted on `/mnt`, and
//! dropping the page cache so that reads come from the device.

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

/// Writes back all dirty data, then drops the page cache, dentries and inodes
/// (`echo 3 > /proc/sys/vm/drop_caches`), so the next read of a file is DMA from disk.
///
/// The sync comes first because drop_caches only drops clean pages.
pub fn drop_caches() -> Result<()> {
    sys::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context(|| "writing 3 to /proc/sys/vm/drop_caches".to_string())
}
