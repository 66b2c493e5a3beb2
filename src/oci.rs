//! The OCI distribution spec's vocabulary: digests, repository names, tags,
//! references, and the error codes and JSON envelope of error responses;
//! image references and manifest descriptors in [`image`].

pub mod image;

pub use image::{valid_host, Descriptor, ImageRef, Platform, RawManifest, ReferenceError};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest repository name the distribution spec allows (total length).
const MAX_NAME_LEN: usize = 255;
/// Longest tag the distribution spec allows.
const MAX_TAG_LEN: usize = 128;

/// A `sha256:<64 lowercase hex>` content digest. damselfly only stores and
/// verifies sha256, which is what every registry in the field produces.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a digest damselfly can serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm prefix (expected sha256:<hex>)")]
    NoAlgorithm(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    UnsupportedAlgorithm(String),
    #[error("sha256 digest must be 64 lowercase hex characters, got {0:?}")]
    BadEncoding(String),
}

impl Digest {
    /// The 64-character lowercase hex encoding.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Builds a digest from raw sha256 output.
    pub fn from_sha256(bytes: &[u8]) -> Self {
        Digest {
            hex: hex::encode(bytes),
        }
    }

    /// Parses the hex part alone, as found in a store file name.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest {
                hex: hex.to_owned(),
            })
        } else {
            Err(DigestError::BadEncoding(truncate(hex)))
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, encoded) = s
            .split_once(':')
            .ok_or_else(|| DigestError::NoAlgorithm(truncate(s)))?;
        // The spec's algorithm grammar is [a-z0-9]+([+._-][a-z0-9]+)*; anything
        // else is not a digest at all, anything other than sha256 we cannot verify.
        if algo != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(truncate(algo)));
        }
        Digest::from_hex(encoded)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The string form, as [`Serialize`] writes it, so messages that carried a
/// digest as a plain string decode unchanged; anything [`FromStr`] rejects
/// fails the whole message.
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Keeps attacker-supplied strings short in error messages and logs.
fn truncate(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Checks a repository name against the distribution spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// This also rules out `..`, empty segments and any encoded characters, so a
/// valid name can never escape a directory or smuggle a query.
pub fn validate_repository(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("repository name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "repository name is {} bytes, longer than {MAX_NAME_LEN}",
            name.len()
        ));
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(format!(
                "repository name {:?} has an invalid component {:?}",
                truncate(name),
                truncate(component)
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Checks a tag against `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let b = tag.as_bytes();
    let first_ok = b
        .first()
        .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_');
    let rest_ok = b
        .iter()
        .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && b.len() <= MAX_TAG_LEN {
        Ok(())
    } else {
        Err(format!("invalid tag {:?}", truncate(tag)))
    }
}

/// What a registry serves: the two kinds of object a pull fetches. Errors
/// and metric labels name one of these, never a free string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Object {
    Blob,
    Manifest,
}

impl Object {
    /// `blob` or `manifest`, as metric labels and messages say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Object::Blob => "blob",
            Object::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// The error codes of the distribution spec that the mirror uses, plus the
/// ones distribution itself adds for ranges and unknown failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    DigestInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    RangeInvalid,
    SizeInvalid,
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorEntry<'a>; 1],
}

#[derive(Serialize)]
struct ErrorEntry<'a> {
    code: &'static str,
    message: &'a str,
}

/// The spec's error envelope: `{"errors":[{"code":..,"message":..}]}`.
pub fn error_json(code: ErrorCode, message: &str) -> String {
    let body = ErrorBody {
        errors: [ErrorEntry {
            code: code.as_str(),
            message,
        }],
    };
    // Serializing two strings cannot fail.
    serde_json::to_string(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digests() {
        let d: Digest = format!("sha256:{HEX}").parse().unwrap();
        assert_eq!(d.hex(), HEX);
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        for bad in [
            "",
            HEX,
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha512:{HEX}"),
            &format!("sha256:{HEX}0"),
            &format!("sha256:../{}", &HEX[3..]),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
            let json = serde_json::to_string(bad).unwrap();
            assert!(
                serde_json::from_str::<Digest>(&json).is_err(),
                "{bad:?} decoded"
            );
        }
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"sha256:{HEX}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn repository_names() {
        for good in [
            "a",
            "library/busybox",
            "my-org/my__app/x.y",
            "a--b",
            "0",
            "a_b",
        ] {
            assert!(validate_repository(good).is_ok(), "{good:?} rejected");
        }
        for bad in [
            "",
            "..",
            "a/../b",
            "a//b",
            "/a",
            "a/",
            "A",
            "a___b",
            "a..b",
            "a.-b",
            "-a",
            "a%2fb",
            "a b",
            &"a".repeat(256),
        ] {
            assert!(validate_repository(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tags() {
        assert!(validate_tag("v1.0_rc-1").is_ok());
        assert!(validate_tag("_x").is_ok());
        assert!(validate_tag(&"a".repeat(128)).is_ok());
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn error_envelope() {
        let v: serde_json::Value =
            serde_json::from_str(&error_json(ErrorCode::BlobUnknown, "no \"such\" blob")).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "no \"such\" blob");
    }
}
