use super::*;

const MAX: u64 = u64::MAX;

/// The mirror's answers, as `registry::parse_range` gave them.
#[test]
fn mirror_ranges() {
    let r = |s: &str, size| range_spec(Some(s), size);
    assert_eq!(range_spec(None, 10), RangeSpec::Full);
    assert_eq!(r("bytes=0-4", 10), RangeSpec::Partial { start: 0, end: 5 });
    assert_eq!(r("bytes=5-", 10), RangeSpec::Partial { start: 5, end: 10 });
    assert_eq!(r("bytes=-3", 10), RangeSpec::Partial { start: 7, end: 10 });
    assert_eq!(r("bytes=-30", 10), RangeSpec::Full);
    assert_eq!(r("bytes=0-", 10), RangeSpec::Full);
    assert_eq!(
        r("bytes=8-100", 10),
        RangeSpec::Partial { start: 8, end: 10 }
    );
    assert_eq!(r("bytes=10-", 10), RangeSpec::Unsatisfiable);
    assert_eq!(r("bytes=10-20", 10), RangeSpec::Unsatisfiable);
    assert_eq!(r("bytes=-0", 10), RangeSpec::Unsatisfiable);
    assert_eq!(r("bytes=0-1,3-4", 10), RangeSpec::Full);
    // An end at u64::MAX must not overflow.
    assert_eq!(
        r("bytes=5-18446744073709551615", 10),
        RangeSpec::Partial { start: 5, end: 10 }
    );
    assert_eq!(r("bytes=0-18446744073709551615", 10), RangeSpec::Full);
    assert_eq!(r("bytes=99999999999999999999-", 10), RangeSpec::Full);
    assert_eq!(r("bytes=5-2", 10), RangeSpec::Full);
    assert_eq!(r("items=0-1", 10), RangeSpec::Full);
    assert_eq!(r("bytes=x-y", 10), RangeSpec::Full);
    assert_eq!(r("bytes=0-0", 0), RangeSpec::Unsatisfiable);
}

#[test]
fn mirror_range_edges() {
    let r = |s: &str, size| range_spec(Some(s), size);
    // Whitespace around the value and the bounds, but not inside the unit.
    assert_eq!(
        r("  bytes= 2 - 3 ", 10),
        RangeSpec::Partial { start: 2, end: 4 }
    );
    assert_eq!(r("bytes =2-3", 10), RangeSpec::Full);
    assert_eq!(r("Bytes=2-3", 10), RangeSpec::Full);
    // The last byte alone, and one past it.
    assert_eq!(r("bytes=9-9", 10), RangeSpec::Partial { start: 9, end: 10 });
    assert_eq!(r("bytes=-1", 10), RangeSpec::Partial { start: 9, end: 10 });
    assert_eq!(r("bytes=9-", 10), RangeSpec::Partial { start: 9, end: 10 });
    // Huge sizes and bounds, at and past u64::MAX.
    assert_eq!(r("bytes=-18446744073709551615", MAX), RangeSpec::Full);
    assert_eq!(
        r("bytes=-5", MAX),
        RangeSpec::Partial {
            start: MAX - 5,
            end: MAX
        }
    );
    assert_eq!(
        r("bytes=18446744073709551614-", MAX),
        RangeSpec::Partial {
            start: MAX - 1,
            end: MAX
        }
    );
    assert_eq!(
        r("bytes=18446744073709551615-", MAX),
        RangeSpec::Unsatisfiable
    );
    assert_eq!(r("bytes=-18446744073709551616", 10), RangeSpec::Full);
    assert_eq!(r("bytes=0-18446744073709551616", 10), RangeSpec::Full);
    // Nothing to select from an empty blob, but a suffix is the whole of it.
    assert_eq!(r("bytes=0-", 0), RangeSpec::Unsatisfiable);
    assert_eq!(r("bytes=-5", 0), RangeSpec::Full);
    assert_eq!(r("", 10), RangeSpec::Full);
    assert_eq!(r("bytes=", 10), RangeSpec::Full);
    assert_eq!(r("bytes=-", 10), RangeSpec::Full);
    assert_eq!(r("bytes=1-2-3", 10), RangeSpec::Full);
    assert_eq!(r("bytes=0-1,", 10), RangeSpec::Full);
}

