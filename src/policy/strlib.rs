//! The string functions that could run long or allocate without bound inside one C call,
//! replaced in the sandbox by Rust versions that count their work on the call's [`Meter`]:
//! `string.rep` (its result is sized before anything is allocated) and the pattern functions
//! `find`, `match`, `gmatch` and `gsub` (on the step-counted matcher of `pattern`).
//!
//! Owns: Lua's argument rules and results for these five functions (positions, plain
//! `find`, captures, `gsub`'s replacement forms and count) and their size cap. Must not touch:
//! the matcher's semantics (`pattern`), the other library functions (`prelude.lua`).

use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Value};

use super::meter::Meter;
use super::pattern::{find_plain, has_specials, Capture, Matcher, PatternError, Steps};

/// Installs the Rust versions into the `string` table of `lua`. Results larger than
/// `max_result` bytes (the state's memory limit) are refused before they are built.
pub(super) fn install(lua: &Lua, meter: &Arc<Meter>, max_result: usize) -> mlua::Result<()> {
    let string: Table = lua.globals().raw_get("string")?;
    let m = Arc::clone(meter);
    string.raw_set(
        "rep",
        lua.create_function(move |lua, args: MultiValue| rep(lua, &m, max_result, &Args(args)))?,
    )?;
    let m = Arc::clone(meter);
    string.raw_set(
        "find",
        lua.create_function(move |lua, args: MultiValue| find(lua, &m, &Args(args), true))?,
    )?;
    let m = Arc::clone(meter);
    string.raw_set(
        "match",
        lua.create_function(move |lua, args: MultiValue| find(lua, &m, &Args(args), false))?,
    )?;
    let m = Arc::clone(meter);
    string.raw_set(
        "gmatch",
        lua.create_function(move |lua, args: MultiValue| gmatch(lua, &m, &Args(args)))?,
    )?;
    let m = Arc::clone(meter);
    string.raw_set(
        "gsub",
        lua.create_function(move |lua, args: MultiValue| gsub(lua, &m, max_result, &Args(args)))?,
    )?;
    Ok(())
}

/// `string.rep(s, n [, sep])`.
fn rep(lua: &Lua, meter: &Meter, max_result: usize, args: &Args) -> mlua::Result<mlua::String> {
    let s = args.string(lua, 1, "rep")?;
    let n = args.integer(lua, 2, "rep")?;
    let sep = args.opt_string(lua, 3, "rep")?;
    let (s_bytes, sep_bytes) = (s.as_bytes(), sep.as_ref().map(|x| x.as_bytes()));
    let sep_bytes: &[u8] = sep_bytes.as_deref().unwrap_or(b"");
    let Ok(n) = usize::try_from(n) else {
        return lua.create_string("");
    };
    // n·|s| + (n−1)·|sep|, in u128 so that no argument can overflow it.
    let total = (n as u128) * (s_bytes.len() as u128)
        + (n.saturating_sub(1) as u128) * (sep_bytes.len() as u128);
    if total == 0 {
        return lua.create_string("");
    }
    if total > max_result as u128 {
        return Err(located(
            lua,
            format!(
                "string.rep: the result would be {total} bytes, more than the policy memory \
                 limit of {max_result} bytes"
            ),
        ));
    }
    // Copying runs at memory speed: charge a step per 256 bytes, checked before the copy.
    meter
        .spend(u32::try_from(total / 256).unwrap_or(u32::MAX))
        .map_err(|stop| mlua::Error::runtime(stop.message()))?;
    let mut unit = Vec::with_capacity(s_bytes.len() + sep_bytes.len());
    unit.extend_from_slice(&s_bytes);
    unit.extend_from_slice(sep_bytes);
    // `repeat` doubles its buffer: O(total) with few, large copies.
    let mut out = unit.repeat(n - 1);
    out.extend_from_slice(&s_bytes);
    lua.create_string(&out)
}

