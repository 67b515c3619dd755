//! Unit tests of the policy engine: loading, each hook, failures, sandbox, limits, threads.

use super::*;
use std::fs;

fn set(files: &[(&str, &str)]) -> PolicySet {
    try_set(files, PolicyLimits::default()).expect("policy set loads")
}

fn try_set(files: &[(&str, &str)], limits: PolicyLimits) -> Result<PolicySet, PolicyError> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, src) in files {
        fs::write(dir.path().join(name), src).expect("write policy");
    }
    PolicySet::load_dir(dir.path(), limits, 1)
}

fn small_limits() -> PolicyLimits {
    PolicyLimits {
        memory_limit: 4 * 1024 * 1024,
        instruction_budget: 100_000,
    }
}

const NO_HEADERS: &[(&str, &[u8])] = &[];

fn req<'a>(query: &'a str, headers: &'a [(&'a str, &'a [u8])]) -> KeyRequest<'a> {
    KeyRequest {
        method: "GET",
        path: "/home",
        query,
        headers,
        client_ip: "10.0.0.7",
    }
}

fn probe(status: Option<u16>, latency_ms: f64) -> ProbeView<'static> {
    ProbeView {
        status,
        latency_ms,
        error: None,
    }
}

fn failed<T: fmt::Debug>(o: HookOutcome<T>) -> HookError {
    match o {
        HookOutcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

// ---------------------------------------------------------------- loading

#[test]
fn empty_set_answers_absent() {
    let s = PolicySet::empty();
    assert_eq!(s.generation(), 0);
    assert!(s.files().is_empty() && s.hooks().is_empty());
    assert_eq!(s.request_hash(5, 512), HookOutcome::Absent);
    assert_eq!(s.vnode_hash(5, 1, 512), HookOutcome::Absent);
    assert_eq!(s.request_key(&req("", NO_HEADERS)), HookOutcome::Absent);
    assert_eq!(s.health("s1", &probe(Some(200), 1.0)), HookOutcome::Absent);
    assert_eq!(s.stats().total_calls(), 0);
}

#[test]
fn missing_dir_is_an_empty_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = PolicySet::load_dir(&dir.path().join("nope"), PolicyLimits::default(), 7)
        .expect("missing dir loads");
    assert_eq!(s.generation(), 7);
    assert!(s.files().is_empty());
    assert_eq!(s.request_hash(1, 8), HookOutcome::Absent);
}

#[test]
fn files_load_in_name_order_and_later_names_override() {
    let s = set(&[
        ("b.lua", "function request_hash(i, slots) return 2 end"),
        (
            "a.lua",
            "function request_hash(i, slots) return 1 end  shared = 'a'",
        ),
        (
            "c.lua",
            "assert(shared == 'a')  function health() return true end",
        ),
        ("notes.txt", "this is not lua"),
        ("d.lua.bak", "error('not loaded')"),
        (".#e.lua", "error('editor lock file, not loaded')"),
    ]);
    assert_eq!(s.files(), vec!["a.lua", "b.lua", "c.lua"]);
    assert_eq!(s.hooks(), vec!["request_hash", "health"]);
    assert!(s.has_hook(Hook::RequestHash) && !s.has_hook(Hook::VnodeHash));
    assert_eq!(s.request_hash(9, 512), HookOutcome::Value(2));
}

#[test]
fn subdirectories_are_not_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir(dir.path().join("examples")).expect("mkdir");
    fs::create_dir(dir.path().join("dir.lua")).expect("mkdir");
    fs::write(
        dir.path().join("examples/x.lua"),
        "function request_hash() return 3 end",
    )
    .expect("write");
    let s = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 1).expect("loads");
    assert!(s.files().is_empty());
    assert_eq!(s.request_hash(1, 8), HookOutcome::Absent);
}

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
        },
    )
    .expect_err("rejected");
    assert!(matches!(err, PolicyError::MemoryExceeded { .. }), "{err:?}");
}

#[test]
fn bytecode_file_is_rejected() {
    // A Lua 5.4 binary chunk starts with "\x1bLua"; the NUL-free prefix is valid UTF-8.
    let err =
        try_set(&[("bin.lua", "\x1bLuaT\u{19}")], PolicyLimits::default()).expect_err("rejected");
    assert!(err.to_string().contains("bin.lua"), "{err}");
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(
        dir.path().join("bin.lua"),
        b"\x1bLuaT\x00\x19\x93\r\n\x1a\n\xff",
    )
    .expect("write");
    let err = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 1).expect_err("rejected");
    assert!(matches!(err, PolicyError::NotText { .. }), "{err:?}");
}

