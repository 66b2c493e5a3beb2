//! Which pieces of a piece download are on disk: a journal beside the
//! partial file (`tmp/<hex>.pieces`, [`crate::store::Store::pieces_path`]),
//! so that a piece download resumes after the daemon restarts instead of
//! fetching the whole blob again.
//!
//! A text file: a header with the blob's size and the piece size, then one
//! line per event, appended as it happens:
//! - `k`: piece `k` is on disk, whole;
//! - `k+len`: the first `len` bytes of piece `k` are on disk (written as a
//!   piece download crosses each checksum chunk, so a restart goes on from
//!   the last whole MiB of a piece that was in flight, and a holder asked
//!   for the rest still sends checksums, which start on a chunk).
//!
//! The bytes reach the page cache before their line, so a killed daemon
//! never finds journaled bytes unwritten; after a power cut it might, and
//! the blob's digest (checked over the whole file before the commit)
//! catches that: a digest mismatch compares every resumed piece with the
//! origin's bytes, as it does pieces from peers. A torn last line, a header
//! for another piece size, a piece out of range or a length past its piece
//! make the journal unusable, and the download starts empty, as it did
//! before the journal. (So does a daemon from before `k+len` lines, rolled
//! back onto a newer one's journal: it fetches the blob again, and serves
//! nothing wrong.)

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

const MAGIC: &str = "damselfly-pieces 1";

/// What a journal says: the blob's size, the piece size, the pieces that
/// are done, and how far each unfinished piece got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub size: u64,
    pub piece_size: u64,
    /// Sorted, without repeats.
    pub done: Vec<usize>,
    /// Pieces not in `done` with bytes on disk from their start: (piece,
    /// bytes), sorted by piece, the furthest line of each.
    pub partial: Vec<(usize, u64)>,
}

impl Resume {
    /// Bytes from the start of the blob on disk without a gap (done
    /// pieces, then the first missing piece's journaled bytes): what a
    /// sequential download can keep of a piece download.
    pub fn contiguous(&self) -> u64 {
        let run = self
            .done
            .iter()
            .enumerate()
            .take_while(|(i, k)| *i == **k)
            .count();
        let tail = self
            .partial
            .iter()
            .find(|(k, _)| *k == run)
            .map_or(0, |(_, len)| *len);
        (run as u64 * self.piece_size + tail).min(self.size)
    }

    /// The bytes of piece `k` on disk from its start, by the journal.
    pub fn have(&self, k: usize) -> u64 {
        if self.done.binary_search(&k).is_ok() {
            let start = k as u64 * self.piece_size;
            return self.piece_size.min(self.size.saturating_sub(start));
        }
        self.partial
            .binary_search_by_key(&k, |(p, _)| *p)
            .map_or(0, |i| self.partial[i].1)
    }
}

