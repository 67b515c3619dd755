//! State rules: what one call writes is gone for the next; what the files defined at load
//! persists, read-only; assignments to a file's top-level locals are rejected at load.

use super::*;

fn key(s: &PolicySet, auth: &str) -> HookOutcome<LuaKey> {
    let headers: &[(&str, &[u8])] = &[("authorization", auth.as_bytes())];
    s.request_key(&req("", headers))
}

fn text(v: &str) -> HookOutcome<LuaKey> {
    HookOutcome::Value(LuaKey::Str(v.to_string()))
}

fn read_only_error(o: HookOutcome<u32>) {
    match o {
        HookOutcome::Failed(HookError::Runtime(m)) => {
            assert!(m.contains("read-only"), "{m}");
        }
        other => panic!("expected a read-only error, got {other:?}"),
    }
}

#[test]
fn a_global_written_by_one_request_is_gone_for_the_next() {
    let s = set(&[(
        "k.lua",
        r#"function request_key(req)
             local previous = stash
             stash = req.headers.authorization
             _G.other = stash
             rawset(_G, 'raw', stash)
             return (previous or 'none') .. '|' .. tostring(other) .. '|' .. tostring(raw)
           end"#,
    )]);
    assert_eq!(
        key(&s, "Bearer alice"),
        text("none|Bearer alice|Bearer alice")
    );
    assert_eq!(key(&s, "Bearer bob"), text("none|Bearer bob|Bearer bob"));
    // Also after a call that failed half-way.
    let s = set(&[(
        "k.lua",
        r#"function request_key(req)
             local previous = stash
             stash = req.headers.authorization
             if stash == 'fail' then error('half-way') end
             return previous or 'none'
           end"#,
    )]);
    assert!(matches!(key(&s, "fail"), HookOutcome::Failed(_)));
    assert_eq!(key(&s, "Bearer bob"), text("none"));
}

#[test]
fn load_time_globals_persist_and_a_call_can_only_shadow_them() {
    let s = set(&[(
        "g.lua",
        r#"mode = 'loaded'
           function request_hash(i)
             local seen = mode
             if i == 1 then mode = 'changed' end
             if i == 2 then mode = nil end
             return seen == 'loaded' and 1 or 0
           end"#,
    )]);
    for i in [1, 2, 3, 1] {
        assert_eq!(s.request_hash(i, 8), HookOutcome::Value(1), "{i}");
    }
}

#[test]
fn module_level_tables_are_read_only_in_hooks() {
    for (name, src) in [
        (
            "local table",
            "local cache = {}\nfunction request_hash(i) cache[i] = true return 1 end",
        ),
        (
            "global table",
            "CONFIG = {a = 1}\nfunction request_hash(i) CONFIG.b = 2 return 1 end",
        ),
        (
            "nested table",
            "local C = {inner = {}}\nfunction request_hash(i) C.inner[1] = i return 1 end",
        ),
        (
            "table in a closure made at load",
            "local function counter() local t = {} return function(k) t[k] = 1 end end\nlocal count = counter()\nfunction request_hash(i) count(i) return 1 end",
        ),
        ("string library", "function request_hash() string.evil = 1 return 1 end"),
        ("math library", "function request_hash() math.pi = 3 return 1 end"),
        (
            "string metatable",
            "function request_hash() getmetatable('').__index.upper = nil return 1 end",
        ),
        (
            "rawset",
            "local cache = {}\nfunction request_hash(i) rawset(cache, i, true) return 1 end",
        ),
        (
            "table.insert",
            "local list = {}\nfunction request_hash(i) table.insert(list, i) return 1 end",
        ),
    ] {
        let s = set(&[("m.lua", src)]);
        read_only_error(s.request_hash(1, 8));
        assert_eq!(s.stats().errors(Hook::RequestHash), 1, "{name}");
    }
}

