//! `sendfile_tmpfs`: `sendfile` per chunk from a copy of the file on tmpfs.
//!
//! Before `BEGIN` the runner copies the bytes to send from the test disk into a
//! file on tmpfs ([`tmpfs_dir`]: the guest's `/tmp`), with `read` and `write`: the
//! CPU writes every tmpfs page once, outside the span (the dirty-page log is
//! cleared at `BEGIN`). During the span there is then no disk DMA, and the pipe
//! inside `sendfile` references the tmpfs pages themselves (6.1:
//! `generic_file_splice_read` -> `shmem_file_read_iter` -> `copy_page_to_iter`,
//! which takes a page reference into an ITER_PIPE; 6.5+: `shmem_file_splice_read`
//! -> `splice_folio_into_pipe`): no CPU copy with a scatter-gather NIC. The copy is
//! removed after `END`.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::runner::{Done, Transfer};
use super::sendfile;
use crate::error::{Context, Error, Result};

/// Where a tmpfs may be mounted: the guest mounts one at `/tmp`; a test host
/// usually has `/dev/shm`.
const CANDIDATES: [&str; 2] = ["/tmp", "/dev/shm"];

/// The first of [`CANDIDATES`] that is a tmpfs mount, if any.
pub fn tmpfs_dir() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(Path::new)
        .find(|dir| is_tmpfs(dir))
        .map(Path::to_path_buf)
}

/// Whether `dir` is on tmpfs (`statfs` says `TMPFS_MAGIC`).
fn is_tmpfs(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero `statfs` is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a live, exclusively
    // borrowed statfs for the whole call.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

/// The copy of the file on tmpfs; removed when dropped (after `END`).
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
}

impl Staged {
    /// Copies the first `size` bytes of `src` into a new file in `dir` with plain
    /// `read`/`write` (before `BEGIN`: the CPU's one pass over the bytes).
    pub fn create(src: &Path, size: u64, dir: &Path) -> Result<Staged> {
        let name = src
            .file_name()
            .ok_or_else(|| Error::new(format!("{}: not a file name", src.display())))?;
        let path = dir.join(format!("zc-tmpfs-{}", name.to_string_lossy()));
        let mut data = Vec::new();
        File::open(src)
            .context(|| format!("opening {}", src.display()))?
            .take(size)
            .read_to_end(&mut data)
            .context(|| format!("reading {}", src.display()))?;
        if (data.len() as u64) < size {
            return Err(Error::new(format!(
                "{} has {} bytes, fewer than the {size} to send",
                src.display(),
                data.len()
            )));
        }
        // Removed on drop from here on, also if the write fails half way.
        let staged = Staged { path };
        File::create(&staged.path)
            .and_then(|mut f| f.write_all(&data))
            .context(|| {
                format!(
                    "writing the tmpfs copy {} ({size} bytes; tmpfs full?)",
                    staged.path.display()
                )
            })?;
        Ok(staged)
    }

    /// The copy's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Best effort: the guest powers off after the suite, and a test host's
        // leftover is named after the file it copies.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The same per-chunk `sendfile` loop as [`sendfile::transfer`], from the tmpfs copy.
pub fn transfer(t: &mut Transfer<'_>) -> Result<Done> {
    sendfile::transfer(t)
}
