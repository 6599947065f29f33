//! The initramfs: a cpio archive in the "newc" format, gzip-compressed, as the kernel
//! unpacks it into its rootfs before running `/init`.
//!
//! newc layout, per entry: a 110-byte ASCII header (`070701` then 13 fields of 8 hex
//! digits: ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
//! rdevminor, namesize, check), the NUL-terminated name padded so header + name is a
//! multiple of 4, then the data padded to a multiple of 4. The archive ends with an
//! entry named `TRAILER!!!`.
//!
//! The writer stores names without a leading `/` (as `find . | cpio -H newc` does) and
//! adds missing parent directories itself: the kernel's unpacker does not create them.
//! All entries get uid/gid 0 and mtime 0, so an archive depends only on its contents.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use thiserror::Error;

/// File type bits of `st_mode`.
pub const S_IFMT: u32 = 0o170_000;
/// Directory.
pub const S_IFDIR: u32 = 0o040_000;
/// Regular file.
pub const S_IFREG: u32 = 0o100_000;
/// Character device.
pub const S_IFCHR: u32 = 0o020_000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120_000;

/// The magic every newc cpio header starts with.
pub const NEWC_MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// Errors writing or reading an initramfs.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// Writing the archive (or reading a file to put in it) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A path that cannot be stored (empty, `..`, NUL, or the trailer's name).
    #[error("cannot store {0:?} in an initramfs: use a plain absolute path without `..`")]
    BadName(String),
    /// An entry is added twice, or below something that is not a directory.
    #[error("initramfs entry {0:?} is added twice or under a non-directory")]
    Duplicate(String),
    /// A file is larger than newc's 32-bit size field.
    #[error("{0} is larger than 4 GiB, which the cpio newc format cannot hold")]
    TooLarge(String),
    /// The archive being read is not valid newc.
    #[error("not a valid newc cpio archive at byte {offset}: {why}")]
    Corrupt {
        /// Offset in the (decompressed) archive.
        offset: usize,
        /// What is wrong there.
        why: String,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitramfsError {
    let what = what.into();
    move |source| InitramfsError::Io { what, source }
}

/// Turns `/dev/console` or `dev/console` into the stored form `dev/console`.
fn stored_name(path: &str) -> Result<String, InitramfsError> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    let bad = trimmed.is_empty()
        || trimmed == TRAILER
        || trimmed.contains('\0')
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(InitramfsError::BadName(path.to_string()));
    }
    Ok(trimmed.to_string())
}

/// Writes a newc cpio archive to any [`Write`]; see [`create_gz`] for the usual use.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    dirs: BTreeSet<String>,
    others: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an empty archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            dirs: BTreeSet::new(),
            others: BTreeSet::new(),
        }
    }

    /// Adds a directory (`mode` = permission bits, e.g. `0o755`). Adding an existing
    /// directory again is a no-op.
    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), InitramfsError> {
        let name = stored_name(path)?;
        if self.dirs.contains(&name) {
            return Ok(());
        }
        self.claim(&name, true)?;
        self.header(&name, S_IFDIR | (mode & 0o7777), 2, 0, (0, 0))?;
        self.dirs.insert(name);
        Ok(())
    }

    /// Adds a regular file with the given contents and permission bits.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<(), InitramfsError> {
        let name = stored_name(path)?;
        self.claim(&name, false)?;
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge(name.clone()))?;
        self.header(&name, S_IFREG | (mode & 0o7777), 1, size, (0, 0))?;
        self.write(data)?;
        self.pad(data.len())
    }

    /// Adds a regular file whose contents are read from `src` on the build machine.
    pub fn add_file_from_path(
        &mut self,
        path: &str,
        mode: u32,
        src: &Path,
    ) -> Result<(), InitramfsError> {
        let data = std::fs::read(src).map_err(io_err(format!("cannot read {}", src.display())))?;
        self.add_file(path, mode, &data)
    }

    /// Adds a character device node, e.g. `/dev/console` with `(5, 1)`.
    pub fn add_char_dev(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        let name = stored_name(path)?;
        self.claim(&name, false)?;
        self.header(&name, S_IFCHR | (mode & 0o7777), 1, 0, (major, minor))
    }

    /// Adds a symbolic link `path` -> `target` (the target is stored as given).
    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        let name = stored_name(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(InitramfsError::BadName(target.to_string()));
        }
        self.claim(&name, false)?;
        let size =
            u32::try_from(target.len()).map_err(|_| InitramfsError::TooLarge(name.clone()))?;
        self.header(&name, S_IFLNK | 0o777, 1, size, (0, 0))?;
        self.write(target.as_bytes())?;
        self.pad(target.len())
    }

    /// Writes the trailer and returns the underlying writer (not flushed or finished:
    /// for a [`GzEncoder`] call its `finish`).
    pub fn finish(mut self) -> Result<W, InitramfsError> {
        self.next_ino = 0;
        self.header(TRAILER, 0, 1, 0, (0, 0))?;
        Ok(self.out)
    }

    /// Checks `name` is new and adds its missing parent directories; records a
    /// non-directory so nothing can be added twice or below it.
    fn claim(&mut self, name: &str, is_dir: bool) -> Result<(), InitramfsError> {
        if self.dirs.contains(name) || self.others.contains(name) {
            return Err(InitramfsError::Duplicate(name.to_string()));
        }
        let mut parent = String::new();
        let comps: Vec<&str> = name.split('/').collect();
        for comp in &comps[..comps.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            if self.others.contains(&parent) {
                return Err(InitramfsError::Duplicate(name.to_string()));
            }
            if !self.dirs.contains(&parent) {
                let p = parent.clone();
                self.header(&p, S_IFDIR | 0o755, 2, 0, (0, 0))?;
                self.dirs.insert(p);
            }
        }
        if !is_dir {
            self.others.insert(name.to_string());
        }
        Ok(())
    }

    fn header(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), InitramfsError> {
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        let namesize = name.len() + 1;
        let namesize_field =
            u32::try_from(namesize).map_err(|_| InitramfsError::BadName(name.to_string()))?;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            namesize_field,
            0, // check
        ];
        let mut hdr = Vec::with_capacity(HEADER_LEN + namesize + 3);
        hdr.extend_from_slice(NEWC_MAGIC);
        for f in fields {
            hdr.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        debug_assert_eq!(hdr.len(), HEADER_LEN);
        hdr.extend_from_slice(name.as_bytes());
        hdr.push(0);
        hdr.resize(hdr.len().next_multiple_of(4), 0);
        self.write(&hdr)
    }

    fn write(&mut self, data: &[u8]) -> Result<(), InitramfsError> {
        self.out
            .write_all(data)
            .map_err(io_err("cannot write the initramfs"))
    }

    fn pad(&mut self, len: usize) -> Result<(), InitramfsError> {
        let pad = len.next_multiple_of(4) - len;
        self.write(&[0u8; 3][..pad])
    }
}

