//! Deterministic, incompressible pseudo-random bytes that can be regenerated
//! at any offset, so multi-GiB blobs never sit in memory and can still be
//! verified byte for byte.
//!
//! Byte `i` of stream `seed` is byte `i % 8` (little endian) of
//! `splitmix64(key(seed) + (i / 8 + 1) * GOLDEN)`: a counter-based generator,
//! so any range is cheap to produce. The stream is fixed by this file, not by
//! a crate version.

use std::io::{self, Read};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key(seed: u64) -> u64 {
    mix(seed ^ 0x6461_6d73_656c_666c) // "damselfl"
}

fn word(key: u64, index: u64) -> [u8; 8] {
    mix(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN))).to_le_bytes()
}

/// Fills `buf` with the bytes of stream `seed` starting at `offset`.
pub fn fill_random(seed: u64, offset: u64, buf: &mut [u8]) {
    let key = key(seed);
    let mut pos = offset;
    let mut out = buf;
    // Unaligned head.
    while !pos.is_multiple_of(8) && !out.is_empty() {
        out[0] = word(key, pos / 8)[(pos % 8) as usize];
        out = &mut out[1..];
        pos += 1;
    }
    let mut chunks = out.chunks_exact_mut(8);
    let mut index = pos / 8;
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word(key, index));
        index += 1;
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        let w = word(key, index);
        tail.copy_from_slice(&w[..tail.len()]);
    }
}

/// `len` bytes of stream `seed` starting at `offset`.
pub fn random_bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fill_random(seed, offset, &mut buf);
    buf
}

/// The OCI digest (`sha256:<hex>`) of the first `len` bytes of stream
/// `seed`, computed by generating them (about 1 s per GiB).
pub fn random_digest(seed: u64, len: u64) -> String {
    let mut hasher = Sha256::new();
    let mut reader = RandomReader::new(seed, len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(hasher.finalize()))
}

/// A `Read` over bytes `[offset, offset + len)` of stream `seed`.
#[derive(Debug, Clone)]
pub struct RandomReader {
    seed: u64,
    pos: u64,
    end: u64,
}

impl RandomReader {
    /// The first `len` bytes of stream `seed`.
    pub fn new(seed: u64, len: u64) -> RandomReader {
        RandomReader::range(seed, 0, len)
    }

    /// Bytes `[offset, offset + len)` of stream `seed`.
    pub fn range(seed: u64, offset: u64, len: u64) -> RandomReader {
        RandomReader {
            seed,
            pos: offset,
            end: offset.saturating_add(len),
        }
    }

    /// Bytes left to read.
    pub fn remaining(&self) -> u64 {
        self.end - self.pos
    }

    /// The next chunk of at most `max` bytes as `Bytes`, or `None` at the end.
    pub fn next_chunk(&mut self, max: usize) -> Option<Bytes> {
        let n = (self.remaining().min(max as u64)) as usize;
        if n == 0 {
            return None;
        }
        let mut buf = vec![0u8; n];
        fill_random(self.seed, self.pos, &mut buf);
        self.pos += n as u64;
        Some(Bytes::from(buf))
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.remaining().min(buf.len() as u64)) as usize;
        fill_random(self.seed, self.pos, &mut buf[..n]);
        self.pos += n as u64;
        Ok(n)
    }
}
