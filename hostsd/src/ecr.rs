//! ECR registry hostnames: `<account>.dkr.ecr.<region>.<partition suffix>`,
//! and the `dkr.ecr-fips` form where a region has one.

use crate::error::Error;

/// Checks a 12-digit AWS account id.
pub fn validate_account(account: &str) -> Result<(), Error> {
    if account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Error::InvalidEcr {
            what: "account",
            value: account.to_string(),
            reason: "an AWS account id is 12 digits".into(),
        })
    }
}

/// Checks a region name such as `us-east-1`, `us-gov-west-1` or `cn-north-1`.
pub fn validate_region(region: &str) -> Result<(), Error> {
    let parts: Vec<&str> = region.split('-').collect();
    let ok = parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty();
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidEcr {
            what: "region",
            value: region.to_string(),
            reason: "expected a region name such as us-east-1".into(),
        })
    }
}

/// The DNS suffix of the AWS partition a region belongs to.
fn dns_suffix(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else if region.starts_with("us-isob-") {
        "sc2s.sgov.gov"
    } else if region.starts_with("us-iso-") {
        "c2s.ic.gov"
    } else {
        "amazonaws.com"
    }
}

/// ECR has FIPS endpoints in the US commercial and GovCloud regions only.
fn has_fips(region: &str) -> bool {
    region.starts_with("us-") && !region.starts_with("us-iso")
}

/// Every account paired with every region, plus the FIPS hostnames when asked.
/// Returns the hostnames and notes about FIPS forms that do not exist.
pub fn registry_hosts(
    accounts: &[String],
    regions: &[String],
    fips: bool,
) -> Result<(Vec<String>, Vec<String>), Error> {
    for a in accounts {
        validate_account(a)?;
    }
    for r in regions {
        validate_region(r)?;
    }
    if accounts.is_empty() != regions.is_empty() {
        let (what, value) = if accounts.is_empty() {
            ("region", regions.join(","))
        } else {
            ("account", accounts.join(","))
        };
        return Err(Error::InvalidEcr {
            what,
            value,
            reason: "ECR hostnames need both account ids and regions".into(),
        });
    }
    let mut hosts = Vec::new();
    let mut notes = Vec::new();
    for region in regions {
        let suffix = dns_suffix(region);
        for account in accounts {
            hosts.push(format!("{account}.dkr.ecr.{region}.{suffix}"));
            if fips && has_fips(region) {
                hosts.push(format!("{account}.dkr.ecr-fips.{region}.{suffix}"));
            }
        }
        if fips && !has_fips(region) {
            notes.push(format!(
                "ECR has no FIPS endpoint in {region}; wrote only dkr.ecr"
            ));
        }
    }
    Ok((hosts, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn ecr_forms() {
        struct Case {
            region: &'static str,
            fips: bool,
            want: &'static [&'static str],
        }
        let cases = [
            Case {
                region: "us-east-1",
                fips: false,
                want: &["123456789012.dkr.ecr.us-east-1.amazonaws.com"],
            },
            Case {
                region: "us-west-2",
                fips: true,
                want: &[
                    "123456789012.dkr.ecr.us-west-2.amazonaws.com",
                    "123456789012.dkr.ecr-fips.us-west-2.amazonaws.com",
                ],
            },
            Case {
                region: "us-gov-west-1",
                fips: true,
                want: &[
                    "123456789012.dkr.ecr.us-gov-west-1.amazonaws.com",
                    "123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
                ],
            },
            Case {
                region: "cn-north-1",
                fips: true,
                want: &["123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"],
            },
            Case {
                region: "cn-northwest-1",
                fips: false,
                want: &["123456789012.dkr.ecr.cn-northwest-1.amazonaws.com.cn"],
            },
            Case {
                region: "eu-central-1",
                fips: true,
                want: &["123456789012.dkr.ecr.eu-central-1.amazonaws.com"],
            },
            Case {
                region: "us-iso-east-1",
                fips: false,
                want: &["123456789012.dkr.ecr.us-iso-east-1.c2s.ic.gov"],
            },
        ];
        for c in cases {
            let (hosts, notes) =
                registry_hosts(&s(&["123456789012"]), &s(&[c.region]), c.fips).unwrap();
            assert_eq!(hosts, c.want, "{}", c.region);
            assert_eq!(
                !notes.is_empty(),
                c.fips && !has_fips(c.region),
                "{}",
                c.region
            );
            for h in hosts {
                crate::registry::validate_host(&h).unwrap();
            }
        }
    }

    #[test]
    fn cross_product() {
        let (hosts, _) = registry_hosts(
            &s(&["111111111111", "222222222222"]),
            &s(&["us-east-1", "eu-west-1"]),
            false,
        )
        .unwrap();
        assert_eq!(hosts.len(), 4);
    }

    #[test]
    fn bad_input() {
        assert!(registry_hosts(&s(&["12345"]), &s(&["us-east-1"]), false).is_err());
        assert!(registry_hosts(&s(&["123456789012"]), &s(&["US-EAST-1"]), false).is_err());
        assert!(registry_hosts(&s(&["123456789012"]), &s(&["useast1"]), false).is_err());
        assert!(registry_hosts(&s(&["123456789012"]), &[], false).is_err());
        assert!(registry_hosts(&[], &s(&["us-east-1"]), false).is_err());
        assert_eq!(registry_hosts(&[], &[], true).unwrap().0.len(), 0);
    }
}
