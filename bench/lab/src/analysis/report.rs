//! `docs/performance.md`: rendered from the results of one `ringgate-lab analysis` run. The proxy
//! comparison lives in its own marked section, owned by `make bench` and kept across
//! regenerations.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use super::experiments::Distribution;
use super::{theory, AnalysisError, ChartFiles, Results};

/// A part of the report between two HTML comments: one tool writes it, and every other
/// regeneration of the report carries it over unchanged.
pub struct Marked {
    pub begin: &'static str,
    pub end: &'static str,
    /// The heading a report without the part gets it appended under.
    pub heading: &'static str,
}

impl Marked {
    /// What `doc` has between the markers (leading newlines dropped), if it has both.
    pub fn content<'a>(&self, doc: &'a str) -> Option<&'a str> {
        let b = doc.find(self.begin)? + self.begin.len();
        let e = doc[b..].find(self.end)? + b;
        Some(doc[b..e].trim_start_matches('\n'))
    }

    /// `doc` with `content` between the markers, or with the part appended under its heading.
    pub fn replace(&self, doc: &str, content: &str) -> String {
        let section = format!("{}\n{}{}", self.begin, ensure_nl(content), self.end);
        match (doc.find(self.begin), doc.find(self.end)) {
            (Some(b), Some(e)) if e > b => {
                format!("{}{section}{}", &doc[..b], &doc[e + self.end.len()..])
            }
            _ => format!("{}\n{}\n\n{section}\n", ensure_nl(doc), self.heading),
        }
    }

    /// `new`, a regenerated report, with this part of `old` carried over when it has one.
    pub fn keep(&self, old: &str, new: &str) -> String {
        match self.content(old) {
            Some(kept) if !kept.trim().is_empty() => self.replace(new, kept),
            _ => new.to_string(),
        }
    }
}

/// The proxy comparison, written by `make bench`.
pub const BENCH: Marked = Marked {
    begin: "<!-- bench:begin (written by `make bench`) -->",
    end: "<!-- bench:end -->",
    heading: "## Throughput against NGINX and HAProxy",
};
const BENCH_PLACEHOLDER: &str = "Not measured yet: run `make bench`.\n";

/// Bounded loads and slow start, written by `ringgate-lab analysis balancing`.
pub const BALANCING: Marked = Marked {
    begin: "<!-- balancing:begin (written by `ringgate-lab analysis balancing`) -->",
    end: "<!-- balancing:end -->",
    heading: "## Balancing beyond the ring: bounded loads and slow start",
};

/// The profile and memory notes, measured and written by hand.
const BY_HAND: Marked = Marked {
    begin: "<!-- by-hand:begin (written by hand; `make analysis` keeps it) -->",
    end: "<!-- by-hand:end -->",
    heading: "## Where ringgate's time goes",
};

fn ensure_nl(s: &str) -> String {
    if s.is_empty() || s.ends_with('\n') {
        s.to_string()
    } else {
        format!("{s}\n")
    }
}

/// The `## ` sections of a report as (key, start, end) byte offsets; the key is the heading up
/// to its first ':' (so "## A-1: 10000 requests over N = 3" and "## A-1: 500 requests over
/// N = 3" are one section).
fn sections(doc: &str) -> Vec<(&str, usize, usize)> {
    let mut starts: Vec<usize> = doc.match_indices("\n## ").map(|(i, _)| i + 1).collect();
    if doc.starts_with("## ") {
        starts.insert(0, 0);
    }
    let ends = starts.iter().skip(1).copied().chain([doc.len()]);
    starts
        .iter()
        .zip(ends)
        .map(|(&b, e)| {
            let heading = doc[b..e].lines().next().unwrap_or("");
            (heading.split(':').next().unwrap_or(heading), b, e)
        })
        .collect()
}

fn is_not_run(section: &str) -> bool {
    section
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .eq(["Not run."])
}

/// `new` with each section an `--only` run did not make ("Not run.") replaced by the same
/// section of `old`, so that a partial run updates its own sections and keeps the rest.
fn keep_not_run(old: &str, new: &str) -> String {
    let kept: Vec<(&str, &str)> = sections(old)
        .into_iter()
        .map(|(k, b, e)| (k, &old[b..e]))
        .filter(|(_, t)| !is_not_run(t))
        .collect();
    let mut out = String::with_capacity(new.len());
    let mut at = 0;
    for (key, b, e) in sections(new) {
        out.push_str(&new[at..b]);
        let text = &new[b..e];
        match kept.iter().find(|(k, _)| *k == key) {
            Some((_, t)) if is_not_run(text) => out.push_str(t),
            _ => out.push_str(text),
        }
        at = e;
    }
    out.push_str(&new[at..]);
    out
}

