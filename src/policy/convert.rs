//! Values between Rust and Lua: the `req` table of `request_key`, the `probe` table of
//! `health`, and the conversion of a hook's result into a slot or a key.
//!
//! Owns: how a request looks to Lua (`req.headers` lower-cased and joined) and what counts as
//! an integer slot. Must not touch: the call path, limits or statistics.

use mlua::{Lua, Table, Value};

use super::{KeyRequest, ProbeView};

/// Runs `build` with the state's memory limit lifted, then restores it.
///
/// While a limit is set, mlua wraps every string push and table write in a protected call
/// (about 0.2 µs each), which made building `req` cost microseconds. The tables built here
/// are bounded by the request (its headers are already in memory), so they are built
/// unprotected; the allocation still counts, and the hook itself runs under the limit.
pub(super) fn without_memory_limit<R>(
    lua: &Lua,
    limit: usize,
    build: impl FnOnce() -> mlua::Result<R>,
) -> mlua::Result<R> {
    lua.set_memory_limit(0)?;
    let built = build();
    lua.set_memory_limit(limit)?;
    built
}

/// The `req` table for `request_key`.
pub(super) fn key_table(lua: &Lua, req: &KeyRequest<'_>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 5)?;
    t.raw_set("method", req.method)?;
    t.raw_set("path", req.path)?;
    t.raw_set("query", req.query)?;
    t.raw_set("client_ip", req.client_ip)?;
    t.raw_set("headers", header_table(lua, req.headers)?)?;
    Ok(t)
}

/// `req.headers`: lower-cased names; repeated names joined in order with `", "` (`"; "` for
/// `cookie`, as RFC 6265 wants).
fn header_table(lua: &Lua, headers: &[(&str, &[u8])]) -> mlua::Result<Table> {
    let table = lua.create_table_with_capacity(0, headers.len())?;
    let mut named: Vec<(std::borrow::Cow<'_, str>, &[u8])> = headers
        .iter()
        .map(|(name, value)| {
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(name.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(*name)
            };
            (name, *value)
        })
        .collect();
    // Stable: repeated headers keep their order.
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rest = named.as_slice();
    while let Some(((name, value), tail)) = rest.split_first() {
        let same = tail.iter().take_while(|(n, _)| n == name).count();
        if same == 0 {
            table.raw_set(name.as_ref(), lua.create_string(value)?)?;
        } else {
            let sep: &[u8] = if name == "cookie" { b"; " } else { b", " };
            let mut joined = value.to_vec();
            for (_, more) in &tail[..same] {
                joined.extend_from_slice(sep);
                joined.extend_from_slice(more);
            }
            table.raw_set(name.as_ref(), lua.create_string(&joined)?)?;
        }
        rest = &tail[same..];
    }
    Ok(table)
}

/// A float with an exact integral value in `i64` range, like Lua's `math.tointeger`.
pub(super) fn float_to_int(x: f64) -> Option<i64> {
    // 2^63 as f64 is exact; the half-open range excludes it, and NaN fails `contains`.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if x.fract() == 0.0 && (-TWO_63..TWO_63).contains(&x) {
        Some(x as i64)
    } else {
        None
    }
}

pub(super) fn slot_of(v: Value, slots: u32) -> Result<u32, Value> {
    let n = match v {
        Value::Integer(n) => n,
        Value::Number(x) => float_to_int(x).ok_or(Value::Number(x))?,
        other => return Err(other),
    };
    let slots = i64::from(slots.max(1));
    // rem_euclid of a positive u32 modulus is in 0..slots, so it fits in u32.
    Ok(u32::try_from(n.rem_euclid(slots)).unwrap_or(0))
}

/// The `probe` table for `health`.
pub(super) fn probe_table(lua: &Lua, probe: &ProbeView<'_>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, 3)?;
    t.raw_set("status", probe.status)?;
    t.raw_set("latency_ms", probe.latency_ms)?;
    t.raw_set("error", probe.error)?;
    Ok(t)
}
