//! The fingerprint of every whole page of a stable file (a read-only disk image),
//! computed once, in the background, while the guest boots.
//!
//! Every disk read of a read-only image is logged with the fingerprints of what the
//! device put in guest memory, which are those of the image's pages at that offset.
//! Hashing them again on each read is most of the writer's work (XXH3 of a page costs
//! 6–10 µs under TCG, and at full disk speed that took most of the emulated host's
//! second CPU from the guest). The image cannot change while the log is in use (the
//! promise [`crate::DmaLog::stable_file`] asks for), so one pass over it gives every
//! page's fingerprint for the whole run; reads that arrive before the pass ends, and
//! pieces that are not a whole, page-aligned page of the file, are hashed as before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock, Weak};

use crate::{fingerprint, PAGE_BYTES, PAGE_SIZE};

/// Files larger than this are not indexed: the pass would take long and its table
/// (8 bytes per page: 2 MiB per GiB) would grow with the image, for little gain on
/// images whose reads are spread thin.
const MAX_INDEXED_BYTES: u64 = 4 << 30;
/// The pass reads the file in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Per-page fingerprints of one stable file, once the background pass has finished.
#[derive(Debug, Default)]
pub(super) struct PageTable {
    pages: OnceLock<Vec<u64>>,
}

impl PageTable {
    /// Starts the pass over `file` on a low-priority thread and returns the table it
    /// will fill. The pass gives up quietly when the file cannot be read (the writer
    /// then hashes every read itself), and stops early once the table is dropped.
    pub(super) fn start(file: Arc<File>) -> Arc<Self> {
        let table = Arc::new(Self::default());
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len == 0 || len > MAX_INDEXED_BYTES {
            return table;
        }
        let weak = Arc::downgrade(&table);
        let spawned = std::thread::Builder::new()
            .name("zc-dma-pages".into())
            .spawn(move || {
                crate::writer::lower_this_threads_priority();
                zc_seccomp::enter(zc_seccomp::Role::DmaLogPages);
                if let Some(pages) = hash_pages(&file, len, &weak) {
                    if let Some(table) = weak.upgrade() {
                        let _ = table.pages.set(pages);
                    }
                }
            });
        // Without the thread the table stays empty, which only costs speed.
        drop(spawned);
        table
    }

    /// The fingerprint of the whole page at `offset` in the file, if `offset` is a
    /// multiple of the page size and the pass has finished.
    pub(super) fn page(&self, offset: u64) -> Option<u64> {
        if !offset.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let pages = self.pages.get()?;
        pages
            .get(usize::try_from(offset / PAGE_SIZE).ok()?)
            .copied()
    }

    /// Whether the pass has finished.
    #[cfg(test)]
    pub(super) fn is_ready(&self) -> bool {
        self.pages.get().is_some()
    }
}

/// The fingerprints of the file's whole pages (a partial last page has none), or
/// `None` if a read failed or the table was dropped meanwhile.
fn hash_pages(file: &File, len: u64, table: &Weak<PageTable>) -> Option<Vec<u64>> {
    let whole = len - len % PAGE_SIZE;
    let mut pages = Vec::with_capacity(usize::try_from(whole / PAGE_SIZE).ok()?);
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < whole {
        if table.strong_count() == 0 {
            return None;
        }
        let n = usize::try_from(whole - off).map_or(CHUNK, |left| left.min(CHUNK));
        file.read_exact_at(&mut buf[..n], off).ok()?;
        pages.extend(buf[..n].chunks(PAGE_BYTES).map(fingerprint));
        off += n as u64;
    }
    Some(pages)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;

    fn wait_ready(table: &PageTable) {
        let give_up = Instant::now() + Duration::from_secs(10);
        while !table.is_ready() {
            assert!(Instant::now() < give_up, "the pass never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn whole_pages_get_the_fingerprint_of_their_bytes() {
        let mut f = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..(3 * CHUNK + 2 * PAGE_BYTES + 100))
            .map(|i| (i * 7 + i / 4096).to_le_bytes()[0])
            .collect();
        f.write_all(&bytes).unwrap();
        let table = PageTable::start(Arc::new(f));
        wait_ready(&table);
        let page = PAGE_BYTES;
        for index in [0usize, 1, 255, 256, 3 * 256 + 1] {
            let start = index * page;
            assert_eq!(
                table.page(start as u64),
                Some(fingerprint(&bytes[start..start + page])),
                "page {index}"
            );
        }
        // The partial last page, offsets past the end, and unaligned offsets: none.
        assert_eq!(table.page((3 * 256 + 2) as u64 * PAGE_SIZE), None);
        assert_eq!(table.page(1 << 40), None);
        assert_eq!(table.page(512), None);
    }

    #[test]
    fn an_empty_file_gives_no_pages() {
        let table = PageTable::start(Arc::new(tempfile::tempfile().unwrap()));
        assert_eq!(table.page(0), None);
    }
}
