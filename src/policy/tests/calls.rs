//! The call path: deferring, failures, thread-local states and generations.

use super::*;

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
        r#"local ONE = 1
           function request_hash(i, slots) local n = i + ONE return n end
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
