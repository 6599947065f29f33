//! What the real-kernel tests share: finding the unpacked Debian kernels in
//! `images/cache`, and the rule for an empty cache (a SKIP line, or a failure when
//! `ZC_REQUIRE_KERNEL_CACHE` is set, as `make test` does).

use std::path::{Path, PathBuf};

use zc_images::kernel;

/// The unpacked kernels in `images/cache`, sorted; `None` (after printing a SKIP
/// line) when there are none and the cache is not required.
pub fn cached_kernels_or_skip(test: &str) -> Option<Vec<PathBuf>> {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("cache");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&cache)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join(kernel::KERNEL_JSON).is_file())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    if dirs.is_empty() {
        assert!(
            std::env::var_os("ZC_REQUIRE_KERNEL_CACHE").is_none(),
            "ZC_REQUIRE_KERNEL_CACHE is set but images/cache holds no kernel"
        );
        println!("SKIP {test}: images/cache holds no unpacked kernel (run `zc-image kernel --flavour cloud`)");
        return None;
    }
    Some(dirs)
}
