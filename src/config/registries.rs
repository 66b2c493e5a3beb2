//! The `[[registry]]` entries: which registries are mirrored, where they
//! live and how the daemon authenticates to them, and the ECR host-name
//! grammar that picks ECR auth by default (used by `origin::ecr` too).

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;

use toml::{Table, Value};
use url::Url;

use super::Validator;
use crate::oci::valid_host;

#[derive(Clone)]
pub struct RegistryConfig {
    pub host: String,
    pub endpoint: Url,
    /// Set exactly when `auth` is [`Auth::Basic`].
    pub credentials: Option<Credentials>,
    pub ca_file: Option<PathBuf>,
    pub auth: Auth,
}

/// How the daemon authenticates to a registry by itself (a puller's own
/// `Authorization` always wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    None,
    /// The configured `username` and `password_file`.
    Basic,
    /// Tokens from ECR's `GetAuthorizationToken` (see `origin::ecr`).
    Ecr(EcrAuth),
}

/// Where ECR tokens for a registry come from. Registries with equal values
/// share one cached token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EcrAuth {
    pub region: String,
    /// The account in the host name. It only keeps caches apart: a token
    /// is good for every registry that the identity may read, so the call
    /// names no `registryIds` (a deprecated field).
    pub account: Option<String>,
    /// Override of the ECR API endpoint.
    pub endpoint: Option<Url>,
    pub role_arn: Option<String>,
    /// The host is an `ecr-fips` host: use the FIPS API endpoint too.
    pub fips: bool,
}

impl Auth {
    /// The default for a host with no explicit `auth`: ECR hosts get
    /// [`Auth::Ecr`] with the account and region in their name.
    pub fn default_for(host: &str) -> Auth {
        match parse_ecr_host(host) {
            Some(h) => Auth::Ecr(EcrAuth {
                region: h.region,
                account: Some(h.account),
                endpoint: None,
                role_arn: None,
                fips: h.fips,
            }),
            None => Auth::None,
        }
    }
}

/// Basic credentials. The password never appears in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("host", &self.host)
            .field("endpoint", &self.endpoint.as_str())
            .field("credentials", &self.credentials)
            .field("ca_file", &self.ca_file)
            .field("auth", &self.auth)
            .finish()
    }
}

/// Where registry `host` really lives when no endpoint is configured.
pub fn default_endpoint(host: &str) -> Option<Url> {
    let real = if host == "docker.io" {
        "registry-1.docker.io"
    } else {
        host
    };
    Url::parse(&format!("https://{real}")).ok()
}

/// The parts of `<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrHost {
    pub account: String,
    pub region: String,
    pub fips: bool,
}

/// Parses an ECR private registry host name; `None` for any other host.
pub fn parse_ecr_host(host: &str) -> Option<EcrHost> {
    let labels: Vec<&str> = host.split('.').collect();
    let (account, dkr, ecr, region, rest) = match labels.as_slice() {
        [a, d, e, r, rest @ ..] => (*a, *d, *e, *r, rest),
        _ => return None,
    };
    let fips = match ecr {
        "ecr" => false,
        "ecr-fips" => true,
        _ => return None,
    };
    let suffix_ok = matches!(rest, ["amazonaws", "com"] | ["amazonaws", "com", "cn"]);
    (is_aws_account(account) && dkr == "dkr" && valid_aws_region(region) && suffix_ok).then(|| {
        EcrHost {
            account: account.to_owned(),
            region: region.to_owned(),
            fips,
        }
    })
}

/// An AWS account id: twelve digits.
pub fn is_aws_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// An AWS region name such as `us-east-1`, `us-gov-west-1` or `cn-north-1`.
pub fn valid_aws_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1]
            .parse::<u8>()
            .is_ok_and(|n| n > 0 && parts[parts.len() - 1].len() <= 2)
}

