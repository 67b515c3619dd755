//! The syntax of the replica spec's values in `[provider]`: mounts (`"/srv/site:/www"`,
//! `"data:/var/lib/app:rw"`), the process port mode, and the `{port}`, `{hostname}`, `{id}`
//! placeholders of `command`, `args` and `env`.
//!
//! Owns: turning one such value into its type and back, and [`expand`], the one function that
//! fills the placeholders (providers call it when they start a replica, the validator calls
//! [`unknown_placeholders`] so a typo is refused at `ringgate check`, not at start).
//! Must not touch: which provider uses which key, or anything running: pure.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How a process replica's port is decided (`provider.port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PortMode {
    /// `announce` for the built-in `ringgate-server`, `pick` for a `command`.
    #[default]
    Auto,
    /// The gateway picks a free loopback port and passes it as `PORT` and `{port}`.
    Pick,
    /// The replica binds a port of its own choosing (`PORT=0`) and prints
    /// `listening on http://ADDR` on its standard output.
    Announce,
}

impl PortMode {
    /// Its name in `conf/lb.toml`.
    pub fn name(self) -> &'static str {
        match self {
            PortMode::Auto => "auto",
            PortMode::Pick => "pick",
            PortMode::Announce => "announce",
        }
    }
}

/// Where a mount comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountSource {
    /// A host directory or file (an absolute path once the config is loaded).
    Bind(PathBuf),
    /// A named volume of the engine (created by the engine on first use).
    Volume(String),
}

/// One entry of `provider.mounts`: `SOURCE:TARGET[:ro|:rw]`, read-only unless `:rw`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Mount {
    pub source: MountSource,
    /// An absolute path inside the container.
    pub target: String,
    pub writable: bool,
}

/// Why a mount entry cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountError {
    #[error(
        "{0:?} is not SOURCE:TARGET[:ro|:rw] (e.g. \"/srv/site:/www\" or \"data:/var/lib/app:rw\")"
    )]
    Shape(String),
    #[error("{entry:?}: the target {target:?} must be an absolute path inside the container")]
    Target { entry: String, target: String },
    #[error("{entry:?}: {mode:?} is not a mode: write :ro (the default) or :rw")]
    Mode { entry: String, mode: String },
    #[error("{entry:?}: {from:?} is neither a path (starting with /, ./ or ../) nor a volume name ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")]
    Source { entry: String, from: String },
}

impl TryFrom<String> for Mount {
    type Error = MountError;

    fn try_from(s: String) -> Result<Mount, MountError> {
        s.parse()
    }
}

impl FromStr for Mount {
    type Err = MountError;

    fn from_str(entry: &str) -> Result<Mount, MountError> {
        let parts: Vec<&str> = entry.split(':').collect();
        let (source, target, mode) = match parts.as_slice() {
            [s, t] => (*s, *t, None),
            [s, t, m] => (*s, *t, Some(*m)),
            _ => return Err(MountError::Shape(entry.to_owned())),
        };
        if source.is_empty() || target.is_empty() {
            return Err(MountError::Shape(entry.to_owned()));
        }
        if !target.starts_with('/') || target.contains(char::is_whitespace) {
            return Err(MountError::Target {
                entry: entry.to_owned(),
                target: target.to_owned(),
            });
        }
        let writable = match mode {
            None | Some("ro") => false,
            Some("rw") => true,
            Some(m) => {
                return Err(MountError::Mode {
                    entry: entry.to_owned(),
                    mode: m.to_owned(),
                })
            }
        };
        let is_path = source.starts_with('/')
            || source.starts_with("./")
            || source == "."
            || source.starts_with("../");
        let source = if is_path {
            MountSource::Bind(PathBuf::from(source))
        } else if is_volume_name(source) {
            MountSource::Volume(source.to_owned())
        } else {
            return Err(MountError::Source {
                entry: entry.to_owned(),
                from: source.to_owned(),
            });
        };
        Ok(Mount {
            source,
            target: target.to_owned(),
            writable,
        })
    }
}

/// Docker's rule for volume names.
fn is_volume_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl fmt::Display for Mount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            MountSource::Bind(p) => write!(f, "{}", p.display())?,
            MountSource::Volume(v) => f.write_str(v)?,
        }
        write!(
            f,
            ":{}:{}",
            self.target,
            if self.writable { "rw" } else { "ro" }
        )
    }
}