// ---------------------------------------------------------------- hooks

#[test]
fn request_hash_happy_path_and_modulo() {
    let s = set(&[("h.lua", "function request_hash(i, slots) return i * 3 end")]);
    assert_eq!(s.request_hash(5, 512), HookOutcome::Value(15));
    assert_eq!(s.request_hash(200, 512), HookOutcome::Value(600 % 512));
    // u64 above i64::MAX arrives wrapped (negative); the result is taken rem_euclid.
    let neg = set(&[("h.lua", "function request_hash(i, slots) return i end")]);
    assert_eq!(neg.request_hash(u64::MAX, 512), HookOutcome::Value(511));
    let float = set(&[("h.lua", "function request_hash(i, slots) return 7.0 end")]);
    assert_eq!(float.request_hash(1, 512), HookOutcome::Value(7));
    assert_eq!(s.stats().calls(Hook::RequestHash), 2);
    assert_eq!(s.stats().errors(Hook::RequestHash), 0);
}

#[test]
fn vnode_hash_happy_path() {
    let s = set(&[(
        "v.lua",
        "function vnode_hash(i, j, slots) return i * 100 + j - slots end",
    )]);
    assert_eq!(
        s.vnode_hash(2, 3, 512),
        HookOutcome::Value((203i64 - 512).rem_euclid(512) as u32)
    );
}

#[test]
fn request_key_sees_the_request() {
    let s = set(&[(
        "k.lua",
        r#"function request_key(req)
             assert(req.method == 'GET' and req.path == '/home' and req.client_ip == '10.0.0.7')
             if req.query == 'int' then return 42 end
             return req.headers['x-user'] .. '|' .. req.headers.cookie .. '|' .. req.headers.accept
           end"#,
    )]);
    let headers: &[(&str, &[u8])] = &[
        ("X-User", b"alice"),
        ("cookie", b"a=1"),
        ("cookie", b"b=2"),
        ("accept", b"text/html"),
        ("accept", b"*/*"),
    ];
    assert_eq!(
        s.request_key(&req("id=5", headers)),
        HookOutcome::Value(LuaKey::Str("alice|a=1; b=2|text/html, */*".to_string()))
    );
    assert_eq!(
        s.request_key(&req("int", headers)),
        HookOutcome::Value(LuaKey::Int(42))
    );
}

#[test]
fn nil_defers_to_the_builtin_without_counting_an_error() {
    let s = set(&[(
        "k.lua",
        "function request_key(req) return nil end function health() end",
    )]);
    assert_eq!(s.request_key(&req("", NO_HEADERS)), HookOutcome::Absent);
    assert_eq!(s.health("s", &probe(None, 1.0)), HookOutcome::Absent);
    assert_eq!(s.stats().total_errors(), 0);
    assert_eq!(s.stats().total_calls(), 2);
}

#[test]
fn health_happy_path() {
    let s = set(&[(
        "h.lua",
        r#"function health(server, probe)
             if probe.error then return server == 'keep' end
             return probe.status == 200 and probe.latency_ms < 100
           end"#,
    )]);
    assert_eq!(
        s.health("s1", &probe(Some(200), 5.0)),
        HookOutcome::Value(true)
    );
    assert_eq!(
        s.health("s1", &probe(Some(503), 5.0)),
        HookOutcome::Value(false)
    );
    assert_eq!(
        s.health("s1", &probe(Some(200), 500.0)),
        HookOutcome::Value(false)
    );
    let refused = ProbeView {
        status: None,
        latency_ms: 1.0,
        error: Some("connection refused"),
    };
    assert_eq!(s.health("keep", &refused), HookOutcome::Value(true));
    assert_eq!(s.health("other", &refused), HookOutcome::Value(false));
}

// ---------------------------------------------------------------- failures

