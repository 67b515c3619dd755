//! The operator page's endpoints over real sockets: `/lb/` and its files, guarded like
//! `/lb/status`, and `POST /lb/simulate`, which answers from the live state and changes nothing.

mod support;

use support::*;

fn three() -> Conf {
    Conf {
        replicas: "count = 3\nmax_replicas = 8\n".into(),
        ..Conf::default()
    }
}

async fn head_and_body(
    url: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut req = http::Request::builder().uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client().request(req).await.expect("response");
    let status = resp.status().as_u16();
    let hs = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, hs, String::from_utf8_lossy(&body).into_owned())
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    hs.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_files_are_served_with_a_strict_policy_and_guarded() {
    let mut conf = three();
    conf.admin = "allow = [\"127.0.0.1\"]\n".into();
    let gw = GatewayProcess::start(&conf);
    let (code, hs, body) = head_and_body(&gw.url("/lb/"), &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(header(&hs, "content-type"), ["text/html; charset=utf-8"]);
    assert!(header(&hs, "content-security-policy")[0].contains("default-src 'none'"));
    assert!(body.contains("<script src=\"app.js\""), "{body}");
    for (file, kind) in [
        ("app.js", "text/javascript"),
        ("app.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ] {
        let (code, hs, _) = head_and_body(&gw.url(&format!("/lb/{file}")), &[]).await;
        assert_eq!(code, 200, "{file}");
        assert!(
            header(&hs, "content-type")[0].starts_with(kind),
            "{file}: {hs:?}"
        );
    }
    let (code, hs, _) = head_and_body(&gw.url("/lb"), &[]).await;
    assert_eq!((code, header(&hs, "location")), (308, vec!["/lb/"]));
    let (code, _) = call("POST", &gw.url("/lb/"), "").await;
    assert_eq!(code, 405);
    let (code, _) = get(&gw.url("/lb/nope.js")).await;
    assert_eq!(code, 404);

    // The page's own fetches pass the guard; another site's, or a rebinding host, do not.
    let same = [("sec-fetch-site", "same-origin")];
    assert_eq!(head_and_body(&gw.url("/lb/status"), &same).await.0, 200);
    let evil = [("origin", "http://evil.example")];
    assert_eq!(head_and_body(&gw.url("/lb/"), &evil).await.0, 403);
    let (code, _) = raw(
        gw.addr,
        b"GET /lb/ HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "DNS rebinding");
    let (code, _) = raw_from(
        "127.0.0.2",
        gw.addr,
        b"GET /lb/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(code, 403, "not in admin.allow");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_browser_opens_the_page_with_the_token_as_its_password() {
    let mut conf = three();
    conf.admin = "token = \"s3cret\"\n".into();
    let mut gw = GatewayProcess::start(&conf);
    gw.admin_token = Some("s3cret".into());
    let (code, hs, _) = head_and_body(&gw.url("/lb/"), &[]).await;
    assert_eq!(code, 401);
    let challenges = header(&hs, "www-authenticate");
    assert!(challenges.contains(&"Bearer"), "{challenges:?}");
    assert!(
        challenges.iter().any(|c| c.starts_with("Basic ")),
        "a browser asks: {challenges:?}"
    );
    // base64("admin:s3cret") and base64("admin:wrong")
    let basic = [("authorization", "Basic YWRtaW46czNjcmV0")];
    assert_eq!(head_and_body(&gw.url("/lb/"), &basic).await.0, 200);
    assert_eq!(head_and_body(&gw.url("/lb/status"), &basic).await.0, 200);
    let wrong = [("authorization", "Basic YWRtaW46d3Jvbmc=")];
    assert_eq!(head_and_body(&gw.url("/lb/"), &wrong).await.0, 401);
    let bearer = [("authorization", "Bearer s3cret")];
    assert_eq!(head_and_body(&gw.url("/lb/app.js"), &bearer).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_answers_from_the_live_state_and_changes_nothing() {
    let gw = GatewayProcess::start(&three());
    let before = gw.status().await;

    let (code, body) = call(
        "POST",
        &gw.url("/lb/simulate"),
        r#"{"action": "add", "hostname": "S9"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let a = json(&body)["message"].clone();
    assert_eq!(a["change"], "add replica S9");
    let servers = a["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 4);
    let s9 = servers.iter().find(|s| s["name"] == "S9").expect("S9");
    assert_eq!(
        (s9["id"].as_u64(), s9["change"].as_str()),
        (Some(4), Some("added"))
    );
    assert!(
        (a["moved"].as_f64().expect("moved") - s9["after"].as_f64().expect("after")).abs() < 1e-9
    );
    assert_eq!(
        a["owners_before"], before["ring"]["owners"],
        "before is the live ring"
    );

    let (code, body) = call(
        "POST",
        &gw.url("/lb/simulate"),
        r#"{"action": "hash", "request_hash": "mix64", "vnode_hash": "mix64", "keys": 5000}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["message"]["keys"], 5000);

    let spread = std::fs::read_to_string("policies/examples/spread_hash.lua").expect("example");
    let body = serde_json::json!({"action": "policy", "lua": spread}).to_string();
    let (code, body) = call("POST", &gw.url("/lb/simulate"), &body).await;
    assert_eq!(code, 200, "{body}");

    // Every bad input is a 400 naming the problem.
    for (body, says) in [
        ("", "not valid JSON"),
        ("[]", "JSON object"),
        (r#"{"action": "explode"}"#, "Unknown action"),
        (
            r#"{"action": "remove", "replica": "server-9"}"#,
            "does not exist",
        ),
        (
            r#"{"action": "add", "hostname": "server-1"}"#,
            "already in use",
        ),
        (
            r#"{"action": "hash", "vnode_hash": "sha1"}"#,
            "\"quadratic\" or \"mix64\"",
        ),
        (
            r#"{"action": "policy", "lua": "function ("}"#,
            "does not load",
        ),
        (
            r#"{"action": "policy", "lua": "while true do end"}"#,
            "does not load",
        ),
        (
            r#"{"action": "policy", "lua": "function request_hash(i, s) while true do end end"}"#,
            "request_hash hook failed",
        ),
        (r#"{"action": "add", "keys": 1000000}"#, "from 1 to 200000"),
    ] {
        let (code, text) = call("POST", &gw.url("/lb/simulate"), body).await;
        assert_eq!(code, 400, "{body}: {text}");
        let v = json(&text);
        assert_eq!(v["status"], "failure");
        assert!(
            v["message"].as_str().is_some_and(|m| m.contains(says)),
            "{body}: {text}"
        );
    }
    let (code, _) = get(&gw.url("/lb/simulate")).await;
    assert_eq!(code, 405);

    // Nothing changed: same ring, same members, no policy counted.
    let after = gw.status().await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["ring"]["owners"], before["ring"]["owners"]);
    assert_eq!(
        gw.replica_names().await,
        ["server-1", "server-2", "server-3"]
    );
    assert_eq!(after["policy"]["hooks"]["request_hash"]["calls"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_too_slow_to_simulate_is_stopped() {
    let mut conf = three();
    conf.policy = "hook_timeout = \"1s\"\ninstruction_budget = 100000000\n".into();
    let gw = GatewayProcess::start(&conf);
    let lua =
        "function request_hash(i, s) local x = 0 for k = 1, 300000 do x = x + k end return i end";
    let body = serde_json::json!({"action": "policy", "lua": lua}).to_string();
    let (code, text) = call("POST", &gw.url("/lb/simulate"), &body).await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("too slow to simulate"), "{text}");
    // The gateway serves on.
    let (code, _) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 200);
}