/// The data plane's piece ranges, as `swarm::data::parse_piece_range`
/// gave them: both bounds, in order.
#[test]
fn piece_ranges() {
    let p = |s: &str| parse_range(s).ok().and_then(ByteRange::bounded);
    assert_eq!(p("bytes=0-99"), Some((0, 99)));
    assert_eq!(p("bytes=5-5"), Some((5, 5)));
    assert_eq!(p("bytes=9-5"), None);
    assert_eq!(p("bytes=5-"), None);
    assert_eq!(p("bytes=-5"), None);
    assert_eq!(p("items=0-1"), None);
    assert_eq!(p("bytes=0-1,3-4"), None);
    assert_eq!(p("bytes=0-18446744073709551615"), Some((0, MAX)));
    assert_eq!(p("bytes=0-18446744073709551616"), None);
}

#[test]
fn range_errors_say_why() {
    assert_eq!(parse_range("items=0-1"), Err(RangeError::Unit));
    assert_eq!(parse_range("bytes=0-1, 3-4"), Err(RangeError::Multiple));
    assert_eq!(parse_range("bytes=5-2"), Err(RangeError::Reversed));
    for bad in [
        "bytes=",
        "bytes=-",
        "bytes=5",
        "bytes=a-1",
        "bytes=+-1",
        "bytes=1-2-3",
    ] {
        assert_eq!(parse_range(bad), Err(RangeError::Malformed), "{bad}");
    }
    assert_eq!(
        parse_range("bytes=99999999999999999999-"),
        Err(RangeError::Malformed)
    );
}

#[test]
fn ranges_print_as_they_parse() {
    for r in [
        ByteRange::Bounded { first: 0, last: 0 },
        ByteRange::Bounded {
            first: 7,
            last: MAX,
        },
        ByteRange::From { first: MAX },
        ByteRange::Suffix { len: 0 },
        ByteRange::Suffix { len: 12 },
    ] {
        assert_eq!(parse_range(&r.to_string()), Ok(r), "{r}");
    }
}

/// What `fetch::parse_content_range` gave: the start and the size.
#[test]
fn content_ranges() {
    let c = |s: &str| parse_content_range(s).map(|r| (r.first, r.size));
    assert_eq!(c("bytes 10-19/20"), Some((10, 20)));
    assert_eq!(c("bytes 0-0/1"), Some((0, 1)));
    assert_eq!(c("bytes 10-9/20"), None);
    assert_eq!(c("bytes 10-20/20"), None);
    assert_eq!(c("bytes */20"), None);
    assert_eq!(c("items 0-1/2"), None);
}

#[test]
fn content_range_edges() {
    assert_eq!(
        parse_content_range("bytes 3-7/8"),
        Some(ContentRange {
            first: 3,
            last: 7,
            size: 8
        })
    );
    assert_eq!(
        parse_content_range("bytes 0-18446744073709551614/18446744073709551615"),
        Some(ContentRange {
            first: 0,
            last: MAX - 1,
            size: MAX
        })
    );
    for bad in [
        "",
        "bytes ",
        "bytes 0-1/*",
        "bytes 0-1",
        "bytes 0/2",
        "bytes 0-1/18446744073709551616",
        "bytes 0-18446744073709551615/18446744073709551615",
        "bytes 1-2-3/9",
        "bytes=0-1/2",
        " bytes 0-1/2",
        "bytes 0-1/2/3",
        "bytes 0-0/0",
    ] {
        assert_eq!(parse_content_range(bad), None, "{bad:?}");
    }
    let r = ContentRange {
        first: 5,
        last: 9,
        size: 10,
    };
    assert_eq!(r.to_string(), "bytes 5-9/10");
    assert_eq!(parse_content_range(&r.to_string()), Some(r));
    assert_eq!(unsatisfied_content_range(10), "bytes */10");
}