/// Writes `md` to `path`, keeping the bench sections (plain and TLS), the balancing section and
/// the hand-written notes of the file already there.
pub fn write_doc(path: &Path, md: &str) -> Result<(), AnalysisError> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let md = BENCH.keep(&old, md);
    let md = BALANCING.keep(&old, &md);
    let md = super::proxies_tls::TLS.keep(&old, &md);
    let md = BY_HAND.keep(&old, &md);
    let md = keep_not_run(&old, &md);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| AnalysisError::io("creating the docs dir", e))?;
    }
    std::fs::write(path, md)
        .map_err(|e| AnalysisError::io(format!("writing {}", path.display()), e))
}

/// `file` as a link relative to the directory of `doc` (both relative to the same root).
pub fn link(doc: &Path, file: &Path) -> String {
    if file.is_absolute() {
        return file.display().to_string();
    }
    let normal = |p: &Path| -> Vec<std::ffi::OsString> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_owned()),
                _ => None,
            })
            .collect()
    };
    let from = doc.parent().map(normal).unwrap_or_default();
    let to = normal(file);
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for part in &to[common..] {
        rel.push(part);
    }
    rel.display().to_string()
}

fn chart_md(doc: &Path, charts: &ChartFiles, name: &str, alt: &str) -> String {
    let Some((_, files)) = charts.iter().find(|(n, _)| *n == name) else {
        return String::new();
    };
    let svg = files
        .iter()
        .find(|f| f.extension().is_some_and(|e| e == "svg"));
    let mut s = String::new();
    if let Some(p) = svg.or(files.first()) {
        let _ = writeln!(s, "![{alt}]({})", link(doc, p));
    }
    s.push('\n');
    s
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn dist_row(d: &Distribution) -> String {
    let counts: Vec<String> = d.servers.iter().map(|(_, c)| c.to_string()).collect();
    format!(
        "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.3} | {} |",
        d.n,
        counts.join(" / "),
        d.mean(),
        d.min(),
        d.max(),
        d.stddev(),
        d.max_over_mean(),
        d.cv(),
        d.failed
    )
}

const DIST_HEADER: &str = "| N | requests per server | mean | min | max | stddev | max/mean | CV | failed |\n|---|---|---|---|---|---|---|---|---|\n";

/// The theory section: what `H` reaches and where `Φ` puts the vnodes.
fn theory_md(out: &mut String) {
    let slots = 512;
    let reach = theory::Reach::of_default(slots);
    let layout3 = theory::vnode_layout(3, 9, slots);
    let lo = layout3.first().map(|x| x.0).unwrap_or(0);
    let hi = layout3.last().map(|x| x.0).unwrap_or(0);
    let reach_in_vnode_span = reach
        .hits
        .iter()
        .filter(|(s, _)| **s > lo && **s <= hi)
        .map(|(_, h)| *h)
        .sum::<u32>();
    let _ = writeln!(
        out,
        "## Why the default hash functions skew the load\n\n\
The defaults are `H(i) = i² + 2i + 17` for a request key `i` and `Φ(i, j) = i² + j² + 2j + 25` for \
virtual node `j` of server `i`, both taken mod `slots` = {slots}.\n\n\
**`H` reaches few slots.** `H(i) = (i + 1)² + 16`, so `H(i) mod 512` is a square mod 512 shifted \
by 16. Squares modulo a power of two are rare: of the 512 slots only **{} are reachable**, and they \
are not hit evenly (the most frequent slot takes {} of all keys; a perfect hash gives each slot \
{}). Since 512 divides 2⁶⁴, `H(i) mod 512` depends only on `i mod 512`, so this holds for any key, \
not only for the 6-digit ids used here.\n\n\
**`Φ` packs the virtual nodes into a narrow arc.** For small server ids `i²` and `j² + 2j` are \
small, so every vnode lands low on the ring: with N = 3 and 9 vnodes the 27 vnodes occupy slots \
{lo}–{hi} of 0–511. A slot belongs to the next vnode clockwise, so the whole arc from slot {} \
round through 511 and 0 up to slot {lo}, {} of the ring, belongs to the server of the vnode at \
slot {lo}. Only {} of the keys `H` produces fall strictly inside the vnode arc, where the servers \
compete at all.\n",
        reach.reachable(),
        pct(reach.top_share()),
        pct(1.0 / f64::from(slots)),
        hi + 1,
        pct(f64::from(slots - (hi - lo)) / f64::from(slots)),
        pct(f64::from(reach_in_vnode_span) / f64::from(slots)),
    );
    let _ = writeln!(out, "| server | vnode slots (N = 3) |\n|---|---|");
    for i in 1..=3 {
        let s: Vec<String> = layout3
            .iter()
            .filter(|(_, srv)| *srv == i)
            .map(|(slot, _)| slot.to_string())
            .collect();
        let _ = writeln!(out, "| {i} | {} |", s.join(", "));
    }
    let _ = writeln!(
        out,
        "\nThe resulting expected share of uniformly random keys per server (computed from the \
reachable slots and the vnode layout):\n\n| N | expected share per server (server 1 … N) |\n|---|---|"
    );
    for n in 2..=6 {
        let shares: Vec<String> = theory::predicted_shares(n, 9, slots)
            .iter()
            .map(|s| pct(*s))
            .collect();
        let _ = writeln!(out, "| {n} | {} |", shares.join(" / "));
    }
    let _ = writeln!(
        out,
        "\n**What fixes it** is a hash whose output is spread over the whole ring for both inputs: \
the built-in `mix64` (a 64-bit finaliser: every input bit affects every output bit) for \
`request_hash` and `vnode_hash`, or a Lua policy doing the same (A-4 below). More vnodes alone do \
not help while `Φ` keeps them in one arc and `H` keeps missing most slots.\n"
    );
}

/// The whole report.
pub fn render(r: &Results, charts: &ChartFiles, doc: &Path) -> String {
    let mut out = String::new();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let _ = writeln!(
        out,
        "# ringgate performance\n\n\
_Regenerated by `make analysis` (`ringgate-lab analysis`) at {now}; the proxy comparison section by \
`make bench`. The charts are committed in `docs/img/`, and `make analysis` redraws them there._\n\n\
Every experiment starts its own gateway (`ringgate serve`, process provider, 512 slots, 9 vnodes, \
key `query:id`) on 127.0.0.1 with a temporary config, and sends {} requests at concurrency {} with \
random 6-digit `?id=` keys (the same keys for every run), counting the server named in each \
`/home` answer.\n",
        r.requests, r.concurrency
    );
    for n in &r.notes {
        let _ = writeln!(out, "> Note: {n}\n");
    }
    theory_md(&mut out);

    let default = r.per_hash.first();
    let _ = writeln!(out, "## A-1: {} requests over N = 3\n", r.requests);
    match default.and_then(|(_, ds)| ds.iter().find(|d| d.n == 3)) {
        Some(d) => {
            let _ = writeln!(out, "| server | requests | share |\n|---|---|---|");
            for (s, c) in &d.servers {
                let _ = writeln!(
                    out,
                    "| {s} | {c} | {} |",
                    pct(*c as f64 / d.total().max(1.0))
                );
            }
            let _ = writeln!(
                out,
                "\nBusiest server at {:.2}× the mean (ideal 1.00), coefficient of variation {:.3}. \
(A-1 is the N = 3 run of A-2.)\n",
                d.max_over_mean(),
                d.cv()
            );
            out.push_str(&chart_md(doc, charts, "a1", "A-1 requests per server"));
        }
        None => out.push_str("Not run.\n\n"),
    }

    let _ = writeln!(out, "## A-2: N from 2 to 6\n");
    match default {
        Some((_, ds)) if ds.len() > 1 => {
            out.push_str(DIST_HEADER);
            for d in ds {
                out.push_str(&dist_row(d));
                out.push('\n');
            }
            out.push('\n');
            out.push_str(&chart_md(
                doc,
                charts,
                "a2",
                "A-2 load per server against N",
            ));
        }
        _ => out.push_str("Not run.\n\n"),
    }

    match &r.failover {
        Some(f) => out.push_str(&failover_section(f, r.failover_reset.as_ref())),
        None => out.push_str("## Failover: a replica SIGKILLed under load\n\nNot run.\n\n"),
    }

    let _ = writeln!(
        out,
        "## A-3: every endpoint, and a replica killed under load\n"
    );
    match &r.resilience {
        Some(x) => {
            let _ = writeln!(
                out,
                "| call | expected | got | answer (start) |\n|---|---|---|---|"
            );
            for e in &x.endpoints {
                let got = e
                    .got
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "error".into());
                let mark = if e.got == Some(e.expected) {
                    ""
                } else {
                    " ✗"
                };
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {got}{mark} | `{}` |",
                    e.call.replace('|', "\\|"),
                    e.expected,
                    e.body.replace('|', "\\|").replace('`', "'")
                );
            }
            let secs = |v: Option<f64>| {
                v.map(|s| format!("{s:.1} s"))
                    .unwrap_or_else(|| "not seen".into())
            };
            let errors: Vec<String> = x.errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            let _ = writeln!(
                out,
                "\nUnder a steady load, replica `{}` was killed (SIGKILL) at {:.1} s. The ring (`up` in \
`/lb/status`, sampled every 100 ms) had one server fewer after {}, and all 3 were back in the ring \
after {} (health interval 250 ms, recovery delay 1 s). \
Of {} requests, **{} failed**{}.\n",
                x.killed.as_deref().unwrap_or("?"),
                x.kill_at,
                secs(x.detected_after),
                secs(x.restored_after),
                x.requests,
                x.failed,
                if errors.is_empty() { String::new() } else { format!(" ({})", errors.join(", ")) }
            );
            out.push_str(&chart_md(doc, charts, "a3", "A-3 timeline"));
        }
        None => out.push_str("Not run.\n\n"),
    }

    let _ = writeln!(out, "## A-4: A-1 and A-2 with other hash functions\n");
    if r.per_hash.len() > 1 {
        let _ = writeln!(
            out,
            "`mix64` sets `request_hash = \"mix64\"` and `vnode_hash = \"mix64\"`; the Lua variant \
copies `policies/examples/spread_hash.lua` (`request_hash`: MurmurHash3's fmix64) and \
`spread_vnodes.lua` (`vnode_hash`) into the gateway's policy directory, on top of the default \
config.\n"
        );
        let _ = writeln!(
            out,
            "| hash | N | requests per server | max/mean | CV |\n|---|---|---|---|---|"
        );
        for (label, ds) in &r.per_hash {
            for d in ds {
                let counts: Vec<String> = d.servers.iter().map(|(_, c)| c.to_string()).collect();
                let _ = writeln!(
                    out,
                    "| {label} | {} | {} | {:.2} | {:.3} |",
                    d.n,
                    counts.join(" / "),
                    d.max_over_mean(),
                    d.cv()
                );
            }
        }
        let _ = writeln!(
            out,
            "\nA well-mixed hash removes the structural skew (the busiest server no longer takes \
most of the traffic), but with 9 vnodes per server some spread remains: a server owns the sum \
of 9 random arcs, whose total varies by about 1/√9 ≈ 33% (the CV column). More vnodes per \
server (`[ring] vnodes`, within `slots / N`) narrow it further.\n"
        );
        out.push_str(&chart_md(doc, charts, "a4_a1", "A-4: A-1 per hash choice"));
        out.push_str(&chart_md(doc, charts, "a4_a2", "A-4: A-2 per hash choice"));
    } else {
        out.push_str("Not run.\n\n");
    }

    let _ = writeln!(out, "## Ring movement\n");
    if r.movement.is_empty() {
        out.push_str("Not run.\n\n");
    } else {
        let _ = writeln!(
            out,
            "Distinct keys routed through a gateway with N = 3, again after `POST /add` of \
`server-4`, and again after `DELETE /rm` of `server-2`. The ideal for a consistent ring is \
1/(N+1) = 25% in both steps, all of it to (or from) the server added (removed); \"excess\" counts \
keys that moved between other servers.\n\n\
| hash | keys | moved on add (3 → 4) | excess | moved on remove (4 → 3) | excess | ideal |\n|---|---|---|---|---|---|---|"
        );
        for m in &r.movement {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | 25.0% |",
                m.hash,
                m.keys,
                pct(m.add_moved),
                pct(m.add_excess),
                pct(m.rm_moved),
                pct(m.rm_excess)
            );
        }
        let _ = writeln!(
            out,
            "\nExcess 0 means the ring is consistent whatever the hash: only the added (removed) \
server's keys move. How many move is that server's share of the keys, so it tracks 1/(N+1) only \
when the load is even: with the defaults the added server's vnodes land where `H` sends few keys.\n"
        );
        out.push_str(&chart_md(doc, charts, "movement", "Ring movement"));
    }

    let _ = writeln!(
        out,
        "## Microbenchmarks\n\n`make bench-micro` (criterion, `bench/lab/benches/ring.rs`) times the routing hot \
path: ring lookup (`owner`, one array index) for N = 3 and 50, key to owner, `H` and `Φ` (quadratic \
and mix64), key extraction (query, header, cookie, path) and ring rebuilds for N = 3 and 50. \
Criterion keeps its reports under `target/criterion/`.\n"
    );
    let _ = writeln!(out, "{}\n{PROFILE_NOTE}{}\n", BY_HAND.begin, BY_HAND.end);
    let _ = writeln!(
        out,
        "{}\n\n{}\n{BENCH_PLACEHOLDER}{}",
        BENCH.heading, BENCH.begin, BENCH.end
    );
    out
}