#[test]
fn wrong_return_types_fail_and_are_counted() {
    let s = set(&[(
        "w.lua",
        r#"function request_hash() return 'seven' end
           function vnode_hash() return 1.5 end
           function request_key() return {} end
           function health() return 1 end"#,
    )]);
    let e = failed(s.request_hash(1, 8));
    assert_eq!(
        e,
        HookError::WrongType {
            hook: "request_hash",
            expected: "an integer slot",
            got: "string".to_string()
        }
    );
    assert!(
        matches!(failed(s.vnode_hash(1, 1, 8)), HookError::WrongType { got, .. } if got == "number")
    );
    assert!(
        matches!(failed(s.request_key(&req("", NO_HEADERS))), HookError::WrongType { got, .. } if got == "table")
    );
    assert!(
        matches!(failed(s.health("s", &probe(Some(200), 1.0))), HookError::WrongType { got, .. } if got == "integer")
    );
    for h in Hook::ALL {
        assert_eq!(s.stats().errors(h), 1, "{h}");
    }
    let last = s.stats().last_error().expect("last error recorded");
    assert_eq!(last.hook, Hook::Health);
    assert!(
        last.message.contains("expected a boolean"),
        "{}",
        last.message
    );
}

#[test]
fn error_in_a_hook_fails_with_its_message() {
    let s = set(&[(
        "e.lua",
        "function request_hash(i) error('no slot for ' .. i) end",
    )]);
    match failed(s.request_hash(9, 8)) {
        HookError::Runtime(m) => {
            assert!(m.contains("e.lua:1:") && m.contains("no slot for 9"), "{m}");
            assert!(!m.contains("traceback"), "{m}");
        }
        other => panic!("expected Runtime, got {other:?}"),
    }
    assert_eq!(s.stats().errors(Hook::RequestHash), 1);
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
    // Same state (its globals survived), fresh budget.
    assert_eq!(s.request_hash(1, 512), HookOutcome::Value(3));
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

#[test]
fn failures_are_logged_at_most_once_per_period() {
    let s = set(&[("e.lua", "function request_hash() error('x') end")]);
    for _ in 0..5 {
        failed(s.request_hash(1, 8));
    }
    let gates = lock(&s.stats().log_gate);
    assert_eq!(gates[Hook::RequestHash.index()].suppressed, 4);
    assert!(gates[Hook::RequestHash.index()].last.is_some());
}

// ---------------------------------------------------------------- sandbox

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

// ---------------------------------------------------------------- threads and generations

#[test]
fn generation_switch_rebuilds_the_thread_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("h.lua");
    fs::write(&path, "function request_hash() return 1 end").expect("write");
    let g1 = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 1).expect("g1");
    assert_eq!(g1.request_hash(0, 8), HookOutcome::Value(1));
    fs::write(&path, "function request_hash() return 2 end").expect("write");
    let g2 = PolicySet::load_dir(dir.path(), PolicyLimits::default(), 2).expect("g2");
    assert_eq!(g2.generation(), 2);
    assert_eq!(g2.request_hash(0, 8), HookOutcome::Value(2));
    // The previous set keeps its own state (in-flight requests) without rebuilding.
    assert_eq!(g1.request_hash(0, 8), HookOutcome::Value(1));
    assert_eq!(g2.request_hash(0, 8), HookOutcome::Value(2));
    assert_eq!(g1.stats().state_builds(), 1);
    assert_eq!(g2.stats().state_builds(), 1);
    // A third set evicts the least recently used one.
    let g3 = set(&[("h.lua", "function request_hash() return 3 end")]);
    assert_eq!(g3.request_hash(0, 8), HookOutcome::Value(3));
    assert_eq!(g1.request_hash(0, 8), HookOutcome::Value(1));
    assert_eq!(g1.stats().state_builds(), 2);
}

#[test]
fn concurrent_calls_from_several_threads() {
    let s = Arc::new(set(&[(
        "c.lua",
        r#"local n = 0
           function request_hash(i, slots) n = n + 1 return i + 1 end
           function request_key(req) return req.client_ip end"#,
    )]));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    assert_eq!(
                        s.request_hash(i * 4 + t, 1 << 20),
                        HookOutcome::Value((i * 4 + t + 1) as u32)
                    );
                    let ip = format!("10.0.0.{t}");
                    let r = KeyRequest {
                        client_ip: &ip,
                        ..req("", NO_HEADERS)
                    };
                    assert_eq!(
                        s.request_key(&r),
                        HookOutcome::Value(LuaKey::Str(ip.clone()))
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread ok");
    }
    assert_eq!(s.stats().calls(Hook::RequestHash), 2000);
    assert_eq!(s.stats().calls(Hook::RequestKey), 2000);
    assert_eq!(s.stats().state_builds(), 4, "one state per thread");
}

