//! Policy code that used to run where the count hook cannot reach it (issue 23, findings 2
//! and 3): a message handler of `xpcall` (called inside the hook once a call is stopped), a
//! `__close` metamethod (run while a stopped call unwinds), C library functions that loop over
//! a large input inside one call; and the smaller leaks (the random generator's state, request
//! header values in error texts). Every call here runs on a thread of its own with a bounded
//! wait, so a regression fails instead of hanging the suite.

use std::sync::mpsc;

use super::*;

/// No budget to speak of: only the 5 ms deadline can stop a call.
fn deadline_only() -> PolicyLimits {
    PolicyLimits {
        instruction_budget: u32::MAX,
        ..PolicyLimits::default()
    }
}

/// Loads `src` and calls `request_hash` on another thread; the outcome, or a panic if it did
/// not come back within 10 s.
fn hash_within(src: &str, limits: PolicyLimits) -> HookOutcome<u32> {
    let src = src.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let s = try_set(&[("t.lua", src.as_str())], limits).expect("loads");
        let _ = tx.send(s.request_hash(1, 8));
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the hook call came back (it used to run unmetered for good)")
}

fn stopped(o: HookOutcome<u32>) {
    match o {
        HookOutcome::Failed(HookError::Timeout { .. } | HookError::BudgetExceeded { .. }) => {}
        other => panic!("expected the call to be stopped, got {other:?}"),
    }
}

#[test]
fn a_looping_message_handler_does_not_outlive_the_deadline() {
    stopped(hash_within(
        "function request_hash(i)
           xpcall(function() while true do end end, function(e) while true do end end)
           return 1
         end",
        deadline_only(),
    ));
}

#[test]
fn a_slow_message_handler_does_not_run_once_the_call_is_stopped() {
    stopped(hash_within(
        "function request_hash(i)
           xpcall(function() while true do end end,
                  function(e) local x = 0 for k = 1, 3e8 do x = x + k end return e end)
           return 1
         end",
        deadline_only(),
    ));
}

