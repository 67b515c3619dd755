//! The upvalue-assignment scanner on real `string.dump` output of the vendored Lua.

use crate::policy::bytecode::{persistent_upvalue_write, to_be_closed, ToBeClosed, UpvalueWrite};

/// Compiles `src` (a chunk that returns one function) and scans the dump of that function.
fn scan(src: &str) -> Option<UpvalueWrite> {
    let lua = mlua::Lua::new();
    let f: mlua::Function = lua
        .load(src)
        .set_name("=t.lua")
        .eval()
        .expect("chunk returns a function");
    persistent_upvalue_write(&f.dump(false)).expect("readable dump")
}

#[test]
fn an_assignment_to_a_captured_local_is_found_with_its_line_and_name() {
    let w = scan("local count = 0\nreturn function()\n  local x = 1\n  count = count + x\nend")
        .expect("found");
    assert_eq!(
        w,
        UpvalueWrite {
            source: "=t.lua".into(),
            line: 4,
            name: "count".into()
        }
    );
}

#[test]
fn reading_captured_locals_and_writing_own_locals_is_fine() {
    assert_eq!(
        scan("local K, f = 3, math.floor\nreturn function(i) local n = i * K n = n + 1 return f(n) end"),
        None
    );
    // A closure made in the call may assign the call's own locals: they are fresh each call.
    assert_eq!(
        scan(
            "return function() local c = 0 local function bump() c = c + 1 end bump() return c end"
        ),
        None
    );
    // Globals are not upvalues: the sandbox clears them after each call.
    assert_eq!(scan("return function() seen = 1 end"), None);
}

#[test]
fn a_nested_closure_that_assigns_an_outer_captured_local_is_found() {
    let w = scan(
        "local last\nreturn function(v)\n  local function keep()\n    last = v\n  end\n  keep()\nend",
    )
    .expect("found");
    assert_eq!((w.line, w.name.as_str()), (4, "last"));
}

#[test]
fn assigning_env_itself_is_found() {
    let w = scan("return function() _ENV = {} end").expect("found");
    assert_eq!(w.name, "_ENV");
}

#[test]
fn long_functions_get_the_right_line() {
    // More than 128 instructions: the dump stores absolute line anchors.
    let mut src = String::from("local n\nreturn function()\n  local a = 0\n");
    for i in 0..300 {
        src.push_str(&format!("  a = a * {i} + 1\n"));
    }
    src.push_str("  n = a\nend\n");
    let w = scan(&src).expect("found");
    assert_eq!(w.line, 304);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bytes in [
        &b""[..],
        b"\x1bLua",
        b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\x04\x08\x08",
        b"hello",
    ] {
        assert!(persistent_upvalue_write(bytes).is_err());
    }
}

/// The first to-be-closed variable in the dump of the function `src` returns.
fn closable(src: &str) -> Option<ToBeClosed> {
    let lua = mlua::Lua::new();
    let f: mlua::Function = lua
        .load(src)
        .set_name("=t.lua")
        .eval()
        .expect("chunk returns a function");
    to_be_closed(&f.dump(false)).expect("readable dump")
}

#[test]
fn a_to_be_closed_variable_is_found_in_any_nested_function() {
    assert_eq!(
        closable("return function()\n  local x <close> = nil\nend"),
        Some(ToBeClosed {
            source: "=t.lua".into(),
            line: 2
        })
    );
    let nested = closable(
        "return function()\n  local function inner()\n    do\n      local y <close> = nil\n    end\n  end\n  return inner\nend",
    )
    .expect("found in the nested function");
    assert_eq!(nested.line, 4);
    // `<const>` is not closed, and a generic `for` is not a to-be-closed declaration.
    assert_eq!(
        closable("return function(t) local k <const> = 1 for a, b in pairs(t) do end return k end"),
        None
    );
}