#[test]
fn policy_set_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<PolicySet>();
    check::<PolicyStats>();
}

// ---------------------------------------------------------------- policies/examples

fn example(name: &str) -> PolicySet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies/examples")
        .join(name);
    let src = fs::read_to_string(&path).expect("example exists");
    PolicySet::from_sources(vec![(name.to_string(), src)], PolicyLimits::default(), 1)
        .expect("example loads")
}

/// The built-in H(i) = i² + 2i + 17 mod slots, without overflow.
fn default_h(i: u64, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    ((r * r + 2 * r + 17) % s) as u32
}

/// The built-in Φ(i, j) = i² + j² + 2j + 25 mod slots, without overflow.
fn default_phi(i: u64, j: u32, slots: u32) -> u32 {
    let s = u128::from(slots);
    let r = u128::from(i) % s;
    let j = u128::from(j);
    ((r * r + j * j + 2 * j + 25) % s) as u32
}

/// A minimal ring for measuring the examples (the gateway's ring module is the real one):
/// vnodes placed with forward probing, each slot owned by the next vnode clockwise.
fn owners(servers: &[u64], vnodes: u32, slots: u32, phi: impl Fn(u64, u32) -> u32) -> Vec<u64> {
    let mut at: Vec<Option<u64>> = vec![None; slots as usize];
    for &i in servers {
        for j in 0..vnodes {
            let mut p = phi(i, j) as usize;
            while at[p].is_some() {
                p = (p + 1) % slots as usize;
            }
            at[p] = Some(i);
        }
    }
    (0..slots as usize)
        .map(|s| {
            (0..slots as usize)
                .find_map(|k| at[(s + k) % slots as usize])
                .expect("ring not empty")
        })
        .collect()
}

/// max/mean of the load per bucket (1.0 is perfect).
fn peak_ratio(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let max = counts.iter().copied().max().unwrap_or(0);
    max as f64 * counts.len() as f64 / total as f64
}

