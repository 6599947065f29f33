//! The scratch disk: a blank, writable ext4 image that the guest writes to, next to
//! the read-only test disk. It is made fresh for each boot and read back on the host
//! after the run, so that what the guest wrote is checked where it landed, in the
//! image (after the guest's FLUSH), not in the guest's page cache.
//!
//! Same file system options as the test disk (no journal, 4 KiB blocks, inode tables
//! initialised at mkfs time: see `disk.rs`), so the only blk traffic while a method
//! writes is the data and the metadata it asks for. The label ([`LABEL`]) is how the
//! guest tells it from the test disk: device order differs between transports.
//!
//! Reading back uses e2fsprogs (`debugfs`, `e2fsck`), already needed to make the
//! images: an ext4 reader crate would be a second implementation of the same format
//! to trust, where the tools are the reference one.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::disk::{self, DiskError, PAGE};

/// The scratch disk's ext4 label.
pub const LABEL: &str = zc_protocol::disk::SCRATCH_DISK_LABEL;
/// Room the file system itself takes beyond the files' blocks (inode tables, bitmaps,
/// directories), generously: the image is sparse, so unused room costs nothing.
const FS_OVERHEAD: u64 = 32 << 20;

/// The size of a scratch disk that holds files of `file_bytes` bytes in all.
pub fn size_for(file_bytes: u64) -> u64 {
    let blocks = file_bytes.div_ceil(PAGE as u64) * PAGE as u64;
    // A tenth more for the files' extent blocks and whatever else ext4 allocates.
    (blocks + blocks / 10 + FS_OVERHEAD).div_ceil(1 << 20) << 20
}

/// Makes a blank scratch disk of `size` bytes at `image` (replacing any file there).
pub fn create(image: &Path, size: u64) -> Result<(), DiskError> {
    disk::make_ext4(image, size, LABEL, None)
}

/// What reading a file back from a scratch disk found.
#[derive(Debug, Error)]
pub enum ReadBackError {
    /// e2fsprogs is not installed.
    #[error("{0} not found: install e2fsprogs (apt-get install e2fsprogs)")]
    ToolMissing(&'static str),
    /// A name that is not a plain file name in the image's root directory (it goes
    /// into a `debugfs` command line).
    #[error("{0:?}: a scratch file's name is letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// The file is not in the image.
    #[error("{name} is not on the scratch disk {image} (debugfs: {said})")]
    NotFound {
        /// The file asked for.
        name: String,
        /// The image.
        image: PathBuf,
        /// debugfs's last line on stderr.
        said: String,
    },
    /// `e2fsck -fn` found the file system inconsistent: the guest's writes did not
    /// all reach the image (a FLUSH missing), or the device wrote where it should not.
    #[error("the scratch disk {image} is not a consistent ext4 file system (e2fsck exit {status}): {said}")]
    Inconsistent {
        /// The image.
        image: PathBuf,
        /// e2fsck's exit status.
        status: i32,
        /// e2fsck's first lines.
        said: String,
    },
    /// A host file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReadBackError + 'a {
    move |source| ReadBackError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Runs one of e2fsprogs' tools (they live in /sbin, which a non-root PATH may lack).
fn e2fsprogs(tool: &'static str) -> Command {
    let mut cmd = Command::new(tool);
    cmd.env("PATH", disk::path_with_sbin());
    cmd
}

fn output(
    tool: &'static str,
    cmd: &mut Command,
    image: &Path,
) -> Result<std::process::Output, ReadBackError> {
    cmd.output().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ReadBackError::ToolMissing(tool),
        _ => io_err("running e2fsprogs on", image)(e),
    })
}

/// Checks that `image` is a consistent ext4 file system, without changing it.
pub fn check(image: &Path) -> Result<(), ReadBackError> {
    let out = output(
        "e2fsck",
        e2fsprogs("e2fsck").args(["-f", "-n"]).arg(image),
        image,
    )?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Err(ReadBackError::Inconsistent {
        image: image.to_path_buf(),
        status: out.status.code().unwrap_or(-1),
        said: text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// Copies file `name` out of the root directory of `image` to `dest`.
pub fn dump(image: &Path, name: &str, dest: &Path) -> Result<(), ReadBackError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain {
        return Err(ReadBackError::BadName(name.to_string()));
    }
    match fs::remove_file(dest) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("removing", dest)(e)),
        _ => {}
    }
    let dest_text = dest
        .to_str()
        .filter(|d| !d.contains(['"', '\n']))
        .ok_or_else(|| {
            io_err("cannot name in a debugfs command", dest)(io::ErrorKind::InvalidInput.into())
        })?;
    let request = format!("dump /{name} \"{dest_text}\"");
    let out = output(
        "debugfs",
        e2fsprogs("debugfs").arg("-R").arg(request).arg(image),
        image,
    )?;
    // debugfs exits 0 whether or not the file was there; what it wrote says.
    if !dest.exists() || !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr)
            .lines()
            .rfind(|l| !l.starts_with("debugfs "))
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(ReadBackError::NotFound {
            name: name.to_string(),
            image: image.to_path_buf(),
            said,
        });
    }
    Ok(())
}

