//! The sandbox: load errors, removed functions, the instruction budget and the memory limit.

use super::*;

#[test]
fn syntax_error_names_file_and_line_and_rejects_the_set() {
    let err = try_set(
        &[
            ("a.lua", "function request_hash() return 1 end"),
            ("b.lua", "local x = 1\n\nlocal y = = 2\n"),
        ],
        PolicyLimits::default(),
    )
    .expect_err("rejected");
    match &err {
        PolicyError::Syntax { file, line, .. } => {
            assert_eq!(file, "b.lua");
            assert_eq!(*line, 3);
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("b.lua line 3"), "{text}");
}

#[test]
fn top_level_runtime_error_names_file_and_line() {
    let err = try_set(
        &[("a.lua", "local t = nil\n\nlocal x = t.field\n")],
        PolicyLimits::default(),
    )
    .expect_err("rejected");
    match &err {
        PolicyError::Runtime {
            file,
            line,
            message,
        } => {
            assert_eq!(file, "a.lua");
            assert_eq!(*line, Some(3));
            assert!(message.contains("index"), "{message}");
        }
        other => panic!("expected a runtime error, got {other:?}"),
    }
}

#[test]
fn hook_that_is_not_a_function_is_rejected() {
    let err =
        try_set(&[("a.lua", "request_hash = 42")], PolicyLimits::default()).expect_err("rejected");
    match err {
        PolicyError::HookNotFunction { file, hook, found } => {
            assert_eq!(
                (file.as_str(), hook, found.as_str()),
                ("a.lua", "request_hash", "integer")
            );
        }
        other => panic!("expected HookNotFunction, got {other:?}"),
    }
}

#[test]
fn top_level_endless_loop_is_rejected_by_the_budget() {
    let started = Instant::now();
    let err = try_set(&[("loop.lua", "while true do end")], small_limits()).expect_err("rejected");
    assert!(
        matches!(&err, PolicyError::BudgetExceeded { file, .. } if file == "loop.lua"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn top_level_allocation_is_rejected_by_the_memory_limit() {
    let err = try_set(
        &[(
            "big.lua",
            "big = {} for k = 1, 1e9 do big[k] = string.rep('x', 1e5) .. k end",
        )],
        PolicyLimits {
            memory_limit: 2 * 1024 * 1024,
            instruction_budget: u32::MAX,
            ..PolicyLimits::default()
        },
    )
    .expect_err("rejected");
    assert!(matches!(err, PolicyError::MemoryExceeded { .. }), "{err:?}");
}

#[test]
fn endless_loop_runs_out_of_budget_and_the_state_still_works() {
    let s = try_set(
        &[(
            "l.lua",
            r#"calls = 0
               function request_hash(i, slots)
                 calls = calls + 1
                 if i == 0 then while true do end end
                 return calls
               end"#,
        )],
        small_limits(),
    )
    .expect("loads");
    assert_eq!(s.request_hash(1, 512), HookOutcome::Value(1));
    let started = Instant::now();
    assert_eq!(
        failed(s.request_hash(0, 512)),
        HookError::BudgetExceeded { budget: 100_000 }
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Same state, fresh budget; `calls` is back at its load-time value (see tests/state.rs).
    assert_eq!(s.request_hash(1, 512), HookOutcome::Value(1));
    assert_eq!(s.stats().state_builds(), 1);
}

#[test]
fn budget_cannot_be_caught_by_pcall() {
    let s = try_set(
        &[(
            "p.lua",
            r#"function request_hash()
                 while true do
                   pcall(function() while true do end end)
                   xpcall(function() while true do end end, function(e) return e end)
                 end
               end"#,
        )],
        small_limits(),
    )
    .expect("loads");
    let started = Instant::now();
    assert!(matches!(
        failed(s.request_hash(1, 8)),
        HookError::BudgetExceeded { .. }
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn pcall_still_catches_ordinary_errors() {
    let s = set(&[(
        "p.lua",
        r#"function request_hash()
             local ok, err = pcall(error, {code = 7})
             assert(not ok and err.code == 7)
             local ok2, v = pcall(function(a) return a + 1 end, 4)
             return ok2 and v or -1
           end"#,
    )]);
    assert_eq!(s.request_hash(1, 512), HookOutcome::Value(5));
}

#[test]
fn unbounded_allocation_fails_with_memory_exceeded_and_recovers() {
    let s = try_set(
        &[(
            "m.lua",
            r#"function request_hash(i)
                 if i == 0 then
                   local t = {} while true do t[#t+1] = string.rep('x', 1e6) end
                 end
                 return 1
               end"#,
        )],
        PolicyLimits {
            memory_limit: 8 * 1024 * 1024,
            instruction_budget: 10_000_000,
            hook_timeout: Duration::from_secs(10),
        },
    )
    .expect("loads");
    assert_eq!(
        failed(s.request_hash(0, 8)),
        HookError::MemoryExceeded {
            limit: 8 * 1024 * 1024
        }
    );
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(1));
    assert_eq!(
        s.stats().state_builds(),
        2,
        "rebuilt after the memory failure"
    );
}

fn sandbox_probe(body: &str) -> HookOutcome<u32> {
    let src = format!("function request_hash(i, slots)\n{body}\nreturn 1\nend");
    set(&[("s.lua", src.as_str())]).request_hash(1, 8)
}

#[test]
fn sandbox_denies_os_io_require_and_friends() {
    for body in [
        "os.execute('touch /tmp/ringgate-pwned')",
        "io.open('/etc/passwd')",
        "require('os')",
        "package.loadlib('x', 'y')",
        "dofile('/etc/passwd')",
        "loadfile('/etc/passwd')",
        "debug.getinfo(1)",
        "coroutine.wrap(function() end)()",
        "string.dump(function() end)",
        "collectgarbage('stop')",
        "warn('@on')",
    ] {
        match sandbox_probe(body) {
            HookOutcome::Failed(HookError::Runtime(m)) => {
                assert!(!m.is_empty(), "{body}")
            }
            other => panic!("`{body}` should fail, got {other:?}"),
        }
    }
    assert!(!Path::new("/tmp/ringgate-pwned").exists());
}

#[test]
fn load_accepts_text_and_refuses_bytecode() {
    assert_eq!(
        sandbox_probe("assert(load('return 1 + 1')() == 2)"),
        HookOutcome::Value(1)
    );
    assert_eq!(
        sandbox_probe("local env = {} assert(load('x = 5', 'c', 'b', env)) () assert(env.x == 5)"),
        HookOutcome::Value(1)
    );
    // string.dump is gone, so `load(string.dump(f))` fails...
    assert!(matches!(
        sandbox_probe("load(string.dump(function() end))"),
        HookOutcome::Failed(HookError::Runtime(_))
    ));
    // ...and a handmade binary chunk is refused even when mode 'b' is asked for.
    match sandbox_probe("local f, err = load('\\27LuaT\\0', 'bin', 'b') assert(f, err)") {
        HookOutcome::Failed(HookError::Runtime(m)) => assert!(m.contains("binary chunk"), "{m}"),
        other => panic!("bytecode must not load, got {other:?}"),
    }
}

#[test]
fn harmless_builtins_remain() {
    assert_eq!(
        sandbox_probe(
            r#"assert(math.floor(2.5) == 2 and string.format('%d', 3) == '3')
               assert(table.concat({'a', 'b'}) == 'ab' and utf8.char(65) == 'A')
               assert(type(collectgarbage('count')) == 'number')
               print('hello from a policy', 1, nil)
               assert(('abc'):upper() == 'ABC')"#
        ),
        HookOutcome::Value(1)
    );
}
