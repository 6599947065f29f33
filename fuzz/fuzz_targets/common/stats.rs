//! Counters of the deep paths a run reached, printed at exit when `ZC_FUZZ_STATS` is
//! set (`make fuzz-stats` runs every target over its corpus that way): the evidence
//! that, say, an indirect chain was completed or a MRG_RXBUF frame spanned buffers,
//! which libFuzzer's coverage numbers alone do not show.

use std::collections::BTreeMap;
use std::sync::{Mutex, Once};

static COUNTS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());
static AT_EXIT: Once = Once::new();

extern "C" fn print_counts() {
    let counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("zc-fuzz-stats: {}", line.join(" "));
}

/// Adds `n` to counter `name` (no-op unless `ZC_FUZZ_STATS` is set).
pub fn count(name: &'static str, n: u64) {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ENABLED.get_or_init(|| std::env::var_os("ZC_FUZZ_STATS").is_some()) || n == 0 {
        return;
    }
    AT_EXIT.call_once(|| {
        // SAFETY: `print_counts` is a plain `extern "C" fn()` that stays valid for the
        // life of the process, which is all `atexit` asks.
        unsafe {
            libc::atexit(print_counts);
        }
    });
    *COUNTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name)
        .or_insert(0) += n;
}
