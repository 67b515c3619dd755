//! Loading: from a file or text to a valid [`Config`], or a [`ConfigError`] that names the file,
//! the line and the key.
//!
//! Owns: reading the file, parsing it with `toml_edit` (whose spans say where every key and
//! table sits), deserialising it into the section structs (unknown keys and wrong types
//! rejected), running the validator and pointing each of its problems at its line. The file is
//! read through [`read_source_file`]: a regular file of at most [`MAX_CONFIG_FILE`] bytes.
//! Must not touch: what the keys mean or which values are allowed (the section structs and the
//! validator say that), or anything running.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml_edit::{ImDocument, Item, Table};

use super::source_file::{read_source_file, FileReadError};
use super::{Config, Problem};

/// Largest config file read: `conf/lb.toml` with every key documented is about 20 KiB.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source} (check the path given to --config)")]
    Read {
        path: PathBuf,
        #[source]
        source: FileReadError,
    },
    #[error(
        "{}: the config file is empty (nothing but whitespace or comments). A file cut off while it \
         is written looks the same, so it is never read as \"all defaults\": put at least one \
         setting in it (conf/lb.toml documents every key with its default), or start without a \
         config file to run on defaults",
        path.display()
    )]
    Empty { path: PathBuf },
    #[error("{path}: line {line}, column {column}: {table}{message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        table: String,
        message: String,
    },
    #[error("{}: invalid configuration:\n{}", path.display(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// A read that failed for the process's own shortage of descriptors, not for the file.
    pub fn is_local_resource(&self) -> bool {
        matches!(self, ConfigError::Read { source, .. } if source.is_local_resource())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&Config::read_text(path)?, path)
    }

    /// Reads a config file's text (see [`read_source_file`]; at most [`MAX_CONFIG_FILE`] bytes).
    pub fn read_text(path: &Path) -> Result<String, ConfigError> {
        let read = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = read_source_file(path, MAX_CONFIG_FILE).map_err(read)?;
        String::from_utf8(bytes).map_err(|e| {
            read(FileReadError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.utf8_error(),
            )))
        })
    }

    /// Parses and validates config text; `path` only names the source in errors. Text without a
    /// single setting is [`ConfigError::Empty`]: that is what a truncated file looks like.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let parse_error =
            |doc: Option<&ImDocument<&str>>, span: Option<Range<usize>>, message: &str| {
                let offset = span.map(|s| s.start).unwrap_or(0);
                let (line, column) = line_col(text, offset);
                let table = doc
                    .and_then(|d| table_at(d.as_table(), offset))
                    .map(|t| format!("in [{t}]: "))
                    .unwrap_or_default();
                // Name the key whose value is wrong, where the span points at one.
                let key = doc
                    .and_then(|d| key_at(d.as_table(), offset))
                    .map(|k| format!("{k}: "))
                    .unwrap_or_default();
                let table = format!("{table}{key}");
                ConfigError::Parse {
                    path: path.to_owned(),
                    line,
                    column,
                    table,
                    message: message.trim_end().to_owned(),
                }
            };
        let doc = ImDocument::parse(text).map_err(|e| parse_error(None, e.span(), e.message()))?;
        if doc.as_table().is_empty() {
            return Err(ConfigError::Empty {
                path: path.to_owned(),
            });
        }
        let mut config = Config::deserialize(toml_edit::de::Deserializer::from(doc.clone()))
            .map_err(|e| parse_error(Some(&doc), e.span(), e.message()))?;
        config
            .provider
            .resolve_paths(path.parent().unwrap_or(Path::new("")));
        let mut problems = config.problems();
        if problems.is_empty() {
            return Ok(config);
        }
        for p in &mut problems {
            p.line = key_span(doc.as_table(), &p.key).map(|s| line_col(text, s.start).0);
        }
        Err(ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

impl Config {
    /// Points each of `problems` (found outside the validator: `ringgate check`'s look at the
    /// file system and the engine) at the line of `text` that sets its key.
    pub fn locate(text: &str, problems: &mut [Problem]) {
        let Ok(doc) = ImDocument::parse(text) else {
            return;
        };
        for p in problems {
            p.line = key_span(doc.as_table(), &p.key).map(|s| line_col(text, s.start).0);
        }
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|n| n + 1).unwrap_or(0) + 1;
    (line, column)
}

/// Where the dotted key (`ring.vnodes`, `listen`) is set, if the document sets it.
fn key_span(root: &Table, dotted: &str) -> Option<Range<usize>> {
    let mut table: &dyn toml_edit::TableLike = root;
    let mut parts = dotted.split('.').peekable();
    while let Some(part) = parts.next() {
        let (key, item) = table.get_key_value(part)?;
        if parts.peek().is_none() {
            return key.span().or_else(|| item.span());
        }
        table = item.as_table_like()?;
    }
    None
}

/// The name of the key (within its table) whose value's span holds `offset`.
fn key_at(root: &Table, offset: usize) -> Option<String> {
    fn visit(table: &dyn toml_edit::TableLike, offset: usize) -> Option<String> {
        for (key, item) in table.iter() {
            match item {
                Item::Value(v) => {
                    if let Some(s) = v.span() {
                        if s.start <= offset && offset < s.end.max(s.start + 1) {
                            return Some(key.to_owned());
                        }
                    }
                    if let Some(t) = v.as_inline_table() {
                        if let Some(found) = visit(t, offset) {
                            return Some(found);
                        }
                    }
                }
                Item::Table(t) => {
                    if let Some(found) = visit(t, offset) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
        None
    }
    visit(root, offset)
}

/// The dotted name of the innermost `[table]` whose span (header to last value) holds `offset`.
fn table_at(root: &Table, offset: usize) -> Option<String> {
    fn visit(table: &Table, path: &str, offset: usize, best: &mut Option<(usize, String)>) {
        for (key, item) in table.iter() {
            let name = if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
            let tables: Vec<&Table> = match item {
                Item::Table(t) => vec![t],
                Item::ArrayOfTables(a) => a.iter().collect(),
                _ => continue,
            };
            for t in tables {
                if let Some(s) = t.span() {
                    let holds = s.start <= offset && offset < s.end.max(s.start + 1);
                    let width = s.end - s.start;
                    if holds && best.as_ref().is_none_or(|(w, _)| width <= *w) {
                        *best = Some((width, name.clone()));
                    }
                }
                visit(t, &name, offset, best);
            }
        }
    }
    let mut best = None;
    visit(root, "", offset, &mut best);
    best.map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hashing::{HashFunction, KeySource, KeySources};
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("lb.toml"))
    }

    fn err(text: &str) -> String {
        parse(text).expect_err("should be rejected").to_string()
    }

    #[test]
    fn a_config_path_that_is_no_regular_file_or_too_large_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("lb.toml");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .map(|s| s.success());
        assert!(matches!(made, Ok(true)), "mkfifo");
        // The read does not wait for a writer (source_file's tests prove it on a thread).
        let e = Config::load(&fifo).expect_err("a FIFO config is an error");
        assert!(!e.is_local_resource());
        let text = e.to_string();
        assert!(text.contains("lb.toml") && text.contains("FIFO"), "{text}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_FILE as usize + 1]).expect("write");
        let text = Config::load(&big).expect_err("too large").to_string();
        assert!(text.contains("larger than"), "{text}");
        let emfile = ConfigError::Read {
            path: "lb.toml".into(),
            source: FileReadError::Io(std::io::Error::from_raw_os_error(libc::EMFILE)),
        };
        assert!(emfile.is_local_resource());
    }

    #[test]
    fn shipped_config_parses_and_sets_every_key() {
        let text = include_str!("../../conf/lb.toml");
        let c = parse(text).expect("conf/lb.toml is valid");
        assert_eq!(c.ring.slots, 512);
        assert_eq!(c.ring.vnodes, 9);
        assert_eq!(
            c.hashing.key,
            KeySources::one(KeySource::Query("id".into()))
        );
        // The shipped file documents every key of every section, each in its own section
        // (commented out where the default is "unset"). The keys are read off the structs
        // themselves, so a new key without documentation fails here.
        for (section, keys) in [
            ("ring", fields_of::<super::super::RingConfig>()),
            ("hashing", fields_of::<super::super::HashingConfig>()),
            ("replicas", fields_of::<super::super::ReplicasConfig>()),
            ("provider", fields_of::<super::super::ProviderConfig>()),
            ("health", fields_of::<super::super::HealthConfig>()),
            ("proxy", fields_of::<super::super::ProxyConfig>()),
            ("policy", fields_of::<super::super::PolicyConfig>()),
            ("admin", fields_of::<super::super::AdminConfig>()),
            ("log", fields_of::<super::super::LogConfig>()),
            ("tls", fields_of::<super::super::TlsConfig>()),
        ] {
            assert!(!keys.is_empty(), "no keys read for [{section}]");
            let body = section_text(text, section);
            for key in keys {
                assert!(
                    body.lines().any(|l| l
                        .trim_start()
                        .trim_start_matches('#')
                        .trim_start()
                        .starts_with(&format!("{key} ="))),
                    "conf/lb.toml does not document `{section}.{key}`"
                );
            }
        }
        assert!(text.lines().any(|l| l.starts_with("listen =")));
    }

    /// The fields of a `deny_unknown_fields` struct, from the error serde gives for an unknown one.
    fn fields_of<T: serde::de::DeserializeOwned>() -> Vec<String> {
        let message = match toml::from_str::<T>("__no_such_key = 0") {
            Ok(_) => return Vec::new(),
            Err(e) => e.message().to_owned(),
        };
        let expected = message.split_once("expected").map(|(_, r)| r).unwrap_or("");
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    /// The lines of `[section]` up to the next section header.
    fn section_text<'a>(text: &'a str, section: &str) -> &'a str {
        let header = format!("\n[{section}]\n");
        let start = text
            .find(&header)
            .map(|i| i + header.len())
            .unwrap_or(text.len());
        let rest = &text[start..];
        let end = rest.find("\n[").map(|i| i + 1).unwrap_or(rest.len());
        &rest[..end]
    }

    #[test]
    fn an_empty_file_is_an_error_not_all_defaults() {
        for text in [
            "",
            "\n\n",
            "  \t\r\n",
            "# all commented out\n# listen = \"0.0.0.0:5000\"\n",
        ] {
            let e = err(text);
            assert!(
                e.starts_with("lb.toml: the config file is empty"),
                "{text:?}: {e}"
            );
            assert!(e.contains("all defaults"), "{e}");
        }
        // One setting is enough; everything else has its default.
        let c = parse("[ring]\n").expect("an empty table is a setting");
        assert_eq!(c, Config::default());
        let c = parse("listen = \"0.0.0.0:5000\"\n").expect("one key");
        assert_eq!(c, Config::default());
        // A file cut inside a line or a table header is already a syntax error.
        for cut in ["[admin]\ntoken = \"s3c", "[replicas]\ncount =", "[prox"] {
            let e = err(cut);
            assert!(e.contains("line"), "{cut:?}: {e}");
        }
    }

    #[test]
    fn every_key_parses() {
        let c = parse(
            r#"
listen = "127.0.0.1:6000"
[ring]
slots = 1024
vnodes = 4
request_hash = "mix64"
vnode_hash = "quadratic"
[hashing]
key = "header:x-user"
[replicas]
count = 2
max_replicas = 10
name_prefix = "web-"
[provider]
kind = "static"
image = "x:1"
network = "n2"
container_port = 8080
memory_limit = "64MiB"
pids_limit = 32
cpus = 0.5
log_max_size = "1MiB"
log_max_files = 2
server_binary = "/bin/true"
servers = [{ name = "a", address = "127.0.0.1:9000" }]
[health]
interval = "1s"
timeout = "500ms"
rise = 3
fall = 4
recovery_delay = "3s"
max_backoff = "30s"
[proxy]
retries = 1
connect_timeout = "200ms"
request_timeout = "5s"
header_read_timeout = "2s"
drain_timeout = "1s"
max_body = "1MiB"
[policy]
dir = "/tmp/p"
memory_limit = "8MiB"
instruction_budget = 5000
[admin]
allow = ["10.0.0.0/8", "127.0.0.1"]
token = "s3cret"
[log]
access = "/var/log/ringgate/access.log"
format = "combined"
[tls]
enabled = true
listen = "127.0.0.1:6443"
http = "redirect"
min_version = "1.3"
certificates = [{ cert = "a.pem", key = "a.key" }, { cert = "b.pem" }]
"#,
        )
        .expect("valid");
        assert_eq!(c.listen, "127.0.0.1:6000".parse().expect("addr"));
        assert_eq!(c.ring.request_hash, HashFunction::Mix64);
        assert_eq!(c.proxy.max_body, 1 << 20);
        assert_eq!(c.health.timeout, Duration::from_millis(500));
        assert_eq!(c.provider.servers[0].name, "a");
        assert_eq!(
            (
                c.provider.memory_limit,
                c.provider.pids_limit,
                c.provider.cpus,
                c.provider.log_max_size,
                c.provider.log_max_files
            ),
            (64 << 20, 32, 0.5, 1 << 20, 2)
        );
        assert_eq!(c.admin.token(), Some("s3cret"));
        assert!(c.admin.allows("127.0.0.1".parse().expect("ip")));
        assert!(!c.admin.allows("127.0.0.2".parse().expect("ip")));
        assert_eq!(c.policy.instruction_budget, 5000);
        assert_eq!(c.tls.http, super::super::PlainHttp::Redirect);
        assert_eq!(c.tls.min_version, super::super::TlsVersion::Tls13);
        assert_eq!(c.tls.certificates[1].key_file(), Path::new("b.pem"));
        assert_eq!(
            c.log.access,
            super::super::AccessTarget::File("/var/log/ringgate/access.log".into())
        );
        assert_eq!(c.log.format, super::super::AccessFormat::Combined);
        let c = parse("[log]\naccess = \"stdout\"\n").expect("stdout");
        assert_eq!(c.log.access, super::super::AccessTarget::Stdout);
        assert_eq!(
            Config::default().log.access,
            super::super::AccessTarget::Off
        );
        let e = err("[log]\naccess = \"\"\n");
        assert!(e.contains("line 2") && e.contains("not empty"), "{e}");
        let e = err("[log]\nformat = \"common\"\n");
        assert!(e.contains("line 2") && e.contains("common"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("[ring]\nslots = 512\nslotz = 3\n");
        assert!(e.starts_with("lb.toml: line 3"), "{e}");
        assert!(e.contains("in [ring]"), "{e}");
        assert!(e.contains("slotz"), "{e}");
        let e = err("listen = \"0.0.0.0:5000\"\nbogus = 1\n");
        assert!(e.contains("line 2") && e.contains("bogus"), "{e}");
        let e = err("[nope]\nx = 1\n");
        assert!(e.contains("line 1") && e.contains("nope"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let e = err("[ring]\nslots = \"many\"\n");
        assert!(e.contains("line 2") && e.contains("[ring]"), "{e}");
        let e = err("[health]\ninterval = 10\n");
        assert!(e.contains("line 2") && e.contains("duration"), "{e}");
        let e = err("[health]\ninterval = \"ten\"\n");
        assert!(e.contains("\"ten\""), "{e}");
        let e = err("[hashing]\nkey = \"ip\"\n");
        assert!(e.contains("line 2") && e.contains("query:<name>"), "{e}");
        let e = err("listen = \"nowhere\"\n");
        assert!(e.contains("line 1"), "{e}");
        let e = err("[provider]\nkind = \"kubernetes\"\n");
        assert!(e.contains("line 2") && e.contains("kubernetes"), "{e}");
        let e = err("[admin]\nallow = [\"10.0.0.0/99\"]\n");
        assert!(e.contains("10.0.0.0/99"), "{e}");
        let e = err("[proxy]\nmax_body = \"10 parsecs\"\n");
        assert!(e.contains("10 parsecs"), "{e}");
        let e = err("[ring\nslots = 1\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn spans_point_at_the_key_and_its_table() {
        // Columns count from 1; the table is the innermost one holding the error.
        let e = err(
            "listen = \"0.0.0.0:5000\"\n\n[ring]\n  vnodes = 4\n  typo = 1\n[health]\nrise = 1\n",
        );
        assert!(
            e.starts_with("lb.toml: line 5, column 3: in [ring]: "),
            "{e}"
        );
        let e = err("[ring]\nslots = 0\n[replicas]\ncount = 3\n");
        assert!(e.contains("line 2: ring.slots"), "{e}");
        // A key the file does not set has no line to point at.
        let e = err("[ring]\nslots = 16\n");
        assert!(e.contains("  - replicas.max_replicas: 50 exceeds"), "{e}");
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 0), (1, 1));
    }
}