/// How a file on the scratch disk compares with the file it should be a copy of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    /// The scratch file's length.
    pub len: u64,
    /// The expected length.
    pub expected_len: u64,
    /// The first offset where the two differ (within the shorter length), if any.
    pub first_difference: Option<u64>,
}

impl Comparison {
    /// Same length, same bytes.
    pub fn identical(&self) -> bool {
        self.len == self.expected_len && self.first_difference.is_none()
    }
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.first_difference, self.len == self.expected_len) {
            (None, true) => write!(f, "{} bytes, identical", self.len),
            (None, false) => write!(
                f,
                "{} bytes where {} were expected (the common part identical)",
                self.len, self.expected_len
            ),
            (Some(at), _) => write!(
                f,
                "differs from byte {at} on ({} bytes, {} expected)",
                self.len, self.expected_len
            ),
        }
    }
}

/// Compares file `name` on `image` with the first `expected_len` bytes of the file
/// `expected`, dumping it to `work_dir/name` first. The dump is removed when the two
/// are identical and kept, for a look, when they are not.
pub fn compare(
    image: &Path,
    name: &str,
    expected: &Path,
    expected_len: u64,
    work_dir: &Path,
) -> Result<Comparison, ReadBackError> {
    let file = File::open(expected).map_err(io_err("opening", expected))?;
    compare_with(image, name, file.take(expected_len), expected, work_dir)
}

/// [`compare`] with the expected bytes in memory.
pub fn compare_bytes(
    image: &Path,
    name: &str,
    expected: &[u8],
    work_dir: &Path,
) -> Result<Comparison, ReadBackError> {
    compare_with(
        image,
        name,
        expected,
        Path::new("the expected bytes"),
        work_dir,
    )
}

fn compare_with(
    image: &Path,
    name: &str,
    expected: impl Read,
    expected_name: &Path,
    work_dir: &Path,
) -> Result<Comparison, ReadBackError> {
    let dumped = work_dir.join(name);
    dump(image, name, &dumped)?;
    let comparison = compare_files(&dumped, expected, expected_name)?;
    if comparison.identical() {
        fs::remove_file(&dumped).map_err(io_err("removing", &dumped))?;
    }
    Ok(comparison)
}

/// Compares the file `got` with the bytes of `expected`, in chunks.
fn compare_files(
    got: &Path,
    mut expected: impl Read,
    expected_name: &Path,
) -> Result<Comparison, ReadBackError> {
    const CHUNK: usize = 1 << 20;
    let len = fs::metadata(got).map_err(io_err("reading", got))?.len();
    let mut a = File::open(got).map_err(io_err("opening", got))?;
    let (mut abuf, mut bbuf) = (vec![0; CHUNK], vec![0; CHUNK]);
    let mut at = 0u64;
    let mut first_difference = None;
    let mut expected_seen = 0u64;
    loop {
        let n = read_full(&mut a, &mut abuf).map_err(io_err("reading", got))?;
        let m = read_full(&mut expected, &mut bbuf).map_err(io_err("reading", expected_name))?;
        expected_seen += m as u64;
        let common = n.min(m);
        if first_difference.is_none() {
            if let Some(i) = abuf[..common]
                .iter()
                .zip(&bbuf[..common])
                .position(|(x, y)| x != y)
            {
                first_difference = Some(at + i as u64);
            }
        }
        at += common as u64;
        if n < CHUNK || m < CHUNK {
            // One side ended; count what is left of the expected bytes for their length.
            if m == CHUNK {
                expected_seen += io::copy(&mut expected, &mut io::sink())
                    .map_err(io_err("reading", expected_name))?;
            }
            break;
        }
    }
    Ok(Comparison {
        len,
        expected_len: expected_seen,
        first_difference,
    })
}

