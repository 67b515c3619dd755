//! Time and size limits of a hook call: the wall-clock deadline (which `pcall` cannot catch),
//! the Rust string functions that used to run unbounded inside one C call, the table
//! functions and `load`; every failure counted and logged like any other.

use super::*;

/// No budget to speak of, and the default 5 ms deadline: only the deadline can stop a call.
fn deadline_only() -> PolicyLimits {
    PolicyLimits {
        instruction_budget: u32::MAX,
        ..PolicyLimits::default()
    }
}

fn hash_hook(body: &str, limits: PolicyLimits) -> PolicySet {
    let src = format!("function request_hash(i, slots)\n{body}\nreturn 1\nend");
    try_set(&[("t.lua", src.as_str())], limits).expect("loads")
}

/// Calls `request_hash` and checks that it failed with `expected`, within a bounded time.
fn fails_within(set: &PolicySet, expected: fn(&HookError) -> bool) -> HookError {
    let started = Instant::now();
    let e = failed(set.request_hash(1, 8));
    assert!(expected(&e), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    e
}

fn is_timeout(e: &HookError) -> bool {
    matches!(e, HookError::Timeout { .. })
}

#[test]
fn an_endless_loop_stops_at_the_deadline_and_is_counted() {
    let s = hash_hook("while true do end", deadline_only());
    let e = fails_within(&s, is_timeout);
    assert_eq!(
        e,
        HookError::Timeout {
            after: Duration::from_millis(5)
        }
    );
    assert_eq!(s.stats().errors(Hook::RequestHash), 1);
    let last = s.stats().last_error().expect("recorded");
    assert!(last.message.contains("deadline of 5ms"), "{}", last.message);
    assert!(
        last.message.contains("policy.hook_timeout"),
        "{}",
        last.message
    );
    // The state survives with a fresh deadline.
    assert_eq!(s.stats().state_builds(), 1);
    fails_within(&s, is_timeout);
    assert_eq!(s.stats().state_builds(), 1);
}

#[test]
fn pcall_and_xpcall_cannot_catch_the_deadline() {
    let s = hash_hook(
        r#"while true do
             pcall(function() while true do end end)
             xpcall(function() while true do end end, function(e) return e end)
             pcall(string.rep, 'x', 10)
           end"#,
        deadline_only(),
    );
    fails_within(&s, is_timeout);
}

#[test]
fn a_call_that_swallows_the_deadline_still_fails() {
    // `load` catches errors raised in its reader; the call goes on and returns a value.
    let s = hash_hook(
        "local f, err = load(function() while true do end end)\nassert(f == nil and err)",
        deadline_only(),
    );
    fails_within(&s, is_timeout);
}

#[test]
fn rep_of_a_billion_empty_strings_is_instant_and_a_huge_rep_is_refused() {
    let s = hash_hook(
        "local e = string.rep('', 1e9) assert(e == '')",
        deadline_only(),
    );
    let started = Instant::now();
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(1));
    assert!(started.elapsed() < Duration::from_secs(1));
    let s = hash_hook("local e = string.rep('x', 1e9)", deadline_only());
    match fails_within(&s, |e| matches!(e, HookError::Runtime(_))) {
        HookError::Runtime(m) => {
            assert!(m.contains("t.lua:2:") && m.contains("memory limit"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // Repeated empty reps are counted, so a loop of them still ends.
    let s = hash_hook("while true do local e = ('x'):rep(0) end", deadline_only());
    fails_within(&s, is_timeout);
}

#[test]
fn backtracking_patterns_stop_at_the_deadline_or_the_budget() {
    let body =
        "local s = string.rep('a', 30)\nlocal p = string.rep('a?', 30) .. s\nlocal m = s:match(p)";
    let s = hash_hook(body, deadline_only());
    fails_within(&s, is_timeout);
    let s = hash_hook(body, small_limits());
    fails_within(&s, |e| matches!(e, HookError::BudgetExceeded { .. }));
    for call in [
        "s:find(p)",
        "s:gsub(p, 'x')",
        "for m in s:gmatch(p) do end",
        "string.gsub(s, '.', function() return s:match(p) end)",
    ] {
        let s = hash_hook(
            &format!("local s = string.rep('a', 30)\nlocal p = string.rep('a?', 30) .. s\n{call}"),
            deadline_only(),
        );
        fails_within(&s, is_timeout);
    }
}

#[test]
fn gsub_with_a_looping_function_stops() {
    let s = hash_hook(
        "string.gsub(string.rep('x', 100), 'x', function() while true do end end)",
        deadline_only(),
    );
    fails_within(&s, is_timeout);
}

#[test]
fn table_functions_past_the_c_loop_size_are_counted_and_still_right() {
    // table.move over a huge empty range used to loop 1e15 times inside one C call.
    let s = hash_hook("table.move({}, 1, 1e15, 1, {})", deadline_only());
    fails_within(&s, is_timeout);
    let s = hash_hook("table.concat({}, '', 1, 1e15)", deadline_only());
    fails_within(
        &s,
        |e| matches!(e, HookError::Runtime(m) if m.contains("invalid value")),
    );
    let s = hash_hook(
        r#"local t = {}
           for k = 1, 5000 do t[k] = k end
           table.insert(t, 1, 0)
           assert(#t == 5001 and t[1] == 0 and t[2] == 1 and t[5001] == 5000)
           assert(table.remove(t, 1) == 0 and #t == 5000 and t[1] == 1 and t[5000] == 5000)
           table.insert(t, 5001, 'end') assert(t[5001] == 'end') table.remove(t)
           local u = table.move(t, 1, 5000, 3)
           assert(u == t and t[3] == 1 and t[5002] == 5000 and t[1] == 1)
           local v = table.move(t, 3, 5002, 1, {})
           assert(#v == 5000 and v[1] == 1 and v[5000] == 5000)
           local w = {} for k = 1, 5000 do w[k] = tostring(k % 10) end
           local joined = table.concat(w, ',')
           assert(#joined == 5000 + 4999 and joined:sub(1, 4) == '1,2,' and joined:sub(-3) == '9,0')
           assert(table.concat(w, '', 4999) == '90' and table.concat(w, '-', 2, 4) == '2-3-4')
           local r = {} for k = 1, 3000 do r[k] = (k * 7919) % 3001 end
           table.sort(r)
           for k = 2, 3000 do assert(r[k - 1] <= r[k]) end
           table.sort(r, function(a, b) return a > b end)
           assert(r[1] == 3000)
           assert(not pcall(table.sort, {1, 'x', 2, 3}))"#,
        PolicyLimits {
            hook_timeout: Duration::from_secs(1),
            instruction_budget: u32::MAX,
            ..PolicyLimits::default()
        },
    );
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(1));
    // A large sort with the default comparison runs its comparisons in Lua: it is counted.
    let s = hash_hook(
        "local t = {} for k = 1, 200000 do t[k] = -k end table.sort(t)",
        small_limits(),
    );
    fails_within(&s, |e| matches!(e, HookError::BudgetExceeded { .. }));
}

#[test]
fn load_and_pack_refuse_inputs_that_would_run_long_in_one_call() {
    assert_eq!(
        hash_hook(
            r#"local f, err = load(string.rep(' ', 70000))
               assert(f == nil and err:find('at most 65536 bytes'))
               local parts = 0
               local g, err2 = load(function() parts = parts + 1 if parts < 100 then return string.rep(' ', 1000) end end)
               assert(g == nil and err2:find('at most 65536 bytes'))
               assert(load(string.rep(' ', 1000) .. 'return 7')() == 7)"#,
            PolicyLimits::default(),
        )
        .request_hash(1, 8),
        HookOutcome::Value(1)
    );
    let s = hash_hook("string.pack('c99999999', '')", PolicyLimits::default());
    match failed(s.request_hash(1, 8)) {
        HookError::Runtime(m) => assert!(m.contains("more than 1000000 bytes"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        hash_hook(
            "assert(#string.pack('i4c10', 7, 'abc') == 14)",
            PolicyLimits::default()
        )
        .request_hash(1, 8),
        HookOutcome::Value(1)
    );
}

#[test]
fn off_path_hooks_get_ten_times_the_deadline() {
    let limits = PolicyLimits::default();
    assert_eq!(limits.allowance(Hook::RequestKey), Duration::from_millis(5));
    assert_eq!(
        limits.allowance(Hook::RequestHash),
        Duration::from_millis(5)
    );
    assert_eq!(limits.allowance(Hook::VnodeHash), Duration::from_millis(50));
    assert_eq!(limits.allowance(Hook::Health), Duration::from_millis(50));
    let s = try_set(
        &[(
            "h.lua",
            "function health() while true do end end\nfunction vnode_hash() while true do end end",
        )],
        deadline_only(),
    )
    .expect("loads");
    assert_eq!(
        failed(s.health("s1", &probe(Some(200), 1.0))),
        HookError::Timeout {
            after: Duration::from_millis(50)
        }
    );
    assert!(matches!(
        failed(s.vnode_hash(1, 0, 8)),
        HookError::Timeout { .. }
    ));
    assert_eq!(s.stats().errors(Hook::Health), 1);
    assert_eq!(s.stats().errors(Hook::VnodeHash), 1);
}

#[test]
fn a_top_level_that_runs_too_long_is_rejected() {
    let started = Instant::now();
    let err = try_set(
        &[(
            "slow.lua",
            "local s = string.rep('a', 40)\nlocal p = string.rep('a?', 40) .. s\ns:match(p)",
        )],
        deadline_only(),
    )
    .expect_err("rejected");
    assert!(
        matches!(&err, PolicyError::Timeout { file, .. } if file == "slow.lua"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn error_texts_are_bounded() {
    let s = set(&[(
        "e.lua",
        "function request_key(req) error(req.headers.authorization .. string.rep('!', 5000)) end",
    )]);
    let secret = "Bearer ".to_string() + &"s3cr3t".repeat(100);
    let headers: &[(&str, &[u8])] = &[("authorization", secret.as_bytes())];
    match failed(s.request_key(&req("", headers))) {
        HookError::Runtime(m) => assert!(m.len() <= MAX_ERROR_TEXT, "{}", m.len()),
        other => panic!("{other:?}"),
    }
    let last = s.stats().last_error().expect("recorded");
    assert!(
        last.message.len() <= MAX_ERROR_TEXT,
        "{}",
        last.message.len()
    );
    // The header value is masked, not cut (see `redact`).
    assert!(last.message.contains("[redacted]"), "{}", last.message);
    assert!(!last.message.contains("s3cr3t"), "{}", last.message);
    let long = set(&[(
        "e.lua",
        "function request_hash(i) error(string.rep('!', 5000)) end",
    )]);
    match failed(long.request_hash(1, 8)) {
        HookError::Runtime(m) => assert!(m.len() <= MAX_ERROR_TEXT && m.ends_with('…'), "{m}"),
        other => panic!("{other:?}"),
    }
    // Cut on a character boundary.
    let text = "é".repeat(300);
    let cut = bounded(text.clone());
    assert!(cut.len() <= MAX_ERROR_TEXT && cut.ends_with('…'));
    assert!(text.starts_with(cut.trim_end_matches('…')));
    assert_eq!(bounded("short".to_string()), "short");
    let err = try_set(
        &[("big.lua", &format!("error('{}')", "x".repeat(1000)))],
        PolicyLimits::default(),
    )
    .expect_err("rejected");
    match err {
        PolicyError::Runtime { message, .. } => assert!(message.len() <= MAX_ERROR_TEXT),
        other => panic!("{other:?}"),
    }
}
