//! Byte ranges: the `Range` request header and the `Content-Range`
//! response header (RFC 9110 14.2 and 14.4).
//!
//! Every part of the daemon parses them here: the mirror and the data plane
//! the `Range` a client or a peer sends, the fetch engine and the swarm the
//! `Content-Range` an origin or a peer answers with. The parsers are pure
//! functions over `&str`, so a fuzzer calls them as the daemon does.

use std::fmt;

/// The one byte range of a `Range` header, as written: not yet resolved
/// against a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=<first>-<last>`, `last` inclusive, `first <= last`.
    Bounded { first: u64, last: u64 },
    /// `bytes=<first>-`: from `first` to the end.
    From { first: u64 },
    /// `bytes=-<len>`: the last `len` bytes.
    Suffix { len: u64 },
}

/// Why a `Range` header is not one byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("the range unit is not bytes")]
    Unit,
    #[error("more than one range")]
    Multiple,
    #[error("a range bound is not a number of at most 20 digits")]
    Malformed,
    #[error("the range ends before it starts")]
    Reversed,
}

/// Parses a `Range` header value that asks for one byte range.
///
/// Whitespace around the value and around each bound is allowed, as the
/// mirror always took it; a bound over `u64::MAX` is malformed.
pub fn parse_range(value: &str) -> Result<ByteRange, RangeError> {
    let spec = value
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Unit)?;
    if spec.contains(',') {
        return Err(RangeError::Multiple);
    }
    let (a, b) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| s.parse::<u64>().map_err(|_| RangeError::Malformed);
    match (a.is_empty(), b.is_empty()) {
        (true, false) => Ok(ByteRange::Suffix { len: num(b)? }),
        (false, true) => Ok(ByteRange::From { first: num(a)? }),
        (false, false) => {
            let (first, last) = (num(a)?, num(b)?);
            if first > last {
                return Err(RangeError::Reversed);
            }
            Ok(ByteRange::Bounded { first, last })
        }
        (true, true) => Err(RangeError::Malformed),
    }
}

impl ByteRange {
    /// The bytes `[start, end)` this range selects of `size`, or `None`
    /// when it selects none (a 416).
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::Bounded { first, last } => {
                (first < size).then(|| (first, last.saturating_add(1).min(size)))
            }
            ByteRange::From { first } => (first < size).then_some((first, size)),
            ByteRange::Suffix { len: 0 } => None,
            ByteRange::Suffix { len } => Some((size.saturating_sub(len), size)),
        }
    }

    /// `first` and `last` (inclusive) of a [`ByteRange::Bounded`]: the only
    /// form a peer sends for a piece.
    pub fn bounded(self) -> Option<(u64, u64)> {
        match self {
            ByteRange::Bounded { first, last } => Some((first, last)),
            _ => None,
        }
    }
}

/// The header value, `bytes=...`.
impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ByteRange::Bounded { first, last } => write!(f, "bytes={first}-{last}"),
            ByteRange::From { first } => write!(f, "bytes={first}-"),
            ByteRange::Suffix { len } => write!(f, "bytes=-{len}"),
        }
    }
}

/// What a server answers to a `Range` header for a body of a known size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    /// `[start, end)`, never the whole body.
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// The mirror's answer to a `Range` header (`None`: no header, or one that
/// is not text) for a blob of `size` bytes. A header that does not parse,
/// multiple ranges included, is ignored and the whole blob sent, which
/// RFC 9110 14.2 allows; a range that selects no byte is a 416.
pub fn range_spec(value: Option<&str>, size: u64) -> RangeSpec {
    let Some(range) = value.and_then(|v| parse_range(v).ok()) else {
        return RangeSpec::Full;
    };
    match range.resolve(size) {
        None => RangeSpec::Unsatisfiable,
        Some((0, end)) if end == size => RangeSpec::Full,
        Some((start, end)) => RangeSpec::Partial { start, end },
    }
}

/// A `Content-Range` header of a 206: `bytes <first>-<last>/<size>`, with
/// `first <= last < size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub first: u64,
    /// Inclusive.
    pub last: u64,
    /// The whole body's size.
    pub size: u64,
}

/// Parses `bytes <first>-<last>/<size>`. The unsatisfied form
/// (`bytes */<size>`), an unknown size (`/*`) and a range that does not
/// fit the size are `None`: none of them can describe a 206's body.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, size): (u64, u64, u64) =
        (first.parse().ok()?, last.parse().ok()?, size.parse().ok()?);
    (first <= last && last < size).then_some(ContentRange { first, last, size })
}

/// The header value, `bytes <first>-<last>/<size>`.
impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bytes {}-{}/{}", self.first, self.last, self.size)
    }
}

/// The `Content-Range` of a 416 for a body of `size` bytes.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

#[cfg(test)]
mod tests;