#[test]
fn frozen_tables_read_as_before() {
    let s = set(&[(
        "r.lua",
        r#"local LIST = {10, 20, 30}
           local MAP = {a = 1, b = 2}
           local EMPTY = {}
           local Point = {}
           Point.__index = Point
           function Point.new(x) return setmetatable({x = x}, Point) end
           function Point:double() return self.x * 2 end
           local DEFAULTS = setmetatable({}, {__index = function(t, k) return k .. '!' end})
           local Counted = setmetatable({1, 2}, {__len = function() return 99 end})
           function request_hash(i)
             assert(#LIST == 3 and LIST[2] == 20 and rawget(LIST, 3) == 30 and rawlen(LIST) == 3)
             local sum = 0
             for _, v in ipairs(LIST) do sum = sum + v end
             for k, v in pairs(MAP) do sum = sum + v end
             local n = 0
             for k in next, MAP do n = n + 1 end
             assert(sum == 63 and n == 2 and next(EMPTY) == nil and next(MAP) ~= nil)
             assert(table.concat(LIST, ',') == '10,20,30' and select('#', table.unpack(LIST)) == 3)
             assert(DEFAULTS.x == 'x!' and #Counted == 99)
             local p = Point.new(i)
             assert(getmetatable(p) == Point)
             assert(not pcall(setmetatable, Point, nil))
             p.y = 1 -- a table made in the call is the call's own
             return p:double()
           end"#,
    )]);
    assert_eq!(s.request_hash(21, 512), HookOutcome::Value(42));
    assert_eq!(s.request_hash(4, 512), HookOutcome::Value(8));
}

#[test]
fn assigning_a_top_level_local_from_a_function_is_rejected_at_load() {
    for (src, line, name) in [
        (
            "local n = 0\nfunction request_hash()\n  n = n + 1\n  return n\nend",
            3,
            "n",
        ),
        (
            "local last\nlocal function remember(v) last = v end\nfunction request_key(req) remember(req.path) end",
            2,
            "last",
        ),
        (
            "handler = load('local hits = 0 return function() hits = hits + 1 end')()\nfunction request_hash() handler() return 1 end",
            1,
            "hits",
        ),
    ] {
        let err = try_set(&[("w.lua", src)], PolicyLimits::default()).expect_err("rejected");
        match &err {
            PolicyError::ModuleStateWrite { line: l, name: n, .. } => {
                assert_eq!((*l, n.as_str()), (line, name), "{src}");
            }
            other => panic!("{src}: {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("read-only once the policy has loaded"), "{text}");
    }
    // A function that no hook can reach may do what it likes at load time.
    let s = set(&[(
        "ok.lua",
        "local n = 0\nlocal function bump() n = n + 1 end\nbump() bump()\nlocal N = n\nfunction request_hash() return N end",
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(2));
    // Closures made in a call may assign the call's own locals.
    let s = set(&[(
        "ok.lua",
        "function request_hash() local c = 0 local function bump() c = c + 1 end bump() bump() return c end",
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(2));
}

#[test]
fn the_global_table_and_finalizers_are_out_of_reach() {
    let s = set(&[(
        "s.lua",
        r#"function request_hash(i)
             assert(getmetatable(_G) == false)
             assert(not pcall(setmetatable, _G, {}))
             assert(not pcall(setmetatable, {}, {__gc = function() end}))
             assert(type(getmetatable('')) == 'table' and getmetatable('').__index.upper)
             assert(('abc'):upper() == 'ABC' and debug == nil)
             return 1
           end"#,
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(1));
    let err = try_set(
        &[("g.lua", "setmetatable(_G, {})")],
        PolicyLimits::default(),
    )
    .expect_err("rejected");
    assert!(err.to_string().contains("global table"), "{err}");
}

#[test]
fn a_call_that_writes_many_globals_gets_a_fresh_state() {
    let s = set(&[(
        "many.lua",
        "function request_hash(i) for k = 1, i do _G['g' .. k] = k end return 1 end",
    )]);
    assert_eq!(s.request_hash(10, 8), HookOutcome::Value(1));
    assert_eq!(s.stats().state_builds(), 1);
    assert_eq!(s.request_hash(1000, 8), HookOutcome::Value(1));
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(1));
    assert_eq!(s.stats().state_builds(), 2, "rebuilt after 1000 globals");
}