/// Reads the journal at `path` of a blob of at most `max_size` bytes.
/// `None` when there is none or it cannot be trusted.
pub fn read(path: &Path, max_size: u64) -> Option<Resume> {
    // Above any real journal (a 1 TiB blob of 8 MiB pieces: 131072 lines
    // of at most 7 bytes for whole pieces, and about a million of at most
    // 15 for each MiB, 17 MiB in all), so a corrupt file cannot fill
    // memory.
    const MAX_LEN: u64 = 32 << 20;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_LEN {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    parse(&text, max_size)
}

fn parse(text: &str, max_size: u64) -> Option<Resume> {
    // Only whole lines: the last one may have been cut by a crash.
    let whole = &text[..text.rfind('\n')? + 1];
    let mut lines = whole.lines();
    let header = lines.next()?.strip_prefix(MAGIC)?;
    let mut size = None;
    let mut piece = None;
    for field in header.split_whitespace() {
        match field.split_once('=')? {
            ("size", v) => size = Some(v.parse::<u64>().ok()?),
            ("piece", v) => piece = Some(v.parse::<u64>().ok()?),
            _ => return None,
        }
    }
    let (size, piece_size) = (size?, piece?);
    if piece_size == 0 || size > max_size {
        return None;
    }
    let n = size.div_ceil(piece_size).max(1);
    let mut done = Vec::new();
    let mut partial = std::collections::BTreeMap::new();
    for line in lines {
        let (k, len) = match line.split_once('+') {
            Some((k, len)) => (k, Some(len.parse::<u64>().ok()?)),
            None => (line, None),
        };
        let k: u64 = k.parse().ok()?;
        if k >= n {
            return None;
        }
        let piece_len = piece_size.min(size.saturating_sub(k * piece_size));
        match len {
            None => done.push(k as usize),
            Some(len) if len > piece_len => return None,
            Some(len) => {
                let e = partial.entry(k as usize).or_insert(0);
                *e = len.max(*e);
            }
        }
    }
    done.sort_unstable();
    done.dedup();
    let partial = partial
        .into_iter()
        .filter(|(k, len)| *len > 0 && done.binary_search(k).is_err())
        .collect();
    Some(Resume {
        size,
        piece_size,
        done,
        partial,
    })
}

/// An open journal that pieces are appended to.
pub struct Journal {
    file: File,
}

impl Journal {
    /// Starts a new journal at `path` for a blob of `size` bytes.
    pub fn create(path: &Path, size: u64, piece_size: u64) -> io::Result<Journal> {
        let mut file = File::create(path)?;
        file.write_all(format!("{MAGIC} size={size} piece={piece_size}\n").as_bytes())?;
        Ok(Journal { file })
    }

    /// Goes on appending to the journal at `path`, after whole lines only.
    pub fn reopen(path: &Path) -> io::Result<Journal> {
        let text = std::fs::read(path)?;
        let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(keep as u64)?;
        let mut j = Journal { file };
        use std::io::Seek;
        j.file.seek(io::SeekFrom::End(0))?;
        Ok(j)
    }

    /// Records that piece `k` is on disk: one `write` of one line.
    pub fn done(&mut self, k: usize) -> io::Result<()> {
        self.file.write_all(format!("{k}\n").as_bytes())
    }

    /// Records that the first `len` bytes of piece `k` are on disk.
    pub fn partial(&mut self, k: usize, len: u64) -> io::Result<()> {
        self.file.write_all(format!("{k}+{len}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 40;

    #[test]
    fn what_is_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pieces");
        let mut j = Journal::create(&p, 10 * 8 + 3, 8).unwrap();
        for k in [3, 0, 10, 1] {
            j.done(k).unwrap();
        }
        drop(j);
        let r = read(&p, MAX).unwrap();
        assert_eq!((r.size, r.piece_size), (83, 8));
        assert_eq!(r.done, vec![0, 1, 3, 10]);
        assert_eq!(r.contiguous(), 16);
        let mut j = Journal::reopen(&p).unwrap();
        j.done(2).unwrap();
        assert_eq!(read(&p, MAX).unwrap().contiguous(), 32);
        // Every piece: the whole blob, not a piece more.
        for k in 4..10 {
            j.done(k).unwrap();
        }
        assert_eq!(read(&p, MAX).unwrap().contiguous(), 83);
    }

    #[test]
    fn partial_pieces_are_read_back_furthest_first_and_whole_ones_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pieces");
        // 10 pieces of 8 bytes and a tail of 3.
        let mut j = Journal::create(&p, 83, 8).unwrap();
        j.partial(1, 2).unwrap();
        j.partial(1, 6).unwrap();
        j.done(0).unwrap();
        j.partial(4, 4).unwrap();
        j.done(4).unwrap();
        j.partial(10, 2).unwrap();
        j.partial(7, 0).unwrap();
        drop(j);
        let r = read(&p, MAX).unwrap();
        assert_eq!(r.done, vec![0, 4]);
        assert_eq!(r.partial, vec![(1, 6), (10, 2)]);
        assert_eq!((r.have(0), r.have(1), r.have(4)), (8, 6, 8));
        assert_eq!((r.have(2), r.have(7), r.have(10)), (0, 0, 2));
        // Piece 0 whole, then 6 bytes of piece 1.
        assert_eq!(r.contiguous(), 14);
        let mut j = Journal::reopen(&p).unwrap();
        j.done(1).unwrap();
        j.done(2).unwrap();
        j.done(3).unwrap();
        // Piece 5, the first missing one, has nothing: the run ends at 40.
        assert_eq!(read(&p, MAX).unwrap().contiguous(), 40);
        for k in 5..10 {
            j.done(k).unwrap();
        }
        // The tail's 2 of 3 bytes.
        assert_eq!(read(&p, MAX).unwrap().contiguous(), 82);
        j.partial(10, 3).unwrap();
        assert_eq!(read(&p, MAX).unwrap().contiguous(), 83);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_appends_go_after_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pieces");
        std::fs::write(&p, format!("{MAGIC} size=100 piece=10\n0\n1\n9")).unwrap();
        assert_eq!(read(&p, MAX).unwrap().done, vec![0, 1]);
        let mut j = Journal::reopen(&p).unwrap();
        j.done(5).unwrap();
        assert_eq!(read(&p, MAX).unwrap().done, vec![0, 1, 5]);
    }

    #[test]
    fn journals_that_cannot_be_trusted_are_not_used() {
        let ok = format!("{MAGIC} size=100 piece=10\n0\n");
        assert!(parse(&ok, MAX).is_some());
        let cases = [
            // Pieces past the end, or not numbers.
            format!("{MAGIC} size=100 piece=10\n10\n"),
            format!("{MAGIC} size=100 piece=10\n-1\n"),
            format!("{MAGIC} size=100 piece=10\nx\n"),
            // Partial lengths past their piece (the tail is 5 bytes), or
            // not numbers.
            format!("{MAGIC} size=100 piece=10\n3+11\n"),
            format!("{MAGIC} size=95 piece=10\n9+6\n"),
            format!("{MAGIC} size=100 piece=10\n3+\n"),
            format!("{MAGIC} size=100 piece=10\n3+-1\n"),
            format!("{MAGIC} size=100 piece=10\n+3\n"),
            format!("{MAGIC} size=100 piece=10\n10+1\n"),
            // A size past the limit, a piece size of 0, fields missing or
            // unknown, another version, no header.
            format!("{MAGIC} size=1099511627777 piece=10\n"),
            format!("{MAGIC} size=100 piece=0\n"),
            format!("{MAGIC} size=100\n"),
            format!("{MAGIC} size=100 piece=10 extra=1\n"),
            "damselfly-pieces 2 size=100 piece=10\n".to_owned(),
            "no header at all\n".to_owned(),
            String::new(),
            // No whole line.
            format!("{MAGIC} size=100 piece=10"),
        ];
        for text in &cases {
            assert_eq!(parse(text, MAX), None, "{text:?}");
        }
    }

    #[test]
    fn an_oversized_or_odd_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path(), MAX), None);
        assert_eq!(read(&dir.path().join("none"), MAX), None);
        let p = dir.path().join("big");
        let f = File::create(&p).unwrap();
        f.set_len(33 << 20).unwrap();
        assert_eq!(read(&p, MAX), None);
    }
}