#[test]
fn a_message_handler_still_runs_for_an_ordinary_error_and_is_metered() {
    let s = set(&[(
        "t.lua",
        "function request_hash(i)
           local ok, e = xpcall(function() error('boom', 0) end, function(e) return 'handled ' .. e end)
           assert(not ok and e == 'handled boom')
           return 3
         end",
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(3));
    // The handler itself loops: stopped like any code.
    stopped(hash_within(
        "function request_hash(i)
           xpcall(function() error('boom') end, function(e) while true do end end)
           return 1
         end",
        deadline_only(),
    ));
}

#[test]
fn close_metamethods_are_refused_and_cannot_be_added_later() {
    let e = failed(hash_within(
        "function request_hash(i)
           local t = setmetatable({}, {__close = function() end})
           return 1
         end",
        PolicyLimits::default(),
    ));
    assert!(
        matches!(&e, HookError::Runtime(m) if m.contains("__close")),
        "{e:?}"
    );
    // Added to the metatable after setmetatable: the object has a copy without it, so the
    // generic for's closing value is refused instead of closed.
    let e = failed(hash_within(
        "function request_hash(i)
           local mt = {}
           local closer = setmetatable({}, mt)
           mt.__close = function() while true do end end
           for k in function() while true do end end, nil, nil, closer do end
           return 1
         end",
        deadline_only(),
    ));
    assert!(
        matches!(&e, HookError::Runtime(m) if m.contains("non-closable")),
        "{e:?}"
    );
    // getmetatable still shows the table the policy set.
    let s = set(&[(
        "t.lua",
        "function request_hash(i)
           local mt = {__index = function() return 7 end}
           local o = setmetatable({}, mt)
           assert(getmetatable(o) == mt)
           return o.anything
         end",
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(7));
}

#[test]
fn to_be_closed_variables_are_refused_in_files_and_in_loaded_chunks() {
    let e = try_set(
        &[(
            "c.lua",
            "function request_hash(i)\n  local c <close> = nil\n  return 1\nend",
        )],
        PolicyLimits::default(),
    )
    .expect_err("refused at load");
    assert!(
        matches!(&e, PolicyError::ToBeClosed { file, line: 2 } if file == "c.lua"),
        "{e:?}"
    );
    assert!(e.to_string().contains("<close>"), "{e}");
    let s = set(&[(
        "t.lua",
        "function request_hash(i)
           local f, err = load('local c <close> = nil while true do end')
           assert(f == nil and err:find('to%-be%-closed'), err)
           return 2
         end",
    )]);
    assert_eq!(s.request_hash(1, 8), HookOutcome::Value(2));
}

#[test]
fn sort_with_a_c_comparison_is_stopped() {
    let src = "local T = {} for k = 1, 100000 do T[k] = (k * 7919) % 100000 end
               function request_hash(i)
                 local t = {} for k = 1, #T do t[k] = T[k] end
                 table.sort(t, math.ult)
                 return 1
               end";
    stopped(hash_within(src, deadline_only()));
    stopped(hash_within(
        src,
        PolicyLimits {
            instruction_budget: 2_000_000,
            hook_timeout: Duration::from_secs(10),
            ..PolicyLimits::default()
        },
    ));
    // A small sort with a C comparison still sorts.
    let s = set(&[(
        "t.lua",
        "function request_hash(i)
           local t = {5, 3, 9, 1}
           table.sort(t, math.ult)
           return t[1] * 1000 + t[4]
         end",
    )]);
    assert_eq!(s.request_hash(1, 100_000), HookOutcome::Value(1009));
}

#[test]
fn c_functions_on_large_inputs_are_refused_or_charged() {
    // One call over the cap is refused before it runs.
    let e = failed(hash_within(
        "local S = string.rep('a', 12 * 1024 * 1024)
         function request_hash(i) return utf8.len(S) end",
        deadline_only(),
    ));
    assert!(
        matches!(&e, HookError::Runtime(m) if m.contains("utf8.len") && m.contains("steps")),
        "{e:?}"
    );
    // Calls under the cap are charged: a loop of them stops at the budget or the deadline.
    let src = "local S = string.rep('a', 200 * 1024)
               function request_hash(i) while true do utf8.len(S) end end";
    stopped(hash_within(src, deadline_only()));
    let e = failed(hash_within(src, small_limits()));
    assert!(matches!(e, HookError::BudgetExceeded { .. }), "{e:?}");
    for body in [
        "S:upper()",
        "S:byte(1, -1)",
        "string.format('%q', S)",
        "table.unpack(T)",
        "tonumber(S)",
    ] {
        let src = format!(
            "local S = string.rep('7', 300 * 1024) local T = {{}} for k = 1, 20000 do T[k] = k end
             function request_hash(i) local _ = {body} return 1 end"
        );
        let e = failed(hash_within(&src, deadline_only()));
        assert!(
            matches!(&e, HookError::Runtime(m) if m.contains("steps of work")),
            "{body}: {e:?}"
        );
    }
    // Ordinary sizes are untouched.
    let s = set(&[(
        "t.lua",
        "function request_hash(i)
           local s = ('héllo'):upper() .. string.format('%5d', 42)
           return utf8.len(s) + #table.pack(string.byte('abc', 1, -1)) + tonumber('10')
         end",
    )]);
    assert_eq!(s.request_hash(1, 1000), HookOutcome::Value(10 + 3 + 10));
}

#[test]
fn randomseed_is_refused_and_random_still_works() {
    let e = failed(hash_within(
        "function request_hash(i) math.randomseed(42) return 1 end",
        PolicyLimits::default(),
    ));
    assert!(
        matches!(&e, HookError::Runtime(m) if m.contains("randomseed")),
        "{e:?}"
    );
    let s = set(&[(
        "t.lua",
        "function request_hash(i, slots) return math.random(0, slots - 1) end",
    )]);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..50 {
        match s.request_hash(1, 1 << 30) {
            HookOutcome::Value(v) => {
                seen.insert(v);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        seen.len() > 40,
        "reseeded generator repeats itself: {seen:?}"
    );
}

#[test]
fn request_header_values_are_masked_in_error_texts() {
    let s = set(&[(
        "t.lua",
        "function request_key(req)
           error('bad token ' .. req.headers.authorization .. ' from ' .. req.headers['x-user']:sub(1, 6))
         end",
    )]);
    let headers: &[(&str, &[u8])] = &[
        ("authorization", b"Bearer s3cr3t-t0ken"),
        ("x-user", b"alice-the-admin"),
    ];
    let e = failed(s.request_key(&req("", headers)));
    let text = e.to_string();
    assert!(
        !text.contains("s3cr3t") && !text.contains("alice"),
        "{text}"
    );
    assert!(text.contains("bad token [redacted]"), "{text}");
    let last = s.stats().last_error().expect("recorded").message;
    assert!(
        !last.contains("s3cr3t") && !last.contains("alice"),
        "{last}"
    );
}

#[test]
fn the_redaction_masks_runs_of_shared_pieces_only() {
    use crate::policy::redact::redact;
    let values: &[&[u8]] = &[b"Bearer abcdef123", b"ab"];
    assert_eq!(
        redact("t.lua:1: no key in abcdef; see docs".into(), values),
        // The space before it is shared too (" abc" is a piece of the value).
        "t.lua:1: no key in[redacted]; see docs"
    );
    assert_eq!(redact("nothing shared".into(), values), "nothing shared");
    assert_eq!(redact("ab".into(), values), "ab");
}

#[test]
fn a_serving_thread_takes_ready_states_and_never_builds_one() {
    // Each build runs a top level that takes a while; the hook's deadline is short.
    let slow_top = "local x = 0 for k = 1, 3e6 do x = x + k end
                    function request_hash(i) return 5 end";
    let limits = PolicyLimits {
        instruction_budget: u32::MAX,
        hook_timeout: Duration::from_millis(1),
        ..PolicyLimits::default()
    };
    let set = Arc::new(try_set(&[("t.lua", slow_top)], limits).expect("loads"));
    let call_on_serving_thread = |set: &Arc<PolicySet>| {
        let set = set.clone();
        std::thread::spawn(move || {
            enter_serving_thread();
            set.request_hash(1, 8)
        })
        .join()
        .expect("thread")
    };
    // The state that validated the set is ready.
    assert_eq!(call_on_serving_thread(&set), HookOutcome::Value(5));
    // The next serving thread finds none ready in its 1 ms wait (the builder is still
    // running the slow top level): it falls back instead of building.
    assert_eq!(failed(call_on_serving_thread(&set)), HookError::NotReady);
    // The builder thread delivers it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call_on_serving_thread(&set) {
            HookOutcome::Value(5) => break,
            HookOutcome::Failed(HookError::NotReady) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_error_object_whose_tostring_loops_is_stopped() {
    stopped_or_runtime(hash_within(
        "function request_hash(i)
           error(setmetatable({}, {__tostring = function() while true do end end}))
         end",
        deadline_only(),
    ));
    stopped_or_runtime(hash_within(
        "function request_hash(i)
           local ok, e = pcall(error, setmetatable({}, {__tostring = function() while true do end end}))
           error(e)
         end",
        deadline_only(),
    ));
}

fn stopped_or_runtime(o: HookOutcome<u32>) {
    match o {
        HookOutcome::Failed(
            HookError::Timeout { .. } | HookError::BudgetExceeded { .. } | HookError::Runtime(_),
        ) => {}
        other => panic!("expected a failure, got {other:?}"),
    }
}
