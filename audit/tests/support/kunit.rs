//! Where the kernel's own KTAP parser is, for the tests that check zc's KTAP with it
//! (included with `#[path]` by each crate's test that needs it).

use std::path::PathBuf;
use std::process::Command;

/// `kunit.py` of the kernel tree `make kunit` fetches (`ZC_KUNIT_DIR`, or the
/// newest `~/.cache/zc/kunit-*`), or why there is none.
pub fn kunit_py() -> Result<PathBuf, String> {
    if Command::new("python3").arg("--version").output().is_err() {
        return Err("python3 is not installed".into());
    }
    let dir = match std::env::var_os("ZC_KUNIT_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let cache = PathBuf::from(std::env::var_os("HOME").ok_or("no HOME")?).join(".cache/zc");
            let mut found: Vec<PathBuf> = std::fs::read_dir(&cache)
                .map_err(|e| format!("{}: {e}", cache.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("kunit-"))
                })
                .collect();
            found.sort();
            found
                .pop()
                .ok_or("no ~/.cache/zc/kunit-* (make kunit fetches it)")?
        }
    };
    let py = dir.join("tools/testing/kunit/kunit.py");
    if py.is_file() {
        Ok(py)
    } else {
        Err(format!(
            "{} is missing (make kunit fetches it)",
            py.display()
        ))
    }
}
