//! Lua hooks that run long inside one library call, or keep request data, against the real
//! gateway (issue 10, findings 2 and 5): a `request_hash` hook doing `string.rep("", 1e9)` or
//! a backtracking pattern must not stall the other requests of its serving thread, its
//! failures are counted in `/lb/status`, and a hook never sees a global written by another
//! request.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Makes `src` the only policy file (written aside, then renamed into place) and waits until
/// the gateway has loaded it.
async fn install(gw: &GatewayProcess, name: &str, src: &str, hook: &str) {
    let dir = gw.dir.path().join("policies");
    for entry in std::fs::read_dir(&dir).expect("policy dir").flatten() {
        std::fs::remove_file(entry.path()).expect("remove old policy");
    }
    let aside = dir.join(format!(".{name}.tmp"));
    std::fs::write(&aside, src).expect("write policy");
    std::fs::rename(&aside, dir.join(name)).expect("rename policy");
    gw.wait_status(Duration::from_secs(10), &format!("{name} loaded"), |s| {
        s["policy"]["files"] == serde_json::json!([name])
            && s["policy"]["hooks"][hook]["defined"] == true
    })
    .await;
}

/// `/home?id=0..n`, from 10 concurrent clients; every answer must be a 200, and all of them
/// must come within `bound`.
async fn batch(gw: &GatewayProcess, n: u64, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..10u64 {
        let url = gw.url("");
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for id in (w..n).step_by(10) {
                let (code, body) =
                    call_with(&c, "GET", &format!("{url}/home?id={id}"), "", &[]).await;
                if code != 200 {
                    bad.push(format!("id {id}: {code} {body}"));
                }
            }
            bad
        }));
    }
    let all = async {
        let mut bad = Vec::new();
        for w in workers {
            bad.extend(w.await.expect("worker"));
        }
        bad
    };
    let bad = tokio::time::timeout(bound, all).await.unwrap_or_else(|_| {
        panic!("{n} requests did not complete within {bound:?}: slow hook calls stall the gateway")
    });
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    started.elapsed()
}

fn errors(status: &serde_json::Value, hook: &str) -> u64 {
    status["policy"]["hooks"][hook]["errors"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_library_calls_do_not_stall_the_gateway_and_request_data_does_not_leak() {
    let gw = GatewayProcess::start(&Conf::default());
    let bound = Duration::from_secs(10);

    // 1. A global written by one request is gone for the next one (all on one connection, so
    //    on one serving thread and one Lua state).
    install(
        &gw,
        "50-stash.lua",
        r#"function request_key(req)
             local previous = stash
             stash = req.headers.authorization
             if previous then error("saw another request's authorization: " .. previous) end
             return nil
           end"#,
        "request_key",
    )
    .await;
    let c = client();
    for n in 0..20 {
        let auth = format!("Bearer secret-{n}");
        let (code, body) = call_with(
            &c,
            "GET",
            &gw.url(&format!("/home?id={n}")),
            "",
            &[("authorization", auth.as_str())],
        )
        .await;
        assert_eq!(code, 200, "{body}");
    }
    let status = gw.status().await;
    assert_eq!(
        errors(&status, "request_key"),
        0,
        "a hook saw another request's global: {:#}",
        status["policy"]
    );
    assert!(
        !status.to_string().contains("secret-"),
        "request data in /lb/status: {:#}",
        status["policy"]
    );

    // 2. `string.rep("", 1e9)` (4.3 s inside one C call before) is instant.
    install(
        &gw,
        "50-rep.lua",
        r#"function request_hash(i, slots)
             if i % 2 == 0 then local nothing = string.rep("", 1e9) end
             return i
           end"#,
        "request_hash",
    )
    .await;
    let took = batch(&gw, 50, bound).await;
    eprintln!("50 requests with string.rep('', 1e9) on every other one: {took:?}");
    assert_eq!(errors(&gw.status().await, "request_hash"), 0);

    // 3. A backtracking pattern (2^30 steps inside one C call before) is stopped by the
    //    deadline or the budget; the call falls back to the built-in hash and is counted.
    install(
        &gw,
        "50-backtrack.lua",
        r#"local S = string.rep("a", 30)
           local P = string.rep("a?", 30) .. S
           function request_hash(i, slots)
             if i % 2 == 0 then S:match(P) end
             return i
           end"#,
        "request_hash",
    )
    .await;
    let took = batch(&gw, 50, bound).await;
    eprintln!("50 requests with a 30 x a? pattern on every other one: {took:?}");
    let status = gw.status().await;
    assert!(
        errors(&status, "request_hash") >= 25,
        "the stopped calls are counted: {:#}",
        status["policy"]
    );
    let last = status["policy"]["last_hook_error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("deadline") || last.contains("instruction budget"),
        "{last}"
    );
}
