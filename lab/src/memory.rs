//! Guest memory on the lab's VMs.
//!
//! On the VMs these benches run on, the first write to guest memory that the
//! host has taken back (free pages are reported to it) costs several times a
//! plain write: a 1 GiB `dd` to a new file took 1.97 s of system time, and
//! 0.20 s when run again straight after (2026-12-07). A daemon that fills
//! the page cache with a new blob pays that in whichever stage first touches
//! the page, which no real node does; a baseline that reads a cached blob
//! pays nothing. Benchmarks warm as much memory as the next measured
//! transfer will fill, so that both sides start from backed pages.

use std::io::Write;

/// Writes and deletes a file of `bytes` in the temp dir: the pages it
/// dirtied are freed back to the guest's free lists, backed by the host,
/// where the next page-cache fill takes them.
pub fn warm(bytes: u64) {
    let path = std::env::temp_dir().join(format!("damselfly-warm-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        let chunk = vec![0u8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    if let Err(e) = result {
        eprintln!(
            "warming {bytes} bytes of memory failed (figures may include first-touch costs): {e}"
        );
    }
}