/// A gzip-compressed archive being written to a file.
pub type GzCpioWriter = CpioWriter<GzEncoder<BufWriter<File>>>;

/// Creates `path` and returns a writer that gzips the archive into it.
pub fn create_gz(path: &Path) -> Result<GzCpioWriter, InitramfsError> {
    let file = File::create(path).map_err(io_err(format!("cannot create {}", path.display())))?;
    Ok(CpioWriter::new(GzEncoder::new(
        BufWriter::new(file),
        Compression::default(),
    )))
}

/// Writes the trailer, finishes the gzip stream and flushes the file.
pub fn finish_gz(writer: GzCpioWriter, path: &Path) -> Result<(), InitramfsError> {
    let what = || format!("cannot write {}", path.display());
    let gz = writer.finish()?;
    let mut buf = gz.finish().map_err(io_err(what()))?;
    buf.flush().map_err(io_err(what()))?;
    let file = buf.into_inner().map_err(|e| InitramfsError::Io {
        what: what(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_err(what()))
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Stored name, without a leading `/`.
    pub name: String,
    /// Full `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
    /// Device numbers for device nodes, `(major, minor)`.
    pub rdev: (u32, u32),
    /// Contents of a regular file, or the target of a symlink.
    pub data: Vec<u8>,
}

impl Entry {
    /// The file type bits (`mode & S_IFMT`).
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }

    /// The permission bits (`mode & 0o7777`).
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }

    /// An `ls -l`-like line: type+permissions, size or device numbers, name (and link target).
    pub fn describe(&self) -> String {
        let t = match self.file_type() {
            S_IFDIR => 'd',
            S_IFREG => '-',
            S_IFCHR => 'c',
            S_IFLNK => 'l',
            _ => '?',
        };
        let mut perms = String::new();
        for shift in [6, 3, 0] {
            let bits = (self.mode >> shift) & 7;
            perms.push(if bits & 4 != 0 { 'r' } else { '-' });
            perms.push(if bits & 2 != 0 { 'w' } else { '-' });
            let sticky = shift == 0 && self.mode & 0o1000 != 0;
            perms.push(match (bits & 1 != 0, sticky) {
                (true, true) => 't',
                (false, true) => 'T',
                (true, false) => 'x',
                (false, false) => '-',
            });
        }
        let size = match self.file_type() {
            S_IFCHR => format!("{}, {}", self.rdev.0, self.rdev.1),
            _ => self.data.len().to_string(),
        };
        let mut line = format!("{t}{perms} {size:>10} /{}", self.name);
        if self.file_type() == S_IFLNK {
            line.push_str(" -> ");
            line.push_str(&String::from_utf8_lossy(&self.data));
        }
        line
    }
}