/// Reads until `buf` is full or the file ends; returns how many bytes were read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_leave_room_for_the_file_system() {
        assert_eq!(size_for(0), 32 << 20);
        let s = size_for(96 << 20);
        assert!(
            s >= (96 << 20) + (32 << 20) && s.is_multiple_of(1 << 20),
            "{s}"
        );
    }

    #[test]
    fn compares_in_chunks_and_says_where_files_differ() {
        let dir = tempfile::tempdir().unwrap();
        let expected: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want = dir.path().join("want");
        fs::write(&want, &expected).unwrap();
        let got = dir.path().join("got");
        let check = |bytes: &[u8], len: u64| {
            fs::write(&got, bytes).unwrap();
            let from_file =
                compare_files(&got, File::open(&want).unwrap().take(len), &want).unwrap();
            let end = usize::try_from(len)
                .unwrap_or(usize::MAX)
                .min(expected.len());
            let from_memory = compare_files(&got, &expected[..end], &want).unwrap();
            assert_eq!(from_file, from_memory);
            from_file
        };
        assert!(check(&expected, u64::MAX).identical());
        assert!(check(&expected[..1000], 1000).identical());
        let short = check(&expected[..2_500_000], u64::MAX);
        assert_eq!(
            (short.len, short.expected_len, short.first_difference),
            (2_500_000, 3_000_000, None)
        );
        assert!(!short.identical());
        let mut changed = expected.clone();
        changed[2_100_000] ^= 1;
        let differs = check(&changed, u64::MAX);
        assert_eq!(differs.first_difference, Some(2_100_000));
        assert!(!differs.identical());
        let long = check(&expected, 1 << 20);
        assert_eq!(
            (long.len, long.expected_len, long.first_difference),
            (3_000_000, 1 << 20, None)
        );
    }

    #[test]
    fn refuses_names_that_are_not_plain() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", "a b", ".hidden", "a\"b", "dir/x"] {
            assert!(
                matches!(
                    dump(&dir.path().join("img"), bad, &dir.path().join("o")),
                    Err(ReadBackError::BadName(_))
                ),
                "{bad:?}"
            );
        }
    }

    /// A real scratch disk: made blank, a file written into it with debugfs (as the
    /// guest would through the kernel), read back and compared; a missing file and a
    /// corrupted image are told apart. Skipped with a note without e2fsprogs.
    #[test]
    fn reads_back_what_was_written_and_catches_damage() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("scratch.img");
        match create(&image, size_for(1 << 20)) {
            Err(DiskError::MkfsMissing) => {
                eprintln!("skipped: mkfs.ext4 is not installed");
                return;
            }
            other => other.unwrap(),
        }
        check(&image).unwrap();
        let payload: Vec<u8> = (0..(1u32 << 20) + 123)
            .map(|i| (i ^ (i >> 9)).to_le_bytes()[0])
            .collect();
        let source = dir.path().join("payload.bin");
        fs::write(&source, &payload).unwrap();
        let wrote = e2fsprogs("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} recv.bin", source.display()))
            .arg(&image)
            .output()
            .unwrap();
        assert!(wrote.status.success(), "{wrote:?}");
        check(&image).unwrap();

        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let same = compare(&image, "recv.bin", &source, u64::MAX, &work).unwrap();
        assert!(same.identical(), "{same}");
        let same = compare_bytes(&image, "recv.bin", &payload, &work).unwrap();
        assert!(same.identical(), "{same}");
        assert!(
            !work.join("recv.bin").exists(),
            "an identical dump is removed"
        );
        let prefix = compare(&image, "recv.bin", &source, 4096, &work).unwrap();
        assert!(!prefix.identical(), "longer than expected: {prefix}");
        assert!(work.join("recv.bin").exists(), "a differing dump is kept");

        match dump(&image, "absent.bin", &work.join("absent.bin")) {
            Err(ReadBackError::NotFound { said, .. }) => {
                assert!(said.contains("not found"), "{said}")
            }
            other => panic!("{other:?}"),
        }

        // Zero the root directory's inode table block: e2fsck must object.
        let mut bytes = fs::read(&image).unwrap();
        let group_desc = 4096; // block 1 with 4 KiB blocks
        let inode_table =
            u32::from_le_bytes(bytes[group_desc + 8..group_desc + 12].try_into().unwrap()) as usize;
        bytes[inode_table * 4096..inode_table * 4096 + 4096].fill(0);
        fs::write(&image, &bytes).unwrap();
        assert!(matches!(
            check(&image),
            Err(ReadBackError::Inconsistent { .. })
        ));
    }
}