/// `string.find(s, p [, init [, plain]])` and (`is_find == false`) `string.match(s, p [, init])`.
fn find(lua: &Lua, meter: &Meter, args: &Args, is_find: bool) -> mlua::Result<MultiValue> {
    let name = if is_find { "find" } else { "match" };
    let s = args.string(lua, 1, name)?;
    let p = args.string(lua, 2, name)?;
    let (subject, pattern) = (s.as_bytes(), p.as_bytes());
    let init = start_position(args.opt_integer(lua, 3, name)?.unwrap_or(1), subject.len());
    if init > subject.len() {
        return Ok(MultiValue::from_iter([Value::Nil]));
    }
    let plain = is_find && !matches!(args.get(4), Value::Nil | Value::Boolean(false));
    let mut fuel = |n| meter.spend(n).is_ok();
    let mut steps = Steps::new(meter.step(), &mut fuel);
    if is_find && (plain || !has_specials(&pattern)) {
        let found = find_plain(&subject, &pattern, init, &mut steps).and_then(|found| {
            steps.flush()?;
            Ok(found)
        });
        return match found.map_err(|e| pattern_error(lua, meter, e))? {
            Some(start) => Ok(MultiValue::from_iter([
                Value::Integer(as_lua_int(start + 1)),
                Value::Integer(as_lua_int(start + pattern.len())),
            ])),
            None => Ok(MultiValue::from_iter([Value::Nil])),
        };
    }
    let (anchor, pat) = match pattern.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, &pattern[..]),
    };
    let mut m = Matcher::new(&subject, pat, &mut steps);
    let found = m.search(init, anchor);
    let result = match found {
        Ok(Some((start, end))) => {
            let captures = m.captures(start, end, !is_find);
            steps.flush().and(captures).map(|c| Some((start, end, c)))
        }
        Ok(None) => steps.flush().map(|()| None),
        Err(e) => Err(e),
    }
    .map_err(|e| pattern_error(lua, meter, e))?;
    let Some((start, end, captures)) = result else {
        return Ok(MultiValue::from_iter([Value::Nil]));
    };
    let mut out = Vec::with_capacity(captures.len() + 2);
    if is_find {
        out.push(Value::Integer(as_lua_int(start + 1)));
        out.push(Value::Integer(as_lua_int(end)));
    }
    for c in captures {
        out.push(capture_value(lua, &subject, c)?);
    }
    Ok(MultiValue::from_iter(out))
}

/// `string.gmatch(s, p [, init])`: an iterator over the matches (`^` is not an anchor here).
fn gmatch(lua: &Lua, meter: &Arc<Meter>, args: &Args) -> mlua::Result<Function> {
    let s = args.string(lua, 1, "gmatch")?;
    let p = args.string(lua, 2, "gmatch")?;
    let len = s.as_bytes().len();
    let init = args.opt_integer(lua, 3, "gmatch")?.unwrap_or(1);
    let mut src = start_position(init, len).min(len + 1);
    let mut last_match: Option<usize> = None;
    let meter = Arc::clone(meter);
    lua.create_function_mut(move |lua, ()| {
        let (subject, pattern) = (s.as_bytes(), p.as_bytes());
        let mut fuel = |n| meter.spend(n).is_ok();
        let mut steps = Steps::new(meter.step(), &mut fuel);
        let mut m = Matcher::new(&subject, &pattern, &mut steps);
        let mut found = Ok(None);
        while src <= subject.len() {
            match m.match_at(src) {
                Ok(Some(end)) if Some(end) != last_match => {
                    found = m.captures(src, end, true).map(Some);
                    src = end;
                    last_match = Some(end);
                    break;
                }
                Ok(_) => src += 1,
                Err(e) => {
                    found = Err(e);
                    break;
                }
            }
        }
        let found = steps
            .flush()
            .and(found)
            .map_err(|e| pattern_error(lua, &meter, e))?;
        let mut out = Vec::new();
        for c in found.unwrap_or_default() {
            out.push(capture_value(lua, &subject, c)?);
        }
        Ok(MultiValue::from_iter(out))
    })
}

/// The replacement argument of `gsub`.
enum Replacement {
    Text(mlua::String),
    Table(Table),
    Function(Function),
}

/// `string.gsub(s, p, repl [, n])`.
fn gsub(lua: &Lua, meter: &Meter, max_result: usize, args: &Args) -> mlua::Result<(Value, i64)> {
    let original = args.get(1);
    let s = args.string(lua, 1, "gsub")?;
    let p = args.string(lua, 2, "gsub")?;
    let (subject, pattern) = (s.as_bytes(), p.as_bytes());
    // Lua reads the count before it checks the replacement's type.
    let max_n = args
        .opt_integer(lua, 4, "gsub")?
        .unwrap_or(as_lua_int(subject.len() + 1));
    let repl = match args.get(3) {
        Value::Table(t) => Replacement::Table(t),
        Value::Function(f) => Replacement::Function(f),
        Value::String(_) | Value::Integer(_) | Value::Number(_) => {
            Replacement::Text(args.string(lua, 3, "gsub")?)
        }
        _ => {
            return Err(bad_argument(
                lua,
                3,
                "gsub",
                &format!("string/function/table expected, got {}", args.type_name(3)),
            ))
        }
    };
    let (anchor, pat) = match pattern.split_first() {
        Some((b'^', rest)) => (true, rest),
        _ => (false, &pattern[..]),
    };
    let mut fuel = |n| meter.spend(n).is_ok();
    let mut steps = Steps::new(meter.step(), &mut fuel);
    let mut m = Matcher::new(&subject, pat, &mut steps);
    let mut out = Output {
        bytes: Vec::new(),
        max: max_result,
    };
    let (mut src, mut last_match, mut n, mut changed) = (0usize, None, 0i64, false);
    while n < max_n {
        let attempt = m.match_at(src).map_err(|e| pattern_error(lua, meter, e))?;
        match attempt {
            Some(end) if Some(end) != last_match => {
                n += 1;
                changed |= add_value(lua, &m, &mut out, &subject, src, end, &repl)?;
                src = end;
                last_match = Some(end);
            }
            _ if src < subject.len() => {
                out.push(lua, &subject[src..=src])?;
                src += 1;
            }
            _ => break,
        }
        if anchor {
            break;
        }
    }
    steps.flush().map_err(|e| pattern_error(lua, meter, e))?;
    if !changed {
        return Ok((original, n));
    }
    out.push(lua, &subject[src..])?;
    Ok((Value::String(lua.create_string(&out.bytes)?), n))
}

