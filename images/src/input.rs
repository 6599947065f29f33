//! Bad input, found before any work: one line that says what to do, and exit status
//! 2 (as clap's own usage errors and `zc-vmm`'s). Failures along the way exit 1.

use std::path::Path;

/// A mistake in the arguments: the message is the whole line the user sees.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Shorthand for a [`BadInput`] error.
pub fn bad<T>(line: String) -> Result<T, BadInput> {
    Err(BadInput(line))
}

/// `path` must be a regular file (or a link to one): `what` names the argument,
/// `hint` says what to pass instead.
pub fn file(what: &str, path: &Path, hint: &str) -> Result<(), BadInput> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => bad(format!(
            "{what} {} is a directory, not a file: {hint}",
            path.display()
        )),
        Ok(_) => bad(format!(
            "{what} {} is not a regular file: {hint}",
            path.display()
        )),
        Err(_) => bad(format!("{what} {} does not exist: {hint}", path.display())),
    }
}

/// `path` must be a directory.
pub fn dir(what: &str, path: &Path, hint: &str) -> Result<(), BadInput> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bad(format!(
            "{what} {} is not a directory: {hint}",
            path.display()
        )),
        Err(_) => bad(format!("{what} {} does not exist: {hint}", path.display())),
    }
}

/// `path` must exist, as anything (a file or a directory).
pub fn exists(what: &str, path: &Path, hint: &str) -> Result<(), BadInput> {
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(_) => bad(format!("{what} {} does not exist: {hint}", path.display())),
    }
}

/// A directory zc creates or writes into: it may be missing, but neither it nor an
/// ancestor may be something other than a directory.
pub fn output_dir(what: &str, path: &Path) -> Result<(), BadInput> {
    for p in path.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(m) = std::fs::metadata(p) {
            if m.is_dir() {
                return Ok(());
            }
            return bad(if p == path {
                format!(
                    "{what} {} is a file, not a directory: pass a directory (it is created if missing)",
                    path.display()
                )
            } else {
                format!(
                    "{what} {}: {} is a file, not a directory: pass a path under a directory",
                    path.display(),
                    p.display()
                )
            });
        }
    }
    Ok(())
}

/// A file zc writes: not a directory, and its directory can be there.
pub fn output_file(what: &str, path: &Path) -> Result<(), BadInput> {
    if path.is_dir() {
        return bad(format!(
            "{what} {} is a directory: pass the file to write, e.g. {}",
            path.display(),
            path.join("out.img").display()
        ));
    }
    if path.file_name().is_none() {
        return bad(format!(
            "{what} {} names no file: pass the file to write",
            path.display()
        ));
    }
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => output_dir(&format!("{what}'s directory"), parent),
        None => Ok(()),
    }
}

/// The first bytes of `path` (fewer if it is shorter), to tell its type.
pub fn magic(path: &Path, len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(len);
    std::fs::File::open(path)?
        .take(len as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_directories_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(file("--x", &f, "h").is_ok());
        let e = file("--x", d.path(), "pass a file")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a directory, not a file: pass a file"), "{e}");
        let e = file("--x", &d.path().join("no"), "h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(dir("--d", d.path(), "h").is_ok());
        let e = dir("--d", &f, "h").unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        assert!(exists("--e", &f, "h").is_ok() && exists("--e", d.path(), "h").is_ok());
    }

    #[test]
    fn outputs_may_be_missing_but_not_under_a_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(output_dir("--out", &d.path().join("a/b")).is_ok());
        assert!(output_dir("--out", d.path()).is_ok());
        let e = output_dir("--out", &f).unwrap_err().to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
        let e = output_dir("--out", &f.join("sub")).unwrap_err().to_string();
        assert!(e.contains(&format!("{} is a file", f.display())), "{e}");
        assert!(output_file("--out", &d.path().join("new/x.img")).is_ok());
        assert!(
            output_file("--out", &f).is_ok(),
            "an existing file is replaced"
        );
        let e = output_file("--out", d.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let e = output_file("--out", &f.join("x.img"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
    }

    #[test]
    fn magic_reads_at_most_what_is_asked() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "070701rest").unwrap();
        assert_eq!(magic(&f, 6).unwrap(), b"070701");
        std::fs::write(&f, "07").unwrap();
        assert_eq!(magic(&f, 6).unwrap(), b"07");
    }
}
