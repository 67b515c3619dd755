//! Value syntaxes of `conf/lb.toml` that TOML has no type for: durations (`"10s"`), byte sizes
//! (`"10MiB"` or an integer), address ranges (`"10.0.0.0/8"` or a bare IP) and anything with a
//! `FromStr` (key sources).
//!
//! Owns: turning one such value into its Rust type, with an error that shows the accepted forms.
//! Must not touch: which key uses which syntax or what range is allowed (the section structs and
//! the validator decide that).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// A value written as a string and parsed with its type's `FromStr`.
pub(super) fn from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// `health.expect_status`: `200`, `"200-399"`, or a list of codes and ranges.
pub(super) fn expect_status<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<super::ExpectStatus, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        Code(i64),
        Range(String),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(Item),
        Many(Vec<Item>),
    }
    let shape = "expected a status code (200), a range (\"200-399\") or a list of them ([200, \"300-399\"])";
    let raw = Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom(format!("expect_status: {shape}")))?;
    let items = match raw {
        Raw::One(i) => vec![i],
        Raw::Many(v) => v,
    };
    let code = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("{n} is not an HTTP status code (100 to 599)"))
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let range = match item {
            Item::Code(n) => code(n).map(|c| (c, c)),
            Item::Range(text) => match text.split_once('-') {
                Some((lo, hi)) => match (lo.trim().parse::<i64>(), hi.trim().parse::<i64>()) {
                    (Ok(lo), Ok(hi)) => code(lo).and_then(|lo| {
                        code(hi).and_then(|hi| {
                            if lo <= hi {
                                Ok((lo, hi))
                            } else {
                                Err(format!("range {text:?} runs backwards"))
                            }
                        })
                    }),
                    _ => Err(format!("malformed range {text:?}: {shape}")),
                },
                None => text
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("malformed status {text:?}: {shape}"))
                    .and_then(|n| code(n).map(|c| (c, c))),
            },
        };
        out.push(range.map_err(|e| serde::de::Error::custom(format!("expect_status: {e}")))?);
    }
    Ok(super::ExpectStatus(out))
}

/// `hashing.key`: one source as a string, or a list of them.
pub(super) fn key_sources<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<crate::hashing::KeySources, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let raw = Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a key source like \"query:id\", or a list of them like [\"header:x-user\", \"client_ip\"]",
        )
    })?;
    let texts = match raw {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    };
    texts
        .iter()
        .map(|t| t.parse().map_err(serde::de::Error::custom))
        .collect::<Result<Vec<_>, _>>()
        .map(crate::hashing::KeySources)
}

/// A duration as a string: `"10s"`, `"500ms"`, `"1m"`.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a duration as a string, like \"10s\", \"500ms\" or \"1m\"",
        )
    })?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}): write it like \"10s\", \"500ms\" or \"1m\""
        ))
    })
}

/// A size: an integer number of bytes, or a string with a unit (`"10MiB"`, `"512KiB"`, `"1GB"`).
pub(super) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    match Raw::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a size: bytes as an integer, or a string like \"10MiB\""))?
    {
        Raw::Int(n) => Ok(n),
        Raw::Text(s) => parse_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}: write bytes as an integer or a string like \"512KiB\", \"10MiB\", \"1GB\""
            ))
        }),
    }
}

/// Parses `"10MiB"`, `"1GB"`, `"42"` into bytes; None for anything else or an overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A list of addresses or CIDR ranges; a bare address is its own /32 or /128.
pub(super) fn ip_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is not an address or CIDR range (e.g. \"127.0.0.1\", \"10.0.0.0/8\")"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("MiB"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }
}