impl Validator {
    /// `auth` and the `ecr_*` keys of one `[[registry]]`.
    fn registry_auth(&mut self, t: &Table, at: &str, host: &str, has_user: bool) -> Auth {
        let region = self.opt_string(t, at, "ecr_region");
        if let Some(r) = region.as_deref().filter(|r| !valid_aws_region(r)) {
            self.issue(
                &format!("{at}.ecr_region"),
                &format!("{r:?} is not an AWS region like \"us-east-1\""),
            );
        }
        let endpoint = self
            .opt_string(t, at, "ecr_endpoint")
            .and_then(|s| match Url::parse(&s) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    Some(u)
                }
                _ => {
                    self.issue(
                        &format!("{at}.ecr_endpoint"),
                        &format!("{s:?} is not an http(s) URL"),
                    );
                    None
                }
            });
        let role_arn = self.opt_string(t, at, "role_arn");
        if let Some(r) = role_arn
            .as_deref()
            .filter(|r| !(r.starts_with("arn:") && r.contains(":role/")))
        {
            self.issue(
                &format!("{at}.role_arn"),
                &format!("{r:?} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
            );
        }
        let parsed = parse_ecr_host(host);
        let kind = match self.opt_string(t, at, "auth").as_deref() {
            Some(k @ ("none" | "basic" | "ecr")) => k.to_owned(),
            Some(other) => {
                self.issue(
                    &format!("{at}.auth"),
                    &format!("must be \"none\", \"basic\" or \"ecr\", not {other:?}"),
                );
                return Auth::None;
            }
            None if has_user => "basic".into(),
            None if parsed.is_some() => "ecr".into(),
            None => "none".into(),
        };
        if kind != "ecr" {
            for key in ["ecr_region", "ecr_endpoint", "role_arn"] {
                if t.contains_key(key) {
                    self.issue(
                        &format!("{at}.{key}"),
                        &format!("is only used with auth = \"ecr\", not {kind:?}"),
                    );
                }
            }
        }
        match kind.as_str() {
            "basic" => {
                if !has_user {
                    self.issue(
                        &format!("{at}.auth"),
                        "\"basic\" needs username and password_file",
                    );
                }
                Auth::Basic
            }
            "ecr" => {
                if has_user {
                    self.issue(
                        &format!("{at}.username"),
                        "username and password_file are for auth = \"basic\", not \"ecr\"",
                    );
                }
                let Some(region) = region.or_else(|| parsed.as_ref().map(|p| p.region.clone()))
                else {
                    self.issue(
                        &format!("{at}.ecr_region"),
                        "is required with auth = \"ecr\" when the host is not an ECR host name",
                    );
                    return Auth::None;
                };
                Auth::Ecr(EcrAuth {
                    region,
                    account: parsed.as_ref().map(|p| p.account.clone()),
                    endpoint,
                    role_arn,
                    fips: parsed.is_some_and(|p| p.fips),
                })
            }
            _ => {
                if has_user {
                    self.issue(
                        &format!("{at}.username"),
                        "username and password_file need auth = \"basic\"",
                    );
                }
                Auth::None
            }
        }
    }

    pub(super) fn registries(&mut self, root: &Table) -> Vec<RegistryConfig> {
        let items = match root.get("registry") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.issue("registry", "must be an array of tables ([[registry]])");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let at = format!("registry[{i}]");
            let Value::Table(t) = item else {
                self.issue(&at, "must be a table");
                continue;
            };
            self.check_keys(t, "registry[]", &at);
            let Some(host) = self.opt_string(t, &at, "host") else {
                if !t.contains_key("host") {
                    self.issue(&format!("{at}.host"), "is required");
                }
                continue;
            };
            if let Err(e) = valid_host(&host) {
                self.issue(&format!("{at}.host"), &e);
                continue;
            }
            if !seen.insert(host.clone()) {
                self.issue(&format!("{at}.host"), &format!("{host:?} is listed twice"));
            }
            let endpoint = match self.opt_string(t, &at, "endpoint") {
                None => default_endpoint(&host),
                Some(s) => {
                    match Url::parse(&s) {
                        Ok(u)
                            if matches!(u.scheme(), "http" | "https")
                                && u.host_str().is_some()
                                && u.path() == "/"
                                && u.query().is_none()
                                && u.username().is_empty() =>
                        {
                            Some(u)
                        }
                        Ok(_) => {
                            self.issue(
                            &format!("{at}.endpoint"),
                            &format!("{s:?} must be http(s)://host[:port] with no path, query or user"),
                        );
                            None
                        }
                        Err(e) => {
                            self.issue(&format!("{at}.endpoint"), &format!("{s:?}: {e}"));
                            None
                        }
                    }
                }
            };
            let username = self.opt_string(t, &at, "username");
            let password_file = self.opt_path(t, &at, "password_file");
            let credentials = match (username, password_file) {
                (Some(username), Some(file)) => {
                    match super::read_secret(&file, 64 << 10).and_then(|b| {
                        String::from_utf8(b).map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text")
                        })
                    }) {
                        Ok(p) => Some(Credentials {
                            username,
                            password: p.trim_end_matches(['\r', '\n']).to_owned(),
                        }),
                        Err(e) => {
                            self.issue(
                                &format!("{at}.password_file"),
                                &format!("cannot read {}: {e}", file.display()),
                            );
                            None
                        }
                    }
                }
                (Some(_), None) => {
                    self.issue(&format!("{at}.password_file"), "is required with username");
                    None
                }
                (None, Some(_)) => {
                    self.issue(&format!("{at}.username"), "is required with password_file");
                    None
                }
                (None, None) => None,
            };
            let ca_file = self.opt_path(t, &at, "ca_file");
            if let Some(ca) = &ca_file {
                if let Err(e) = std::fs::metadata(ca) {
                    self.issue(
                        &format!("{at}.ca_file"),
                        &format!("cannot read {}: {e}", ca.display()),
                    );
                }
            }
            let has_user = t.contains_key("username") || t.contains_key("password_file");
            let auth = self.registry_auth(t, &at, &host, has_user);
            if let Some(endpoint) = endpoint {
                out.push(RegistryConfig {
                    host,
                    endpoint,
                    credentials,
                    ca_file,
                    auth,
                });
            }
        }
        out
    }
}
