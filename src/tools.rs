//! Offline tools: `ringgate check`, `ringgate ring` and `ringgate simulate`.
//!
//! Owns: building the ring a config would build, without starting anything, and reporting on it.
//! Must not touch: the network or any running gateway.

use std::fmt::Write;

use crate::config::{Config, ProviderKind};
use crate::ring::{Placement, Ring, RingError, ServerId};

/// The members a config starts with: the static servers, or `<prefix>1..=count`.
pub fn initial_members(config: &Config) -> Vec<(ServerId, String)> {
    if config.provider.kind == ProviderKind::Static {
        config
            .provider
            .servers
            .iter()
            .zip(1u32..)
            .filter_map(|(s, n)| Some((ServerId::new(n)?, s.name.clone())))
            .collect()
    } else {
        (1..=config.replicas.count)
            .filter_map(|n| {
                Some((
                    ServerId::new(n)?,
                    format!("{}{n}", config.replicas.name_prefix),
                ))
            })
            .collect()
    }
}

/// The placement and owner table a config builds with all its members up.
pub fn build_ring(
    config: &Config,
    members: &[(ServerId, String)],
) -> Result<(Placement, Ring), RingError> {
    let (f, slots) = (config.ring.vnode_hash, config.ring.slots);
    let ids: Vec<ServerId> = members.iter().map(|(id, _)| *id).collect();
    let placement = Placement::build(slots, config.ring.vnodes, &ids, |i, j| {
        f.vnode_slot(u64::from(i.get()), j, slots)
    })?;
    let ring = Ring::build(&placement, |_| true);
    Ok((placement, ring))
}

/// A one-paragraph summary for `ringgate check`.
pub fn summary(config: &Config) -> String {
    format!(
        "ring {} slots x {} vnodes (request_hash {}, vnode_hash {}), key {}, provider {}, {} replicas (max {}), listen {}",
        config.ring.slots,
        config.ring.vnodes,
        config.ring.request_hash,
        config.ring.vnode_hash,
        config.hashing.key,
        config.provider.kind,
        initial_members(config).len(),
        config.replicas.max_replicas,
        config.listen
    )
}

fn name_of(members: &[(ServerId, String)], id: ServerId) -> &str {
    members
        .iter()
        .find(|(i, _)| *i == id)
        .map(|(_, n)| n.as_str())
        .unwrap_or("?")
}

/// `ringgate ring`: each server's virtual-node slots and the share of the ring it owns.
pub fn ring_report(config: &Config) -> Result<String, RingError> {
    let members = initial_members(config);
    let (placement, ring) = build_ring(config, &members)?;
    let slots = config.ring.slots;
    let mut owned = vec![0u32; members.len()];
    for s in 0..slots {
        if let Some(o) = ring.owner(s) {
            if let Some(i) = members.iter().position(|(id, _)| *id == o) {
                owned[i] += 1;
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "{}", summary(config));
    let _ = writeln!(
        out,
        "{:<4} {:<16} {:>7} {:>8}  virtual-node slots",
        "id", "server", "slots", "share"
    );
    for (i, (id, name)) in members.iter().enumerate() {
        let pos: Vec<String> = placement
            .positions(*id)
            .iter()
            .map(u32::to_string)
            .collect();
        let _ = writeln!(
            out,
            "{:<4} {:<16} {:>7} {:>7.2}%  {}",
            id.get(),
            name,
            owned[i],
            100.0 * f64::from(owned[i]) / f64::from(slots),
            pos.join(" ")
        );
    }
    Ok(out)
}

/// Per-server request counts for `keys` random 6-digit keys (deterministic for a seed).
pub fn simulate(config: &Config, keys: u64, seed: u64) -> Result<Vec<(String, u64)>, RingError> {
    let members = initial_members(config);
    let (_, ring) = build_ring(config, &members)?;
    let mut counts = vec![0u64; members.len()];
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..keys {
        let key = rng.u64(100_000..=999_999);
        let slot = config
            .ring
            .request_hash
            .request_slot(key, config.ring.slots);
        if let Some(owner) = ring.owner(slot) {
            if let Some(i) = members.iter().position(|(id, _)| *id == owner) {
                counts[i] += 1;
            }
        }
    }
    Ok(members.iter().map(|(_, n)| n.clone()).zip(counts).collect())
}

/// `ringgate simulate` as a table, with the spread (max/mean) and standard deviation.
pub fn simulate_report(config: &Config, keys: u64, seed: u64) -> Result<String, RingError> {
    let counts = simulate(config, keys, seed)?;
    let mut out = String::new();
    let _ = writeln!(out, "{}", summary(config));
    let _ = writeln!(out, "{keys} random 6-digit keys (seed {seed})");
    let _ = writeln!(out, "{:<16} {:>9} {:>8}", "server", "requests", "share");
    for (name, c) in &counts {
        let share = if keys > 0 {
            100.0 * *c as f64 / keys as f64
        } else {
            0.0
        };
        let bar = "#".repeat((share / 2.0).round() as usize);
        let _ = writeln!(out, "{name:<16} {c:>9} {share:>7.2}%  {bar}");
    }
    if !counts.is_empty() {
        let n = counts.len() as f64;
        let mean = keys as f64 / n;
        let max = counts.iter().map(|(_, c)| *c).max().unwrap_or(0) as f64;
        let var = counts
            .iter()
            .map(|(_, c)| (*c as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let _ = writeln!(
            out,
            "mean {mean:.1}, std dev {:.1} ({:.1}% of mean), max/mean {:.2}",
            var.sqrt(),
            if mean > 0.0 {
                100.0 * var.sqrt() / mean
            } else {
                0.0
            },
            if mean > 0.0 { max / mean } else { 0.0 }
        );
    }
    Ok(out)
}

/// `name_of` for reports that print owners by name.
pub fn owner_name(config: &Config, slot: u32) -> Result<Option<String>, RingError> {
    let members = initial_members(config);
    let (_, ring) = build_ring(config, &members)?;
    Ok(ring.owner(slot).map(|id| name_of(&members, id).to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulate_counts_every_key_once() {
        let c = Config::default();
        let counts = simulate(&c, 10_000, 1).expect("ring");
        assert_eq!(counts.len(), 3);
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 10_000);
        assert_eq!(
            counts,
            simulate(&c, 10_000, 1).expect("ring"),
            "deterministic for a seed"
        );
    }

    #[test]
    fn ring_report_lists_every_server() {
        let r = ring_report(&Config::default()).expect("ring");
        for name in ["server-1", "server-2", "server-3"] {
            assert!(r.contains(name), "{r}");
        }
        assert!(
            r.contains("26 29 34 41 50 61 74 89 106"),
            "server 1's specified Φ positions: {r}"
        );
    }
}
