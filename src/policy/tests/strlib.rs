//! The Rust string functions against Lua's own C ones: the same results, the same errors,
//! on a corpus of subjects, patterns, positions and replacements; and their size cap.

use super::*;
use crate::policy::meter::Meter;
use crate::policy::sandbox::error_message;
use crate::policy::strlib;

/// A plain Lua state with the C string library, and one with the Rust functions installed.
fn states() -> (mlua::Lua, mlua::Lua, Arc<Meter>) {
    let c = mlua::Lua::new();
    let rust = mlua::Lua::new();
    let meter = Arc::new(Meter::new(u32::MAX));
    meter.start(Duration::from_secs(60));
    strlib::install(&rust, &meter, 1 << 20).expect("install");
    for lua in [&c, &rust] {
        lua.load(
            r#"function ser(...)
                 local t = {}
                 for i = 1, select('#', ...) do
                   local v = select(i, ...)
                   t[i] = type(v) .. ':' .. tostring(v)
                 end
                 return table.concat(t, ',')
               end
               function all(f, s)
                 local out = {}
                 for a, b, c in f do out[#out + 1] = ser(a, b, c) end
                 return table.concat(out, ';')
               end"#,
        )
        .exec()
        .expect("helpers");
    }
    (c, rust, meter)
}

/// Runs `code` in both states: equal results, or both an error with the same message.
fn same(c: &mlua::Lua, rust: &mlua::Lua, code: &str) {
    let expected = c.load(code).set_name("=case").eval::<String>();
    let got = rust.load(code).set_name("=case").eval::<String>();
    match (expected, got) {
        (Ok(e), Ok(g)) => assert_eq!(g, e, "{code}"),
        (Err(e), Err(g)) => {
            let (e, g) = (error_message(&e), error_message(&g));
            assert_eq!(g, e, "{code}");
        }
        (e, g) => panic!("{code}: C gave {e:?}, Rust gave {g:?}"),
    }
}

const SUBJECTS: &[&str] = &[
    "",
    "hello world",
    "  key = value  ",
    "aaa",
    "THE (quick) fox",
    "a.b.c",
    "x=1&id=42&y=3",
    "[[nested]] (a(b)c) f(x)",
    "a\\0b\\0",
    "f\\195\\182\\195\\182 b\\195\\164r",
    "line1\\nline2\\t\\v end",
    "session=abc123; theme=dark",
];

const PATTERNS: &[&str] = &[
    "",
    "o",
    "l+",
    "l*",
    "l-",
    "l?",
    "^h",
    "d$",
    "^$",
    "$",
    "^",
    "%a+",
    "%d+",
    "%s*(%S+)%s*=%s*(%S+)",
    "(%w+)=(%w+)",
    "()ll()",
    "()",
    "%((%a+)%)",
    "%b()",
    "%b[]",
    "%f[%w]%w+",
    "%f[%W]",
    "[%w_]+",
    "[^%s]+",
    "[a-c]+",
    "[]]",
    "[^]]",
    "[a-]",
    "[-a]",
    "(a)%1",
    "((a)(a))",
    ".-b",
    "a.-c",
    "x*$",
    "%.",
    "[%.]",
    "%%",
    "(",
    "%",
    "[a",
    "[^",
    "%b",
    "%bx",
    "%f",
    "%fx",
    "(()",
    "%1",
    "a)",
    "%z",
    "[%z]",
    "%g+",
    "%p+",
    "%c",
    "%x+",
    "%u%l",
    "%W+",
    ".",
    "..",
    "(.)(.)(.)",
    "^(%a+)",
    "[^%a]",
    "[%a-z]",
    "(a*(.)%w(%s*))",
    "%0",
    "(%a)%2",
    "[%d]-=",
    "%s*;%s*session=([^;%s]+)",
    "\\0",
    "[\\0-\\31]",
    "%S+$",
    "^%s*(.-)%s*$",
    "[%]]",
    "[%%]",
    "a?b?c?",
    "(h)(e)(l)(l)(o)",
];

#[test]
fn find_and_match_agree_with_lua() {
    let (c, rust, _) = states();
    for s in SUBJECTS {
        for p in PATTERNS {
            for init in ["nil", "1", "2", "0", "-1", "-3", "100", "2.0"] {
                same(
                    &c,
                    &rust,
                    &format!("return ser(string.find('{s}', '{p}', {init}))"),
                );
                same(
                    &c,
                    &rust,
                    &format!("return ser(string.match('{s}', '{p}', {init}))"),
                );
            }
            same(
                &c,
                &rust,
                &format!("return ser(string.find('{s}', '{p}', 1, true))"),
            );
            same(
                &c,
                &rust,
                &format!("return ser(('{s}'):find('{p}', 2, 'yes'))"),
            );
        }
    }
}

#[test]
fn gmatch_agrees_with_lua() {
    let (c, rust, _) = states();
    for s in SUBJECTS {
        for p in PATTERNS {
            same(
                &c,
                &rust,
                &format!("return all(string.gmatch('{s}', '{p}'))"),
            );
            same(
                &c,
                &rust,
                &format!("return all(string.gmatch('{s}', '{p}', 3))"),
            );
        }
    }
}

#[test]
fn gsub_agrees_with_lua() {
    let (c, rust, _) = states();
    let replacements = [
        "'<%0>'",
        "'%1-%1'",
        "'%%'",
        "'%2'",
        "'x'",
        "''",
        "'%'",
        "'%a'",
        "7",
        "{hello = 'HI', a = false, l = 1.5, o = {}}",
        "function(a, b) return b end",
        "function(a) return #a end",
        "function() return {} end",
        "function(a) if a == 'l' then return nil end return a:upper() end",
        "true",
    ];
    for s in SUBJECTS {
        for p in PATTERNS {
            for r in replacements {
                for n in ["nil", "1", "0", "-1", "2.5"] {
                    same(
                        &c,
                        &rust,
                        &format!("return ser(string.gsub('{s}', '{p}', {r}, {n}))"),
                    );
                }
            }
        }
    }
}

#[test]
fn rep_agrees_with_lua() {
    let (c, rust, _) = states();
    for args in [
        "'ab', 3",
        "'ab', 3, ', '",
        "'', 5, '-'",
        "'x', 0",
        "'x', -2",
        "'x', 1, 'sep'",
        "12, 2",
        "'x', 2.0",
        "'x', 2.5",
        "'x', '3'",
        "'x', 'three'",
        "nil, 1",
        "{}, 1",
        "'x', nil",
        "'x', 2, {}",
    ] {
        same(&c, &rust, &format!("return ser(string.rep({args}))"));
    }
}

#[test]
fn argument_errors_agree_with_lua() {
    let (c, rust, _) = states();
    for code in [
        "string.find()",
        "string.find('a')",
        "string.find({}, 'a')",
        "string.find('a', 'a', {})",
        "string.find('a', 'a', 1.5)",
        "string.match('a', nil)",
        "string.gmatch(nil, 'a')",
        "string.gsub('a', 'a')",
        "string.gsub('a', 'a', nil)",
        "string.gsub('a', 'a', 'b', 'x')",
        "('a'):rep()",
        "('a'):find({})",
        "(function() local f = string.match return f(nil, 'a') end)()",
        "string.find(nil)",
    ] {
        same(&c, &rust, &format!("return ser({code})"));
    }
}

#[test]
fn pattern_too_complex_and_too_many_captures_agree_with_lua() {
    let (c, rust, _) = states();
    same(
        &c,
        &rust,
        "return ser(string.find(string.rep('a', 300), string.rep('(a)', 33)))",
    );
    same(
        &c,
        &rust,
        "return ser(string.match(string.rep('a', 300), string.rep('a?', 250)))",
    );
    same(
        &c,
        &rust,
        "return ser(string.match(string.rep('(', 40) .. 'x', string.rep('%(', 40) .. '(x)'))",
    );
}

#[test]
fn results_above_the_cap_are_refused_before_they_are_built() {
    let (_, rust, _) = states();
    let err = rust
        .load("return string.rep('x', 2^20 + 1)")
        .eval::<String>()
        .expect_err("refused");
    let m = error_message(&err);
    assert!(m.contains("more than the policy memory limit"), "{m}");
    // The empty result of a billion repetitions is instant: nothing is built, nothing looped.
    let started = Instant::now();
    let r: String = rust
        .load("return string.rep('', 1e9) .. string.rep('', 1e9, '')")
        .eval()
        .expect("empty");
    assert!(r.is_empty());
    assert!(started.elapsed() < Duration::from_secs(1));
    let big: usize = rust
        .load("return #string.rep('ab', 1000, ', ')")
        .eval()
        .expect("fits");
    assert_eq!(big, 1000 * 2 + 999 * 2);
    let err = rust
        .load("return (string.gsub(string.rep('x', 2^10), '', string.rep('y', 2^10)))")
        .eval::<String>()
        .expect_err("refused");
    assert!(error_message(&err).contains("memory limit"), "{err}");
}
