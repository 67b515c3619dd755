//! Hook arguments and results: `req` and `probe` as Lua sees them, slots and keys.

use super::*;

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