/// A result being built in Rust memory, refused past the state's memory limit.
struct Output {
    bytes: Vec<u8>,
    max: usize,
}

impl Output {
    fn push(&mut self, lua: &Lua, more: &[u8]) -> mlua::Result<()> {
        if self.bytes.len() + more.len() > self.max {
            return Err(located(
                lua,
                format!(
                    "string.gsub: the result would be more than the policy memory limit of {} bytes",
                    self.max
                ),
            ));
        }
        self.bytes.extend_from_slice(more);
        Ok(())
    }
}

/// Appends the replacement of the match `s..e` (`add_value`); whether the text changed.
fn add_value(
    lua: &Lua,
    m: &Matcher<'_, '_>,
    out: &mut Output,
    subject: &[u8],
    s: usize,
    e: usize,
    repl: &Replacement,
) -> mlua::Result<bool> {
    let value = match repl {
        Replacement::Text(text) => {
            add_text(lua, m, out, subject, s, e, &text.as_bytes())?;
            return Ok(true);
        }
        Replacement::Table(t) => {
            let key = m
                .capture(0, s, e)
                .map_err(|e| plain_pattern_error(lua, e))?;
            t.get::<Value>(capture_value(lua, subject, key)?)?
        }
        Replacement::Function(f) => {
            let captures = m
                .captures(s, e, true)
                .map_err(|e| plain_pattern_error(lua, e))?;
            let args = captures
                .into_iter()
                .map(|c| capture_value(lua, subject, c))
                .collect::<mlua::Result<Vec<_>>>()?;
            f.call::<Value>(MultiValue::from_iter(args))?
        }
    };
    match value {
        Value::Nil | Value::Boolean(false) => {
            out.push(lua, &subject[s..e])?;
            Ok(false)
        }
        v @ (Value::String(_) | Value::Integer(_) | Value::Number(_)) => {
            let text = lua.coerce_string(v)?.map(|t| t.as_bytes().to_vec());
            out.push(lua, &text.unwrap_or_default())?;
            Ok(true)
        }
        other => Err(located(
            lua,
            format!("invalid replacement value (a {})", type_name(&other)),
        )),
    }
}

/// A replacement string with `%0`–`%9` and `%%` (`add_s`).
fn add_text(
    lua: &Lua,
    m: &Matcher<'_, '_>,
    out: &mut Output,
    subject: &[u8],
    s: usize,
    e: usize,
    text: &[u8],
) -> mlua::Result<()> {
    let mut rest = text;
    while let Some(at) = rest.iter().position(|&b| b == b'%') {
        out.push(lua, &rest[..at])?;
        let code = rest.get(at + 1).copied().unwrap_or(0);
        match code {
            b'%' => out.push(lua, b"%")?,
            b'0' => out.push(lua, &subject[s..e])?,
            b'1'..=b'9' => {
                let c = m
                    .capture(usize::from(code - b'1'), s, e)
                    .map_err(|e| plain_pattern_error(lua, e))?;
                match c {
                    Capture::Span(a, b) => out.push(lua, &subject[a..b])?,
                    Capture::Position(p) => out.push(lua, p.to_string().as_bytes())?,
                }
            }
            _ => {
                return Err(located(
                    lua,
                    "invalid use of '%' in replacement string".to_string(),
                ))
            }
        }
        rest = rest.get(at + 2..).unwrap_or_default();
    }
    out.push(lua, rest)
}

fn capture_value(lua: &Lua, subject: &[u8], c: Capture) -> mlua::Result<Value> {
    Ok(match c {
        Capture::Span(a, b) => Value::String(lua.create_string(&subject[a..b])?),
        Capture::Position(p) => Value::Integer(as_lua_int(p)),
    })
}