/// Reads every entry of a newc archive, gzip-compressed or not, up to its trailer.
/// Strict: bad magic, non-hex fields, non-zero padding or a missing trailer are errors.
pub fn read_archive(bytes: &[u8]) -> Result<Vec<Entry>, InitramfsError> {
    let owned;
    let data: &[u8] = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(io_err("cannot decompress the initramfs (corrupt gzip)"))?;
        owned = out;
        &owned
    } else {
        bytes
    };
    let corrupt = |offset: usize, why: &str| InitramfsError::Corrupt {
        offset,
        why: why.to_string(),
    };
    let take = |pos: usize, len: usize, what: &str| {
        data.get(pos..pos + len)
            .ok_or_else(|| corrupt(pos, &format!("archive ends inside {what}")))
    };
    let check_padding = |from: usize, to: usize| -> Result<(), InitramfsError> {
        let pad = take(from, to - from, "padding")?;
        if pad.iter().any(|&b| b != 0) {
            return Err(corrupt(from, "non-zero padding"));
        }
        Ok(())
    };
    let mut entries = Vec::new();
    let mut pos = 0;
    loop {
        let hdr = take(pos, HEADER_LEN, "a header")?;
        if &hdr[..6] != NEWC_MAGIC {
            return Err(corrupt(pos, "bad magic (expected 070701)"));
        }
        let mut fields = [0u32; 13];
        for (i, f) in fields.iter_mut().enumerate() {
            let raw = &hdr[6 + 8 * i..14 + 8 * i];
            let text = std::str::from_utf8(raw).map_err(|_| corrupt(pos, "non-ASCII field"))?;
            if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(corrupt(pos + 6 + 8 * i, "field is not 8 hex digits"));
            }
            *f = u32::from_str_radix(text, 16).map_err(|_| corrupt(pos, "bad hex field"))?;
        }
        let [_ino, mode, uid, gid, nlink, mtime, filesize, _dmaj, _dmin, rmaj, rmin, namesize, _check] =
            fields;
        let namesize = namesize as usize;
        if namesize == 0 {
            return Err(corrupt(pos, "empty name"));
        }
        let name_start = pos + HEADER_LEN;
        let raw_name = take(name_start, namesize, "a name")?;
        if raw_name[namesize - 1] != 0 || raw_name[..namesize - 1].contains(&0) {
            return Err(corrupt(name_start, "name is not NUL-terminated"));
        }
        let name = String::from_utf8(raw_name[..namesize - 1].to_vec())
            .map_err(|_| corrupt(name_start, "name is not UTF-8"))?;
        let data_start = (name_start + namesize).next_multiple_of(4);
        check_padding(name_start + namesize, data_start)?;
        if name == TRAILER {
            return Ok(entries);
        }
        let size = filesize as usize;
        let contents = take(data_start, size, "file data")?.to_vec();
        let next = (data_start + size).next_multiple_of(4);
        check_padding(data_start + size, next)?;
        entries.push(Entry {
            name,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev: (rmaj, rmin),
            data: contents,
        });
        pos = next;
    }
}

