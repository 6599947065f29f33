//! Rewrites a DMA log (either schema, plain or zstd) in the current schema:
//! `cargo run --release -p zc-dma-log --example dma_log_convert IN OUT`, OUT
//! compressed (zstd level 1, as the VMM writes `.zst` logs) when it ends in `.zst`.
//! Prints the sizes, to compare the schemas on a real log, after reading OUT back
//! and checking that it gives exactly the records of IN.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use zc_dma_log::{is_zstd_path, DmaLogReader, RecordWriter};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [input, output] = &args[..] else {
        eprintln!("usage: dma_log_convert IN OUT[.zst]");
        std::process::exit(2);
    };
    let reader = DmaLogReader::open(input)?;
    let start = reader.header().start_unix_ns;
    let file = BufWriter::with_capacity(1 << 20, File::create(output)?);
    let out: Box<dyn Write> = if is_zstd_path(output) {
        Box::new(zstd::stream::write::Encoder::new(file, 1)?.auto_finish())
    } else {
        Box::new(file)
    };
    let mut writer = RecordWriter::new(out, start)?;
    let mut records = 0u64;
    for record in reader {
        writer.write(&record?)?;
        records += 1;
    }
    drop(writer.finish()?);
    let mut again = DmaLogReader::open(output)?;
    for (i, original) in DmaLogReader::open(input)?.enumerate() {
        let original = original?;
        match again.next() {
            Some(Ok(r)) if r == original => {}
            other => {
                return Err(format!("record {i} reads back as {other:?}, not {original:?}").into())
            }
        }
    }
    if let Some(extra) = again.next() {
        return Err(format!("{output:?} has a record more: {extra:?}").into());
    }
    println!(
        "{records} records, read back the same: {} bytes in, {} bytes out",
        std::fs::metadata(input)?.len(),
        std::fs::metadata(output)?.len()
    );
    Ok(())
}