/// A matcher error as Lua would raise it; a stop keeps the meter's message (the meter
/// remembers why, so `pcall` re-raises it).
fn pattern_error(lua: &Lua, meter: &Meter, e: PatternError) -> mlua::Error {
    match (e, meter.stopped()) {
        (PatternError::Stopped, Some(stop)) => mlua::Error::runtime(stop.message()),
        (e, _) => plain_pattern_error(lua, e),
    }
}

fn plain_pattern_error(lua: &Lua, e: PatternError) -> mlua::Error {
    located(lua, e.to_string())
}

/// `posrelatI`: a 1-based start position, negative counting from the end, clipped to 1;
/// returned 0-based (so it may be `len`, or past it).
fn start_position(pos: i64, len: usize) -> usize {
    let len_i = i64::try_from(len).unwrap_or(i64::MAX);
    if pos > 0 {
        usize::try_from(pos - 1).unwrap_or(usize::MAX)
    } else if pos == 0 || pos < -len_i {
        0
    } else {
        // -len <= pos < 0
        len - usize::try_from(-pos).unwrap_or(len)
    }
}

fn as_lua_int(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        _ => v.type_name(),
    }
}

/// The arguments of a call, 1-based as Lua counts them; an absent one reads as `nil` but is
/// named "no value" in errors, as Lua does.
struct Args(MultiValue);

impl Args {
    fn get(&self, i: usize) -> Value {
        self.0.get(i - 1).cloned().unwrap_or(Value::Nil)
    }

    fn type_name(&self, i: usize) -> &'static str {
        match self.0.get(i - 1) {
            None => "no value",
            Some(v) => type_name(v),
        }
    }

    /// `luaL_checklstring`: a string, or a number converted to one.
    fn string(&self, lua: &Lua, i: usize, name: &str) -> mlua::Result<mlua::String> {
        match self.get(i) {
            Value::String(s) => Ok(s),
            v @ (Value::Integer(_) | Value::Number(_)) => lua
                .coerce_string(v)?
                .ok_or_else(|| bad_argument(lua, i, name, "string expected, got number")),
            _ => Err(bad_argument(
                lua,
                i,
                name,
                &format!("string expected, got {}", self.type_name(i)),
            )),
        }
    }

    fn opt_string(&self, lua: &Lua, i: usize, name: &str) -> mlua::Result<Option<mlua::String>> {
        match self.get(i) {
            Value::Nil => Ok(None),
            _ => self.string(lua, i, name).map(Some),
        }
    }

    /// `luaL_checkinteger`: an integer, a float with an integral value, or a numeric string.
    fn integer(&self, lua: &Lua, i: usize, name: &str) -> mlua::Result<i64> {
        let v = self.get(i);
        if let Some(n) = lua.coerce_integer(v.clone())? {
            return Ok(n);
        }
        let what = if matches!(v, Value::Number(_)) || lua.coerce_number(v)?.is_some() {
            "number has no integer representation".to_string()
        } else {
            format!("number expected, got {}", self.type_name(i))
        };
        Err(bad_argument(lua, i, name, &what))
    }

    fn opt_integer(&self, lua: &Lua, i: usize, name: &str) -> mlua::Result<Option<i64>> {
        match self.get(i) {
            Value::Nil => Ok(None),
            _ => self.integer(lua, i, name).map(Some),
        }
    }
}

/// `luaL_argerror`: names the function as the caller called it, and does not count `self`
/// in a method call.
fn bad_argument(lua: &Lua, arg: usize, name: &str, what: &str) -> mlua::Error {
    let (called, method) = lua
        .inspect_stack(0)
        .map(|d| {
            let names = d.names();
            (
                names.name.map(|n| n.into_owned()),
                names.name_what == Some("method"),
            )
        })
        .unwrap_or((None, false));
    let name = called.unwrap_or_else(|| name.to_string());
    match (method, arg) {
        (true, 1) => located(lua, format!("calling '{name}' on bad self ({what})")),
        (true, _) => located(
            lua,
            format!("bad argument #{} to '{name}' ({what})", arg - 1),
        ),
        (false, _) => located(lua, format!("bad argument #{arg} to '{name}' ({what})")),
    }
}

/// An error with the caller's position in front, as `luaL_error` writes it.
fn located(lua: &Lua, message: String) -> mlua::Error {
    let place = lua.inspect_stack(1).and_then(|d| {
        let line = d.curr_line();
        let src = d.source().short_src.map(|s| s.into_owned());
        src.filter(|_| line > 0).map(|s| format!("{s}:{line}: "))
    });
    mlua::Error::runtime(format!("{}{message}", place.unwrap_or_default()))
}
