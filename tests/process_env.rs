//! Process replicas start with a clean environment: what the gateway was started with (tokens,
//! credentials, anything) never reaches a `ringgate-server` child.

mod support;

use support::*;

/// What a process replica's environment holds, and nothing else.
const ALLOWED: [&str; 5] = [
    "SERVER_ID",
    "PORT",
    "BIND",
    "RINGGATE_EXIT_ON_STDIN_EOF",
    "PATH",
];

/// The variables in `/proc/<pid>/environ` (readable for processes of the same user).
fn environment_of(pid: u32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read the environment of pid {pid}: {e}"));
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_do_not_inherit_the_gateways_environment() {
    let secret = "RINGGATE_TEST_SECRET";
    let gw = GatewayProcess::start_with(
        &Conf {
            replicas: "count = 2\n".into(),
            ..Conf::default()
        }
        .render(),
        &[
            (secret, "hunter2"),
            ("AWS_SECRET_ACCESS_KEY", "also-secret"),
        ],
    );
    // The gateway itself has them, so their absence below means something.
    let own = environment_of(gw.pid());
    assert!(own.iter().any(|(k, v)| k == secret && v == "hunter2"));

    let pids = gw.replica_pids().await;
    assert_eq!(pids.len(), 2, "{:#}", gw.status().await);
    for pid in pids {
        let env = environment_of(pid);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        for (k, _) in &env {
            assert!(
                ALLOWED.contains(&k.as_str()),
                "replica {pid} sees {k} from the gateway's environment: {names:?}"
            );
        }
        let var = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        assert!(var("SERVER_ID").is_some_and(|s| s.starts_with("server-")));
        assert_eq!(var("BIND"), Some("127.0.0.1"));
        assert_eq!(var("PORT"), Some("0"));
        assert_eq!(var("RINGGATE_EXIT_ON_STDIN_EOF"), Some("1"));
        assert!(var(secret).is_none() && var("RUST_LOG").is_none());
    }
    // And they serve.
    let (code, body) = get(&gw.url("/home?id=1")).await;
    assert_eq!(code, 200, "{body}");
}
