//! HTTP pieces that every listener and client of the daemon shares: byte
//! ranges ([`range`]) and the accept loop ([`serve`]).
//!
//! It sits at the bottom of the layers beside `oci`, and imports nothing
//! from the crate.

pub mod range;
pub mod serve;

pub use range::{
    parse_content_range, parse_range, range_spec, unsatisfied_content_range, ByteRange,
    ContentRange, RangeError, RangeSpec,
};
pub use serve::{serve, serve_hyper, Listener, ACCEPT_BACKOFF};