/// Reads the archive in `path` (see [`read_archive`]).
pub fn read_archive_file(path: &Path) -> Result<Vec<Entry>, InitramfsError> {
    let bytes = std::fs::read(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    read_archive(&bytes).map_err(|e| match e {
        InitramfsError::Corrupt { offset, why } => InitramfsError::Corrupt {
            offset,
            why: format!("{why} (in {})", path.display()),
        },
        other => other,
    })
}

/// Where [`create_gz`] writes before the caller renames into place: `<path>.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("/dev", 0o755).unwrap();
        w.add_char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.add_file("/init", 0o755, b"\x7fELF-ish").unwrap();
        w.add_file("/etc/zc/modules", 0o644, b"/lib/modules/01-a.ko\n")
            .unwrap();
        w.add_symlink("/bin/sh", "/init").unwrap();
        w.add_file("/empty", 0o600, b"").unwrap();
        w.add_dir("/tmp", 0o1777).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_names_modes_devices_contents() {
        let entries = read_archive(&sample()).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        // Parents come before children, and missing parents are created.
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "etc",
                "etc/zc",
                "etc/zc/modules",
                "bin",
                "bin/sh",
                "empty",
                "tmp"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(get("dev").mode, S_IFDIR | 0o755);
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("init").mode, 0o100_755);
        assert_eq!(get("init").data, b"\x7fELF-ish");
        assert_eq!(get("etc/zc").mode, S_IFDIR | 0o755);
        assert_eq!(get("etc/zc/modules").data, b"/lib/modules/01-a.ko\n");
        assert_eq!(get("bin/sh").mode, S_IFLNK | 0o777);
        assert_eq!(get("bin/sh").data, b"/init");
        assert_eq!(get("empty").data, b"");
        assert!(entries
            .iter()
            .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0));
    }

    #[test]
    fn exact_bytes_of_one_entry_and_trailer() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("a", 0o644, b"xyz").unwrap();
        let out = w.finish().unwrap();
        let expected_hdr = concat!(
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000003", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000"
        );
        assert_eq!(&out[..110], expected_hdr.as_bytes());
        // name "a\0" -> 112 bytes, already aligned; data 3 bytes + 1 pad.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..116], b"xyz\0");
        // Trailer: header, "TRAILER!!!\0" (11) -> 121, padded to 124.
        assert_eq!(&out[116..122], NEWC_MAGIC);
        assert_eq!(&out[116 + 110..116 + 121], b"TRAILER!!!\0");
        assert_eq!(out.len(), 116 + 124);
    }

    #[rstest]
    #[case::len0(0)]
    #[case::len1(1)]
    #[case::len2(2)]
    #[case::len3(3)]
    #[case::len4(4)]
    #[case::len5(5)]
    #[case::len4099(4099)]
    fn padding_at_every_length(#[case] len: usize) {
        for name_len in 1..=5 {
            let name = "n".repeat(name_len);
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 1).to_le_bytes()[0]).collect();
            let mut w = CpioWriter::new(Vec::new());
            w.add_file(&name, 0o644, &data).unwrap();
            w.add_file("after", 0o600, b"z").unwrap();
            let out = w.finish().unwrap();
            assert_eq!(out.len() % 4, 0);
            let e = read_archive(&out).unwrap();
            assert_eq!(e.len(), 2);
            assert_eq!(e[0].name, name);
            assert_eq!(e[0].data, data);
            assert_eq!(e[1].name, "after");
            assert_eq!(e[1].data, b"z");
        }
    }

    #[test]
    fn gzip_round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initrd.img");
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        let mut w = create_gz(&path).unwrap();
        w.add_file_from_path("/x/y", 0o640, &src).unwrap();
        finish_gz(w, &path).unwrap();
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(&raw[..2], &[0x1f, 0x8b], "gzip magic");
        let e = read_archive_file(&path).unwrap();
        assert_eq!(e[1].name, "x/y");
        assert_eq!(e[1].mode, S_IFREG | 0o640);
        assert_eq!(e[1].data, b"hello");
    }

    #[test]
    fn reader_rejects_damage() {
        let good = sample();
        assert!(read_archive(&good).is_ok());
        // Missing trailer.
        let cut = &good[..good.len() - 124];
        assert!(matches!(
            read_archive(cut),
            Err(InitramfsError::Corrupt { .. })
        ));
        // Bad magic.
        let mut bad = good.clone();
        bad[5] = b'2';
        assert!(read_archive(&bad).is_err());
        // Non-hex field.
        let mut bad = good.clone();
        bad[10] = b'g';
        assert!(read_archive(&bad).is_err());
        // Non-zero name padding: "dev\0" ends at 114, padded to 116.
        let mut bad = good.clone();
        assert_eq!(&bad[110..114], b"dev\0");
        bad[115] = 1;
        assert!(read_archive(&bad).is_err());
    }

    #[test]
    fn bad_names_and_duplicates_are_errors() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a/../b", "a//b", "./a", "TRAILER!!!"] {
            assert!(
                matches!(w.add_dir(bad, 0o755), Err(InitramfsError::BadName(_))),
                "{bad:?}"
            );
        }
        w.add_file("/f", 0o644, b"").unwrap();
        assert!(matches!(
            w.add_file("f", 0o644, b""),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            w.add_file("/f/g", 0o644, b""),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(matches!(
            w.add_dir("/f", 0o755),
            Err(InitramfsError::Duplicate(_))
        ));
        w.add_dir("/d", 0o755).unwrap();
        w.add_dir("/d", 0o755).unwrap();
        let e = read_archive(&w.finish().unwrap()).unwrap();
        assert_eq!(e.iter().filter(|e| e.name == "d").count(), 1);
    }

    #[test]
    fn describe_lines() {
        let e = read_archive(&sample()).unwrap();
        let lines: Vec<String> = e.iter().map(Entry::describe).collect();
        assert_eq!(lines[1], "crw-------       5, 1 /dev/console");
        assert_eq!(lines[2], "-rwxr-xr-x          8 /init");
        assert_eq!(lines[7], "lrwxrwxrwx          5 /bin/sh -> /init");
        assert_eq!(lines[9], "drwxrwxrwt          0 /tmp");
    }
}