/// The hand-written part of a report written from nothing (the committed report has its own).
const PROFILE_NOTE: &str = "## Where ringgate's time goes\n\n\
_Measured by hand (`perf`, `strace -c`, `make bench-rss`), not regenerated: see the committed \
`docs/performance.md` and its history._\n\n";

/// The short table printed at the end of `ringgate-lab analysis`.
pub fn console_summary(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<22} {:>2}  {:>8}  {:>6}  per server",
        "hash", "N", "max/mean", "CV"
    );
    for (label, ds) in &r.per_hash {
        for d in ds {
            let counts: Vec<String> = d.servers.iter().map(|(_, c)| c.to_string()).collect();
            let _ = writeln!(
                s,
                "{label:<22} {:>2}  {:>8.2}  {:>6.3}  {}",
                d.n,
                d.max_over_mean(),
                d.cv(),
                counts.join(" / ")
            );
        }
    }
    for m in &r.movement {
        let _ = writeln!(
            s,
            "movement {:<22} add {} (excess {})  remove {} (excess {})  ideal 25%",
            m.hash,
            pct(m.add_moved),
            pct(m.add_excess),
            pct(m.rm_moved),
            pct(m.rm_excess)
        );
    }
    if let Some(x) = &r.resilience {
        let ok = x
            .endpoints
            .iter()
            .filter(|e| e.got == Some(e.expected))
            .count();
        let _ = writeln!(
            s,
            "A-3: endpoints {ok}/{} as expected; kill: {} failed of {} requests",
            x.endpoints.len(),
            x.failed,
            x.requests
        );
    }
    for f in r.failover.iter().chain(&r.failover_reset) {
        let _ = writeln!(s, "{}", failover_line(f));
    }
    s
}