impl Mount {
    /// A relative bind source made absolute against `base` (the config file's directory), as
    /// docker-compose resolves `./data`: the same file means the same directory wherever the
    /// gateway was started from.
    pub fn resolved(mut self, base: &Path) -> Mount {
        if let MountSource::Bind(p) = &self.source {
            if p.is_relative() {
                let joined = base.join(p);
                let abs = std::path::absolute(&joined).unwrap_or(joined);
                self.source = MountSource::Bind(normalize(&abs));
            }
        }
        self
    }
}

/// `a/./b/../c` → `a/c`, lexically (the path may not exist yet: that is for the check to say).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// What a replica's placeholders stand for.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    pub port: u16,
    pub hostname: &'a str,
    pub id: u32,
}

/// The placeholders a template may name.
pub const PLACEHOLDERS: [&str; 3] = ["{port}", "{hostname}", "{id}"];

/// `template` with `{port}`, `{hostname}` and `{id}` filled in; everything else (a JSON value's
/// braces included) stays as it is.
pub fn expand(template: &str, vars: Vars<'_>) -> String {
    if !template.contains('{') {
        return template.to_owned();
    }
    template
        .replace("{port}", &vars.port.to_string())
        .replace("{hostname}", vars.hostname)
        .replace("{id}", &vars.id.to_string())
}

/// The `{name}` tokens in `template` that look like a placeholder but are none of
/// [`PLACEHOLDERS`] (`{prot}`): a typo that would otherwise reach the replica as text.
pub fn unknown_placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        let looks_like_one = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let token = format!("{{{name}}}");
        if looks_like_one && !PLACEHOLDERS.contains(&token.as_str()) {
            out.push(token);
        }
        rest = &after[close + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            port: 8081,
            hostname: "server-2",
            id: 2,
        }
    }

    #[test]
    fn placeholders_are_filled_and_other_braces_kept() {
        assert_eq!(expand("--port={port}", vars()), "--port=8081");
        assert_eq!(
            expand("http://{hostname}:{port}/{id}/{port}", vars()),
            "http://server-2:8081/2/8081"
        );
        assert_eq!(expand(r#"{"a": {port}}"#, vars()), r#"{"a": 8081}"#);
        assert_eq!(expand("plain", vars()), "plain");
        assert_eq!(expand("{PORT} {ports}", vars()), "{PORT} {ports}");
    }

    #[test]
    fn typos_of_placeholders_are_found() {
        assert_eq!(unknown_placeholders("{prot}/{id}"), ["{prot}"]);
        assert_eq!(unknown_placeholders("{host_name}"), ["{host_name}"]);
        assert!(unknown_placeholders(r#"{"json": 1} {port}"#).is_empty());
        assert!(unknown_placeholders("{} {A} { x } {").is_empty());
    }

    #[test]
    fn mounts_are_read_only_unless_rw() {
        let m: Mount = "/srv/site:/www".parse().expect("bind");
        assert_eq!(m.source, MountSource::Bind("/srv/site".into()));
        assert_eq!((m.target.as_str(), m.writable), ("/www", false));
        let m: Mount = "data:/var/lib/app:rw".parse().expect("volume");
        assert_eq!(m.source, MountSource::Volume("data".into()));
        assert!(m.writable);
        let m: Mount = "./site:/www:ro".parse().expect("relative bind");
        assert_eq!(m.source, MountSource::Bind("./site".into()));
        assert_eq!(m.to_string(), "./site:/www:ro");
        for bad in [
            "/a",
            "/a:www",
            "/a:/b:rx",
            "a b:/x",
            ":/x",
            "/a:/b:ro:x",
            "-v:/x",
        ] {
            assert!(bad.parse::<Mount>().is_err(), "{bad}");
        }
        let e = "/a:/b:rx".parse::<Mount>().expect_err("mode").to_string();
        assert!(e.contains(":rw"), "{e}");
    }

    #[test]
    fn relative_bind_sources_resolve_against_the_config_directory() {
        let m: Mount = "./site/../www:/www".parse().expect("bind");
        let m = m.resolved(Path::new("/etc/ringgate"));
        assert_eq!(m.source, MountSource::Bind("/etc/ringgate/www".into()));
        let v: Mount = "data:/d".parse().expect("volume");
        assert_eq!(v.clone().resolved(Path::new("/x")), v, "volumes stay names");
        let abs: Mount = "/srv:/srv".parse().expect("abs");
        assert_eq!(abs.clone().resolved(Path::new("/x")), abs);
    }
}