#[test]
fn example_spread_hash_dry_run_and_effect() {
    let s = example("spread_hash.lua");
    assert_eq!(s.hooks(), vec!["request_hash"]);
    let slots = 512;
    let keys = 100_000u64..200_000; // 6-digit ids
    let mut lua_counts = vec![0u64; slots as usize];
    let mut default_counts = vec![0u64; slots as usize];
    for i in keys.clone() {
        let slot = s.request_hash(i, slots).value().expect("hook answers");
        assert!(slot < slots);
        lua_counts[slot as usize] += 1;
        default_counts[default_h(i, slots) as usize] += 1;
    }
    // Values above i64::MAX arrive negative (wrapped): the Lua code reads them back as the
    // same unsigned 64 bits, so it matches fmix64 in Rust for every u64, any slot count.
    fn fmix64(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
    for (i, n) in [
        (0u64, 512u32),
        (1, 512),
        (u64::MAX, 512),
        (1 << 63, 1000),
        (123_456, 7),
    ] {
        assert_eq!(
            s.request_hash(i, n),
            HookOutcome::Value((fmix64(i) % u64::from(n)) as u32),
            "i = {i}, slots = {n}"
        );
    }
    let used = |c: &[u64]| c.iter().filter(|&&n| n > 0).count();
    println!(
        "request_hash over {} keys, {slots} slots: default uses {} slots (peak {:.2}x mean), spread_hash uses {} (peak {:.2}x)",
        keys.end - keys.start,
        used(&default_counts),
        peak_ratio(&default_counts),
        used(&lua_counts),
        peak_ratio(&lua_counts),
    );
    assert!(
        used(&default_counts) < slots as usize / 4,
        "the default is skewed"
    );
    assert_eq!(used(&lua_counts), slots as usize);
    assert!(peak_ratio(&lua_counts) < 1.5);
    assert_eq!(s.stats().total_errors(), 0);
}

#[test]
fn example_spread_vnodes_dry_run_and_effect() {
    let s = example("spread_vnodes.lua");
    assert_eq!(s.hooks(), vec!["vnode_hash"]);
    let (slots, vnodes) = (512u32, 9u32);
    let servers: Vec<u64> = (1..=3).collect();
    let both = PolicySet::from_sources(
        ["spread_hash.lua", "spread_vnodes.lua"]
            .iter()
            .map(|n| {
                let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("policies/examples")
                    .join(n);
                (
                    n.to_string(),
                    fs::read_to_string(p).expect("example exists"),
                )
            })
            .collect(),
        PolicyLimits::default(),
        1,
    )
    .expect("the two hash examples load together");
    let lua_ring = owners(&servers, vnodes, slots, |i, j| {
        both.vnode_hash(i, j, slots).value().expect("hook answers")
    });
    let default_ring = owners(&servers, vnodes, slots, |i, j| default_phi(i, j, slots));
    let share = |ring: &[u64], hash: &dyn Fn(u64) -> u32| {
        let mut per = vec![0u64; servers.len()];
        for i in 100_000u64..200_000 {
            per[(ring[hash(i) as usize] - 1) as usize] += 1;
        }
        per
    };
    let default_load = share(&default_ring, &|i| default_h(i, slots));
    let lua_load = share(&lua_ring, &|i| {
        both.request_hash(i, slots).value().expect("hook answers")
    });
    println!(
        "3 servers x {vnodes} vnodes, {slots} slots, 100000 keys: default H+Phi load {default_load:?} (peak {:.2}x mean), spread_hash+spread_vnodes {lua_load:?} (peak {:.2}x)",
        peak_ratio(&default_load),
        peak_ratio(&lua_load)
    );
    assert!(peak_ratio(&lua_load) < peak_ratio(&default_load));
    assert!(peak_ratio(&lua_load) < 1.5);
    // Each server's nodes are spread: no server owns one contiguous arc.
    let distinct_positions: std::collections::HashSet<u32> = (0..vnodes)
        .map(|j| s.vnode_hash(1, j, slots).value().expect("hook answers"))
        .collect();
    assert!(distinct_positions.len() >= vnodes as usize - 1);
}

#[test]
fn example_sticky_cookie_dry_run() {
    let s = example("sticky_cookie.lua");
    assert_eq!(s.hooks(), vec!["request_key"]);
    let key = |headers: &[(&str, &[u8])]| s.request_key(&req("id=1", headers));
    assert_eq!(
        key(&[("cookie", b"theme=dark; session=abc123; lang=en")]),
        HookOutcome::Value(LuaKey::Str("abc123".into()))
    );
    assert_eq!(
        key(&[("Cookie", b"session=first"), ("cookie", b"x=1")]),
        HookOutcome::Value(LuaKey::Str("first".into()))
    );
    assert_eq!(
        key(&[("cookie", b"mysession=no"), ("X-Session-Id", b"hdr-7")]),
        HookOutcome::Value(LuaKey::Str("hdr-7".into()))
    );
    assert_eq!(key(&[("cookie", b"theme=dark")]), HookOutcome::Absent);
    assert_eq!(key(NO_HEADERS), HookOutcome::Absent);
    assert_eq!(s.stats().total_errors(), 0);
}

#[test]
fn example_latency_health_dry_run() {
    let s = example("latency_health.lua");
    assert_eq!(s.hooks(), vec!["health"]);
    assert_eq!(
        s.health("s1", &probe(Some(200), 12.0)),
        HookOutcome::Value(true)
    );
    assert_eq!(
        s.health("s1", &probe(Some(200), 250.0)),
        HookOutcome::Value(true)
    );
    assert_eq!(
        s.health("s1", &probe(Some(200), 251.0)),
        HookOutcome::Value(false)
    );
    assert_eq!(
        s.health("s1", &probe(Some(503), 3.0)),
        HookOutcome::Value(false)
    );
    let refused = ProbeView {
        status: None,
        latency_ms: 0.4,
        error: Some("connection refused"),
    };
    assert_eq!(s.health("s1", &refused), HookOutcome::Value(false));
}

#[test]
fn examples_directory_is_not_loaded_from_policies() {
    let s = PolicySet::load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("policies"),
        PolicyLimits::default(),
        1,
    )
    .expect("policies/ loads");
    assert!(
        s.hooks().is_empty(),
        "examples must be copied up to be active"
    );
}