fn failover_line(f: &super::experiments::Failover) -> String {
    let det: Vec<f64> = f.kills.iter().filter_map(|k| k.detected_ms).collect();
    let res: Vec<f64> = f.kills.iter().filter_map(|k| k.restored_ms).collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    format!(
        "failover (retry_on = {}): {} kills in {} s at concurrency {}: {:.0} req/s, {} failed of {} requests {:?}; detection ≤ {:.0} ms (max), N restored ≤ {:.0} ms (max)",
        f.retry_on,
        f.kills.len(),
        f.secs,
        f.concurrency,
        f.rps,
        f.failed,
        f.requests,
        f.errors,
        max(&det),
        max(&res)
    )
}

/// The failover section of the report: the run with the shipped `retry_on`, and the same run
/// with reset retries when it was made.
fn failover_section(
    f: &super::experiments::Failover,
    reset: Option<&super::experiments::Failover>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Failover: a replica SIGKILLed every {} s under load\n\n\
         Three replicas, process provider, checks at the default 10 s interval (so detection comes \
         from the provider's exit report and failed connects, not from heartbeats), \
         `recovery_delay = 1s`, `retry_on = {}` (the default), load at concurrency {} with \
         random 6-digit ids for {} s. Times are from the kill to the first `/lb/status` sample (every ~10 ms) showing the \
         change.\n",
        f.every, f.retry_on, f.concurrency, f.secs
    );
    let _ = writeln!(
        out,
        "| kill | victim | at | detected after | N restored after |\n|---|---|---|---|---|"
    );
    let ms = |v: Option<f64>| {
        v.map(|x| format!("{x:.0} ms"))
            .unwrap_or_else(|| "not seen".into())
    };
    for (i, k) in f.kills.iter().enumerate() {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} s | {} | {} |",
            i + 1,
            k.victim,
            k.at,
            ms(k.detected_ms),
            ms(k.restored_ms)
        );
    }
    let _ = writeln!(
        out,
        "\n**{:.0} requests/s; {} failed of {} requests** (target: zero).\n",
        f.rps, f.failed, f.requests
    );
    if let Some(r) = reset {
        let _ = writeln!(
            out,
            "The same run with `retry_on = {}`, where a request whose connection broke before a \
             response (in flight on the replica when it was killed) goes to the next server \
             clockwise too, when it is idempotent and its body was not sent: **{:.0} \
             requests/s; {} failed of {} requests** ({} kills, N restored after at most {:.0} \
             ms). The default leaves that retry off because a request that crashes its replica \
             would crash the next one too (a query of death, `docs/security.md`); a refused \
             connection is retried either way, outside the retry budget (`docs/health.md`).\n",
            r.retry_on,
            r.rps,
            r.failed,
            r.requests,
            r.kills.len(),
            r.kills
                .iter()
                .filter_map(|k| k.restored_ms)
                .fold(0.0, f64::max)
        );
    }
    let _ = writeln!(
        out,
        "Detection is the process provider's exit report (the child watcher fires on exit) or a \
         failed connect, whichever comes first. Restoring takes `recovery_delay` plus the start. \
         A replica killed again less than 30 s after its replacement started counts as crash-looping, \
         so its next restart waits twice as long (exponential back-off, `docs/health.md`): that is \
         why a second kill of the same server takes about 2 s to restore.\n"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_run_keeps_the_sections_it_did_not_make() {
        let old =
            "# r\n## A-1: 500 requests\nold a1\n## Failover: every 4 s\nold failover\n## End\nx\n";
        let new = "# r\n## A-1: 900 requests\nNot run.\n\n## Failover: every 2 s\nnew failover\n## End\ny\n";
        assert_eq!(
            keep_not_run(old, new),
            "# r\n## A-1: 500 requests\nold a1\n## Failover: every 2 s\nnew failover\n## End\ny\n"
        );
        // Nothing to keep: the new text stands, "Not run." included.
        assert_eq!(keep_not_run("", new), new);
        let rendered = render(
            &Results::default(),
            &Vec::new(),
            Path::new("docs/performance.md"),
        );
        assert!(rendered.contains("## Failover: a replica SIGKILLed under load\n\nNot run."));
    }

    #[test]
    fn the_hand_written_part_survives_regeneration() {
        let fresh = format!("# r\n{}\nstub\n{}\n## next\n", BY_HAND.begin, BY_HAND.end);
        let old = format!(
            "# old\n{}\n## Profile\nmeasured by hand\n{}\n",
            BY_HAND.begin, BY_HAND.end
        );
        assert_eq!(
            BY_HAND.keep(&old, &fresh),
            format!(
                "# r\n{}\n## Profile\nmeasured by hand\n{}\n## next\n",
                BY_HAND.begin, BY_HAND.end
            )
        );
        assert_eq!(BY_HAND.keep("no markers", &fresh), fresh);
        let empty = format!("{}\n{}", BY_HAND.begin, BY_HAND.end);
        assert_eq!(BY_HAND.keep(&empty, &fresh), fresh);
        let rendered = render(
            &Results::default(),
            &Vec::new(),
            Path::new("docs/performance.md"),
        );
        assert!(rendered.contains(BY_HAND.begin) && rendered.contains(BY_HAND.end));
    }

    #[test]
    fn bench_section_survives_regeneration() {
        let md = render(
            &Results::default(),
            &Vec::new(),
            Path::new("docs/performance.md"),
        );
        assert!(md.contains(BENCH_PLACEHOLDER));
        let with_bench = BENCH.replace(&md, "| target | req/s |\n");
        assert_eq!(BENCH.content(&with_bench), Some("| target | req/s |\n"));
        let regenerated = BENCH.replace(&md, BENCH.content(&with_bench).unwrap_or(""));
        assert_eq!(regenerated, with_bench);
        // A doc without markers gets the section appended.
        let appended = BENCH.replace("# x\n", "t\n");
        assert_eq!(BENCH.content(&appended), Some("t\n"));
    }

    #[test]
    fn links_are_relative_to_the_doc() {
        assert_eq!(
            link(
                Path::new("docs/performance.md"),
                Path::new("docs/img/a.svg")
            ),
            "img/a.svg"
        );
        assert_eq!(
            link(
                Path::new("docs/performance.md"),
                Path::new("bench/out/a.png")
            ),
            "../bench/out/a.png"
        );
        assert_eq!(
            link(Path::new("p.md"), Path::new("bench/out/a.png")),
            "bench/out/a.png"
        );
    }
}
