//! The control plane's state machine, end to end inside the process: the real controller over a
//! scripted provider and prober, on paused tokio time (a minute of back-off takes no real time).

use std::time::Duration;

use super::membership::ScaleRequest;
use super::testkit::{config, Harness, World};
use crate::control::error::ControlError;

const SETTLE: Duration = Duration::from_secs(60);

fn scale(n: u32, hostnames: &[&str]) -> ScaleRequest {
    ScaleRequest {
        n,
        hostnames: hostnames.iter().map(|h| h.to_string()).collect(),
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(start_paused = true)]
async fn start_up_starts_the_configured_replicas_and_routes_to_them() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(3), world, events);
    h.handle.wait_ready().await.expect("ready");
    h.until(SETTLE, "three in the ring", |h| h.in_ring().len() == 3)
        .await;
    let snap = h.snapshot();
    assert_eq!(snap.members, names(&["server-1", "server-2", "server-3"]));
    assert_eq!(snap.ring.servers(), 3);
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["desired"], 3);
    assert_eq!(status["replicas"][0]["slots"][0], 26, "Φ(1,0) = 26");
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_keeps_failing_to_start_backs_off_exponentially() {
    let (world, events) = World::new(true);
    world.fail_starts("server-2", u32::MAX);
    let h = Harness::start(config(2), world.clone(), events);
    h.handle
        .wait_ready()
        .await
        .expect("ready: a failing start does not hold it up");
    h.until(SETTLE, "seven starts", |h| {
        h.world.spawns_of("server-2").len() >= 7
    })
    .await;
    let starts = world.spawns_of("server-2");
    let gaps: Vec<u64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis() as u64)
        .collect();
    // recovery_delay 1 s doubling, capped at max_backoff 8 s.
    assert_eq!(gaps[..6], [1000, 2000, 4000, 8000, 8000, 8000]);
    assert_eq!(h.in_ring(), names(&["server-1"]), "the others keep serving");
    let r = h.replica("server-2").await;
    assert_eq!(r["state"], "down");
    assert!(r["crash_streak"].as_u64().is_some_and(|s| s >= 6), "{r}");
    assert!(r["last_exit"]
        .as_str()
        .is_some_and(|e| e.contains("scripted start failure")));
}

#[tokio::test(start_paused = true)]
async fn fall_failed_checks_replace_a_replica_with_the_same_id_and_slots() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let before = h.replica("server-2").await;
    world.set_healthy("server-2", false);
    // One failed check: suspect, still routed.
    let mut suspect_seen = false;
    for _ in 0..300 {
        let r = h.replica("server-2").await;
        if r["state"] == "suspect" {
            suspect_seen = true;
            assert!(h.in_ring().contains(&"server-2".to_string()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(suspect_seen, "a first failed check makes it suspect");
    h.until(SETTLE, "server-2 out of the ring", |h| {
        !h.in_ring().contains(&"server-2".to_string())
    })
    .await;
    assert_eq!(
        world.spawns_of("server-2").len(),
        1,
        "replaced after recovery_delay, not at once"
    );
    world.set_healthy("server-2", true);
    h.until(SETTLE, "server-2 back", |h| h.in_ring().len() == 3)
        .await;
    let after = h.replica("server-2").await;
    assert_eq!(world.spawns_of("server-2").len(), 2);
    assert_eq!(after["id"], before["id"]);
    assert_eq!(
        after["slots"], before["slots"],
        "a replacement takes the same slots"
    );
    assert_ne!(after["instance"], before["instance"]);
    assert_eq!(after["restarts"], 1);
}

#[tokio::test(start_paused = true)]
async fn a_passive_failure_ejects_at_once_and_rise_good_checks_bring_it_back() {
    let (world, events) = World::new(false);
    world.existing(&[(1, "web-1"), (2, "web-2")]);
    let h = Harness::start(config(2), world.clone(), events);
    h.until(SETTLE, "both up", |h| h.in_ring().len() == 2).await;
    let incarnation = h
        .snapshot()
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == "web-1")
        .map(|u| (u.id, u.incarnation))
        .expect("web-1 routed");
    h.handle
        .passive_failure(incarnation.0, incarnation.1, "connection refused".into());
    h.until(Duration::from_millis(50), "web-1 ejected", |h| {
        h.in_ring() == names(&["web-2"])
    })
    .await;
    // The static provider does not replace it; `rise` good checks bring it back.
    h.until(SETTLE, "web-1 back", |h| h.in_ring().len() == 2)
        .await;
    assert!(world.spawns_of("web-1").is_empty(), "never started: static");
    let r = h.replica("web-1").await;
    assert_eq!(r["state"], "up");
}

#[tokio::test(start_paused = true)]
async fn add_commits_only_once_every_new_replica_answers() {
    let (world, events) = World::new(true);
    world.set_healthy("S5", false);
    let h = Harness::start(config(1), world.clone(), events);
    h.until(SETTLE, "one up", |h| h.in_ring().len() == 1).await;
    let handle = h.handle.clone();
    let add = tokio::spawn(async move { handle.add(scale(2, &["S5"])).await });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!add.is_finished(), "waits for S5");
    assert_eq!(
        h.snapshot().members,
        names(&["server-1"]),
        "not a member yet"
    );
    assert_eq!(h.replica("S5").await["state"], "starting");
    assert_eq!(h.replica("server-3").await["state"], "starting");
    world.set_healthy("S5", true);
    let members = add.await.expect("joined").expect("added");
    assert_eq!(members.members, names(&["server-1", "S5", "server-3"]));
    assert_eq!(
        members.changed,
        names(&["S5", "server-3"]),
        "what was added"
    );
    assert_eq!(h.in_ring().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_rolls_the_whole_add_back() {
    let (world, events) = World::new(true);
    world.fail_starts("S6", u32::MAX);
    let h = Harness::start(config(1), world.clone(), events);
    h.until(SETTLE, "one up", |h| h.in_ring().len() == 1).await;
    let err = h
        .handle
        .add(scale(2, &["S5", "S6"]))
        .await
        .expect_err("S6 cannot start");
    match &err {
        ControlError::AddFailed { replica, .. } => assert_eq!(replica, "S6"),
        other => panic!("expected AddFailed, got {other:?}"),
    }
    assert!(err.to_string().contains("nothing was added"), "{err}");
    assert_eq!(h.snapshot().members, names(&["server-1"]));
    assert_eq!(
        world.running(),
        names(&["server-1"]),
        "S5 was stopped again"
    );
    assert!(world.removes().contains(&"S5".to_string()));
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["replicas"].as_array().map(Vec::len), Some(1));
    // The names are free again.
    let members = h.handle.add(scale(1, &["S5"])).await.expect("added");
    assert_eq!(members.members, names(&["server-1", "S5"]));
}

#[tokio::test(start_paused = true)]
async fn rm_takes_a_replica_off_the_ring_at_once_and_stops_it_after_its_requests() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(2), world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    let stats = h
        .snapshot()
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == "server-2")
        .map(|u| u.stats.clone())
        .expect("server-2 routed");
    stats
        .in_flight
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let handle = h.handle.clone();
    let rm = tokio::spawn(async move { handle.remove(scale(1, &["server-2"])).await });
    h.until(Duration::from_millis(50), "off the ring", |h| {
        h.in_ring() == names(&["server-1"])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!rm.is_finished(), "still draining");
    assert!(world.running().contains(&"server-2".to_string()));
    assert_eq!(h.replica("server-2").await["state"], "draining");
    stats
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    let members = rm.await.expect("joined").expect("removed");
    assert_eq!(members.members, names(&["server-1"]));
    assert_eq!(members.changed, names(&["server-2"]), "what was removed");
    assert_eq!(world.running(), names(&["server-1"]));
}

#[tokio::test(start_paused = true)]
async fn a_provider_exit_ejects_at_once_and_replaces_with_the_same_name_and_id() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let before = h.replica("server-3").await;
    world.kill("server-3").await;
    h.until(Duration::from_millis(50), "ejected", |h| {
        h.in_ring().len() == 2
    })
    .await;
    h.until(SETTLE, "replaced", |h| h.in_ring().len() == 3)
        .await;
    let after = h.replica("server-3").await;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["slots"], before["slots"]);
    assert_eq!(world.spawns_of("server-3").len(), 2);
    let gap = world.spawns_of("server-3")[1] - world.spawns_of("server-3")[0];
    assert!(
        gap >= Duration::from_secs(1),
        "after recovery_delay: {gap:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn config_edits_scale_and_an_impossible_ring_changes_nothing() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let before = h.handle.status().await.expect("status");

    // 3 servers × 200 vnodes do not fit in 512 slots: rejected whole.
    let mut bad = config(5);
    bad.ring.vnodes = 200;
    h.handle
        .send(super::Command::Reload {
            config: Box::new(bad),
        })
        .await;
    let status = h.handle.status().await.expect("status");
    assert!(
        status["config"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot hold")),
        "{status}"
    );
    assert_eq!(status["ring"], before["ring"]);
    assert_eq!(
        status["desired"], 3,
        "the count in the rejected edit did not apply"
    );

    // A valid edit scales to its count.
    h.handle
        .send(super::Command::Reload {
            config: Box::new(config(5)),
        })
        .await;
    h.until(SETTLE, "five up", |h| h.in_ring().len() == 5).await;
    assert_eq!(
        h.handle.status().await.expect("status")["config"]["last_error"],
        serde_json::Value::Null
    );
    h.handle
        .send(super::Command::Reload {
            config: Box::new(config(2)),
        })
        .await;
    h.until(SETTLE, "two left", |h| {
        h.snapshot().members == names(&["server-1", "server-2"])
    })
    .await;
    h.until(SETTLE, "stopped", |h| h.world.running().len() == 2)
        .await;
}

#[tokio::test(start_paused = true)]
async fn refused_calls_change_nothing() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(2), world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    for (req, add) in [
        (scale(1, &["server-1"]), true),
        (scale(60, &[]), true),
        (scale(1, &["nope"]), false),
        (scale(3, &[]), false),
    ] {
        let result = if add {
            h.handle.add(req).await
        } else {
            h.handle.remove(req).await
        };
        assert!(
            matches!(result, Err(ControlError::Membership(_))),
            "{result:?}"
        );
    }
    assert_eq!(h.snapshot().members, names(&["server-1", "server-2"]));
    assert_eq!(world.spawns_of("server-3").len(), 0);
    assert!(world.removes().is_empty());
}

fn id_of(h: &Harness, name: &str) -> (crate::ring::ServerId, u64) {
    h.snapshot()
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == name)
        .map(|u| (u.id, u.incarnation))
        .unwrap_or_else(|| panic!("{name} is not routed"))
}

fn outlier_config(count: u32) -> crate::config::Config {
    let mut c = config(count);
    c.health.eject_after_5xx = 3;
    c.health.eject_time = Duration::from_secs(5);
    c.health.max_backoff = Duration::from_secs(8);
    c
}

#[tokio::test(start_paused = true)]
async fn an_outlier_is_ejected_not_replaced_and_returns_after_its_time() {
    let (world, events) = World::new(true);
    let h = Harness::start(outlier_config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let (id, incarnation) = id_of(&h, "server-2");
    h.handle.outlier(id, incarnation, 3);
    h.until(Duration::from_millis(50), "ejected", |h| {
        h.in_ring().len() == 2
    })
    .await;
    let r = h.replica("server-2").await;
    assert_eq!(r["state"], "ejected");
    assert_eq!(r["ejections"], 1);
    assert!(
        r["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 4000),
        "{r}"
    );
    // Its checks pass all along, but it stays out until its time is up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(h.in_ring().len(), 2);
    h.until(Duration::from_secs(5), "back", |h| h.in_ring().len() == 3)
        .await;
    assert_eq!(world.spawns_of("server-2").len(), 1, "never replaced");
    // A second ejection in a row lasts twice as long (capped by max_backoff 8 s).
    let (id, incarnation) = id_of(&h, "server-2");
    h.handle.outlier(id, incarnation, 3);
    h.until(Duration::from_millis(50), "ejected again", |h| {
        h.in_ring().len() == 2
    })
    .await;
    let r = h.replica("server-2").await;
    assert_eq!(r["ejections"], 2);
    assert!(
        r["ejected_for_ms"].as_u64().is_some_and(|ms| ms > 7000),
        "{r}"
    );
}

#[tokio::test(start_paused = true)]
async fn outlier_ejection_shares_the_ejection_cap() {
    let (world, events) = World::new(true);
    let h = Harness::start(outlier_config(3), world, events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let (a, ia) = id_of(&h, "server-1");
    let (b, ib) = id_of(&h, "server-2");
    h.handle.outlier(a, ia, 3);
    h.handle.outlier(b, ib, 3);
    let _ = h.handle.status().await;
    assert_eq!(h.in_ring().len(), 2, "50% of 3: one out at a time");
}

#[tokio::test(start_paused = true)]
async fn a_failure_percentage_over_the_window_ejects() {
    let (world, events) = World::new(true);
    let mut c = config(3);
    c.health.eject_failure_percent = 50;
    c.health.eject_window = Duration::from_secs(5);
    c.health.eject_min_requests = 10;
    let h = Harness::start(c, world, events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let stats = h
        .snapshot()
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == "server-3")
        .map(|u| u.stats.clone())
        .expect("routed");
    for status in [
        500u16, 500, 503, 200, 500, 502, 500, 200, 500, 500, 500, 200,
    ] {
        stats.record_response(status);
    }
    h.until(Duration::from_secs(12), "ejected by the window", |h| {
        h.in_ring().len() == 2
    })
    .await;
    assert_eq!(h.replica("server-3").await["state"], "ejected");
}

#[tokio::test(start_paused = true)]
async fn a_replacement_ramps_up_over_slow_start_and_start_up_does_not() {
    let (world, events) = World::new(true);
    let mut c = config(3);
    c.health.slow_start = Duration::from_secs(10);
    let h = Harness::start(c, world.clone(), events);
    h.handle.wait_ready().await.expect("ready");
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    assert!(
        h.snapshot()
            .upstreams
            .iter()
            .flatten()
            .all(|u| u.ramp.is_none()),
        "the replicas of the start-up take their keys at once"
    );
    world.kill("server-1").await;
    h.until(SETTLE, "out", |h| h.in_ring().len() == 2).await;
    h.until(SETTLE, "replaced", |h| h.in_ring().len() == 3)
        .await;
    let snap = h.snapshot();
    let ramp = snap
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == "server-1")
        .and_then(|u| u.ramp)
        .expect("the replacement ramps");
    assert!(snap.ramps_until.is_some());
    let early = ramp.progress(tokio::time::Instant::now());
    assert!(early < 0.2, "{early}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mid = ramp.progress(tokio::time::Instant::now());
    assert!((0.4..0.7).contains(&mid), "{mid}");
    let r = h.replica("server-1").await;
    assert!(r["ramp_progress"].as_f64().is_some_and(|p| p > 0.4), "{r}");
    h.until(Duration::from_secs(8), "ramp over", |h| {
        h.snapshot().ramps_until.is_none()
    })
    .await;
    assert!(h
        .snapshot()
        .upstreams
        .iter()
        .flatten()
        .all(|u| u.ramp.is_none()));
}

#[tokio::test(start_paused = true)]
async fn adopted_replicas_go_back_to_their_recorded_slots_and_new_ones_probe_around_them() {
    let (world, events) = World::new(true);
    // What an earlier run recorded: not where Φ would put them today (a history of
    // collisions and removals), so a restart that recomputed would move keys.
    let recorded_1: Vec<u32> = (100..109).collect();
    let recorded_3: Vec<u32> = vec![26, 29, 34, 41, 50, 61, 74, 89, 120];
    world.existing_recorded(1, "server-1", &recorded_1);
    world.existing_recorded(3, "server-3", &recorded_3);
    let h = Harness::start(config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    assert_eq!(
        h.replica("server-1").await["slots"],
        serde_json::json!(recorded_1)
    );
    assert_eq!(
        h.replica("server-3").await["slots"],
        serde_json::json!(recorded_3)
    );
    // server-2 is new: placed around the recorded ones, and told its slots when started.
    let slots_2: Vec<u32> =
        serde_json::from_value(h.replica("server-2").await["slots"].clone()).expect("slots");
    assert_eq!(world.spawned_slots("server-2"), vec![slots_2.clone()]);
    assert!(slots_2
        .iter()
        .all(|s| !recorded_1.contains(s) && !recorded_3.contains(s)));
}

#[tokio::test(start_paused = true)]
async fn an_add_reserves_its_slots_when_planned_and_a_rollback_frees_them() {
    let (world, events) = World::new(true);
    world.fail_starts("S9", u32::MAX);
    let h = Harness::start(config(1), world.clone(), events);
    h.until(SETTLE, "one up", |h| h.in_ring().len() == 1).await;
    let before = h.snapshot().ring.fingerprint();
    let failed = h.handle.add(scale(2, &["S8", "S9"])).await;
    assert!(
        matches!(failed, Err(ControlError::AddFailed { .. })),
        "{failed:?}"
    );
    let s8 = world.spawned_slots("S8");
    assert_eq!(s8.len(), 1, "started once, with its slots");
    assert_eq!(s8[0].len(), 9);
    assert_eq!(
        h.snapshot().ring.fingerprint(),
        before,
        "nothing routed to it"
    );
    // The rolled-back replicas' slots are free again: the next add gets the same ones.
    h.handle.add(scale(1, &["S8"])).await.expect("added");
    assert_eq!(world.spawned_slots("S8")[1], s8[0]);
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["replicas"][1]["slots"], serde_json::json!(s8[0]));
}

/// Two gateways on one swarm-like world: the ring record is shared, tasks are the engine's.
fn two_gateways(count: u32) -> (Arc<World>, Harness, Harness) {
    let world = World::swarm();
    let a = Harness::start_named(config(count), world.clone(), world.subscribe(), "gw-a");
    let b = Harness::start_named(config(count), world.clone(), world.subscribe(), "gw-b");
    (world, a, b)
}

fn agree(a: &Harness, b: &Harness, n: usize) -> bool {
    a.in_ring().len() == n && b.in_ring().len() == n && a.fingerprint() == b.fingerprint()
}

use std::sync::Arc;

#[tokio::test(start_paused = true)]
async fn gateways_sharing_a_ring_grow_it_once_and_route_alike() {
    let (world, a, b) = two_gateways(3);
    a.until(SETTLE, "both route to the same three", |a| agree(a, &b, 3))
        .await;
    let record = world.record().get();
    assert_eq!(
        record.members.len(),
        3,
        "both grew to 3, together: {record:?}"
    );
    assert_eq!(
        a.snapshot().members,
        names(&["server-1", "server-2", "server-3"])
    );
    assert_eq!(b.snapshot().members, a.snapshot().members);
    // The slots are the record's, which are the ones a single gateway computes.
    let status = b.handle.status().await.expect("status");
    assert_eq!(status["replicas"][0]["slots"][0], 26, "Φ(1,0) = 26");
    assert_eq!(status["engine"]["reachable"], true);
}

#[tokio::test(start_paused = true)]
async fn an_add_through_one_gateway_and_a_remove_through_the_other_converge() {
    let (_world, a, b) = two_gateways(2);
    a.until(SETTLE, "two", |a| agree(a, &b, 2)).await;
    let members = a.handle.add(scale(1, &["S5"])).await.expect("added");
    assert_eq!(members.members, names(&["server-1", "server-2", "S5"]));
    assert_eq!(members.changed, names(&["S5"]));
    // B learns it from the record (no call of its own).
    b.until(Duration::from_secs(1), "B routes to S5 too", |b| {
        agree(&a, b, 3)
    })
    .await;
    let members = b
        .handle
        .remove(scale(1, &["server-1"]))
        .await
        .expect("removed");
    assert_eq!(members.members, names(&["server-2", "S5"]));
    assert_eq!(members.changed, names(&["server-1"]));
    a.until(Duration::from_secs(1), "A dropped server-1", |a| {
        agree(a, &b, 2)
    })
    .await;
    assert_eq!(a.snapshot().members, names(&["server-2", "S5"]));
}

#[tokio::test(start_paused = true)]
async fn concurrent_adds_on_two_gateways_all_land_with_distinct_ids_and_slots() {
    let (world, a, b) = two_gateways(1);
    a.until(SETTLE, "one", |a| agree(a, &b, 1)).await;
    let calls: Vec<_> = (0..4)
        .map(|k| {
            let h = if k % 2 == 0 {
                a.handle.clone()
            } else {
                b.handle.clone()
            };
            tokio::spawn(async move { h.add(scale(1, &[])).await })
        })
        .collect();
    for c in calls {
        c.await.expect("joined").expect("every call lands");
    }
    a.until(SETTLE, "five on both", |a| agree(a, &b, 5)).await;
    let record = world.record().get();
    assert_eq!(record.members.len(), 5);
    let mut slots: Vec<u32> = record
        .members
        .values()
        .flat_map(|m| m.slots.clone())
        .collect();
    let all = slots.len();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), all, "no slot twice");
    assert!(
        *world.record().conflicts.lock().expect("lock") > 0,
        "the race happened"
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_the_engine_restarts_comes_back_with_its_id_and_slots() {
    let (world, a, b) = two_gateways(3);
    a.until(SETTLE, "three", |a| agree(a, &b, 3)).await;
    let before = a.replica("server-2").await;
    let fingerprint = a.fingerprint();
    world.kill_task("server-2");
    a.until(Duration::from_millis(50), "ejected on both", |a| {
        a.in_ring().len() == 2 && b.in_ring().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        world.spawns_of("server-2").len(),
        1,
        "the gateways never start it again"
    );
    world.restart_task("server-2", 2);
    a.until(Duration::from_secs(1), "back on both", |a| agree(a, &b, 3))
        .await;
    let after = a.replica("server-2").await;
    assert_eq!(after["id"], before["id"]);
    assert_eq!(after["slots"], before["slots"]);
    assert_ne!(after["instance"], before["instance"]);
    assert_eq!(a.fingerprint(), fingerprint, "every key where it was");
}

#[tokio::test(start_paused = true)]
async fn a_gateway_started_later_routes_as_the_others() {
    let (world, a, b) = two_gateways(2);
    a.until(SETTLE, "two", |a| agree(a, &b, 2)).await;
    a.handle.add(scale(2, &["S7"])).await.expect("added");
    b.handle
        .remove(scale(1, &["server-1"]))
        .await
        .expect("removed");
    a.until(SETTLE, "three on both", |a| agree(a, &b, 3)).await;
    let c = Harness::start_named(config(2), world.clone(), world.subscribe(), "gw-c");
    c.until(SETTLE, "the newcomer agrees", |c| agree(c, &a, 3))
        .await;
    assert_eq!(c.snapshot().members, a.snapshot().members);
    assert_eq!(
        world.record().get().members.len(),
        3,
        "count 2 < 3 members: no growth"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_engine_keeps_the_last_ring_and_says_so() {
    let (world, a, b) = two_gateways(2);
    a.until(SETTLE, "two", |a| agree(a, &b, 2)).await;
    let fingerprint = a.fingerprint();
    *world.record().down.lock().expect("lock") = true;
    let err = a
        .handle
        .add(scale(1, &[]))
        .await
        .expect_err("the engine is down");
    assert!(
        matches!(err, ControlError::EngineUnavailable { .. }),
        "{err}"
    );
    assert!(crate::rescue::GatewayError::from(err).retryable());
    assert_eq!(a.fingerprint(), fingerprint, "routing goes on");
    world.record().broadcast_engine(false);
    let mut status = a.handle.status().await.expect("status");
    for _ in 0..100 {
        if status["engine"]["reachable"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = a.handle.status().await.expect("status");
    }
    assert_eq!(status["engine"]["reachable"], false);
    assert_eq!(status["engine"]["routing_on_last_known_ring"], true);
    assert_eq!(a.in_ring().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_late_observation_of_an_older_record_changes_nothing() {
    let (world, a, b) = two_gateways(1);
    a.until(SETTLE, "one", |a| agree(a, &b, 1)).await;
    // What a watch saw just before the /add below wrote the record.
    let before = world.record().get();
    a.handle.add(scale(1, &["S5"])).await.expect("added");
    world.record().broadcast_ring(before);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.snapshot().members, names(&["server-1", "S5"]));
    b.until(Duration::from_secs(1), "B too", |b| agree(&a, b, 2))
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_shared_ring_refuses_a_placement_edit_and_keeps_its_slots() {
    let (_world, a, b) = two_gateways(2);
    a.until(SETTLE, "two", |a| agree(a, &b, 2)).await;
    let fingerprint = a.fingerprint();
    let mut edit = config(2);
    edit.ring.vnode_hash = crate::hashing::HashFunction::Mix64;
    a.handle
        .send(super::Command::Reload {
            config: Box::new(edit),
        })
        .await;
    let status = a.handle.status().await.expect("status");
    assert!(
        status["config"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("fixed by the shared ring record")),
        "{status}"
    );
    assert_eq!(a.fingerprint(), fingerprint);
    assert_eq!(a.fingerprint(), b.fingerprint());
}

/// `config(n)` with `env` set in `[provider]` (the replica spec), as a live edit would.
fn with_env(mut c: crate::config::Config, key: &str, value: &str) -> crate::config::Config {
    c.provider.env.insert(key.into(), value.into());
    c
}

async fn reload(h: &Harness, c: crate::config::Config) {
    assert!(
        h.handle
            .send(super::Command::Reload {
                config: Box::new(c)
            })
            .await
    );
}

async fn roll_state(h: &Harness) -> serde_json::Value {
    h.handle.status().await.expect("status")["roll"].clone()
}

/// Instances of each replica now, by name.
fn instances(h: &Harness) -> Vec<(String, String)> {
    let snap = h.snapshot();
    snap.upstreams
        .iter()
        .flatten()
        .map(|u| (u.name.clone(), u.addr.to_string()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_spec_edit_rolls_every_replica_in_place_one_at_a_time() {
    let (world, events) = World::new(true);
    let h = Harness::start(config(3), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let fingerprint = h.fingerprint();
    let before = instances(&h);
    let slots_before = h.replica("server-2").await["slots"].clone();
    reload(&h, with_env(config(3), "LOG_LEVEL", "debug")).await;
    // Sample the roll as it goes: every replica stays in the ring, every key keeps its owner,
    // at most roll_batch (1) replacement runs at a time.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut most_replacing = 0;
    loop {
        assert_eq!(
            h.in_ring().len(),
            3,
            "a replica left the ring during the roll"
        );
        assert_eq!(h.fingerprint(), fingerprint, "a key moved during the roll");
        let roll = roll_state(&h).await;
        most_replacing = most_replacing.max(roll["replacing"].as_array().map_or(0, Vec::len));
        if roll["state"] == "done" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the roll did not finish: {roll}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most_replacing, 1, "one at a time");
    let roll = roll_state(&h).await;
    assert_eq!(
        roll["rolled"],
        serde_json::json!(["server-1", "server-2", "server-3"])
    );
    assert!(roll["reason"]
        .as_str()
        .is_some_and(|r| r.contains("provider.env")));
    let after = instances(&h);
    for ((name, old), (same, new)) in before.iter().zip(&after) {
        assert_eq!(name, same);
        assert_ne!(old, new, "{name} runs a new instance");
    }
    assert_eq!(h.replica("server-2").await["slots"], slots_before);
    for name in ["server-1", "server-2", "server-3"] {
        let specs = world.spawned_specs(name);
        assert_eq!(
            specs.len(),
            2,
            "{name}: the first start and its replacement"
        );
        assert!(
            !specs[0].1 && specs[1].1,
            "the replacement ran beside the old one"
        );
        assert_eq!(specs[1].0.env["LOG_LEVEL"], "debug");
    }
    h.until(Duration::from_secs(15), "the old instances retired", |h| {
        h.world.retired().len() == 3
    })
    .await;
    for name in ["server-1", "server-2", "server-3"] {
        assert_eq!(
            world.instances_of(name),
            1,
            "{name}: the old instance was stopped"
        );
    }
    assert!(world.removes().is_empty(), "nothing was removed whole");
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["spec"]["generation"], 2);
    assert_eq!(status["replicas"][0]["spec_generation"], 2);
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_never_gets_ready_stops_the_roll_with_the_old_ones_serving() {
    let (world, events) = World::new(true);
    world.fail_checks_with_env("MODE", "broken");
    let mut c = config(3);
    c.provider.start_timeout = Duration::from_secs(5);
    let h = Harness::start(c.clone(), world.clone(), events);
    h.until(SETTLE, "three up", |h| h.in_ring().len() == 3)
        .await;
    let before = instances(&h);
    let fingerprint = h.fingerprint();
    reload(&h, with_env(c, "MODE", "broken")).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let roll = loop {
        assert_eq!(instances(&h), before, "the old instances serve throughout");
        assert_eq!(h.fingerprint(), fingerprint);
        let roll = roll_state(&h).await;
        if roll["state"] == "stopped"
            && roll["stopped"]["output"]
                .as_array()
                .is_some_and(|o| !o.is_empty())
        {
            break roll;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the roll did not stop: {roll}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stop = &roll["stopped"];
    assert_eq!(stop["replica"], "server-1");
    let cause = stop["cause"].as_str().unwrap_or_default();
    assert!(
        cause.contains("did not become ready")
            && cause.contains("GET /heartbeat")
            && cause.contains("provider.start_timeout (5s)")
            && cause.contains("last check: scripted: not answering"),
        "{cause}"
    );
    assert!(
        stop["output"][0]
            .as_str()
            .is_some_and(|o| o.contains("scripted output")),
        "{stop}"
    );
    assert_eq!(roll["rolled"], serde_json::json!([]));
    assert_eq!(
        roll["pending"],
        serde_json::json!(["server-1", "server-2", "server-3"])
    );
    assert_eq!(
        world.spawned_specs("server-2").len(),
        1,
        "never tried after the first failed"
    );
    assert_eq!(
        world.retired(),
        ["server-1"],
        "the failed replacement was stopped"
    );
    assert_eq!(world.instances_of("server-1"), 1);
    // Stays stopped: the next tick does not try again on its own.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(world.spawned_specs("server-1").len(), 2);
    assert_eq!(instances(&h), before);
}

#[tokio::test(start_paused = true)]
async fn post_lb_roll_rolls_the_same_spec_and_a_second_call_waits_for_it() {
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.provider.roll_batch = 2;
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    let started = h.handle.roll().await.expect("a roll starts");
    assert_eq!(started["roll"]["state"], "rolling");
    assert_eq!(started["roll"]["generation"], 2);
    assert_eq!(
        started["roll"]["replacing"],
        serde_json::json!(["server-1", "server-2"]),
        "roll_batch = 2: both at once"
    );
    let again = h.handle.roll().await.expect_err("one roll at a time");
    assert!(
        matches!(
            again,
            ControlError::Roll(super::error::RollError::InProgress { .. })
        ),
        "{again:?}"
    );
    assert!(again.to_string().contains("wait for it"), "{again}");
    h.until(SETTLE, "rolled", |h| {
        h.world.spawned_specs("server-2").len() == 2 && h.world.retired().len() == 2
    })
    .await;
    let specs = world.spawned_specs("server-1");
    assert_eq!(specs[0].0, specs[1].0, "the same spec, a new instance");
    assert_eq!(roll_state(&h).await["state"], "done");
    h.handle.roll().await.expect("once done, another may start");
}

#[tokio::test(start_paused = true)]
async fn a_static_provider_has_nothing_to_roll() {
    let (world, events) = World::new(false);
    world.existing(&[(1, "web-1")]);
    let h = Harness::start(config(1), world, events);
    h.until(SETTLE, "up", |h| h.in_ring().len() == 1).await;
    let e = h.handle.roll().await.expect_err("static");
    assert!(e.to_string().contains("starts no replica"), "{e}");
    assert_eq!(
        crate::rescue::GatewayError::from(e).status(),
        http::StatusCode::CONFLICT
    );
}

#[tokio::test(start_paused = true)]
async fn an_add_that_never_gets_ready_names_the_replica_its_last_check_and_output() {
    let (world, events) = World::new(true);
    world.set_healthy("S5", false);
    let mut c = config(1);
    c.provider.start_timeout = Duration::from_secs(3);
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "one up", |h| h.in_ring().len() == 1).await;
    let e = h
        .handle
        .add(scale(1, &["S5"]))
        .await
        .expect_err("never ready");
    let text = e.to_string();
    assert!(
        text.starts_with("Replica 'S5' did not become ready"),
        "{text}"
    );
    assert!(text.contains("provider.start_timeout (3s)"), "{text}");
    assert!(
        text.contains("last check: scripted: not answering"),
        "{text}"
    );
    assert!(
        text.contains("its last output: \"scripted output"),
        "{text}"
    );
    assert!(text.ends_with("nothing was added"), "{text}");
    assert_eq!(
        h.snapshot().members,
        names(&["server-1"]),
        "nothing changed"
    );
    assert_eq!(world.running(), names(&["server-1"]));
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_dies_while_it_is_rolled_is_replaced_from_the_new_spec() {
    let (world, events) = World::new(true);
    world.set_healthy("server-1", false);
    let h = Harness::start(config(2), world.clone(), events);
    // server-1 never answers; server-2 serves.
    h.until(SETTLE, "server-2 up", |h| {
        h.in_ring() == names(&["server-2"])
    })
    .await;
    world.set_healthy("server-1", true);
    h.until(SETTLE, "both up", |h| h.in_ring().len() == 2).await;
    world.set_healthy("server-1", false);
    reload(&h, with_env(config(2), "V", "2")).await;
    // server-1's replacement never gets ready while server-1 itself dies: it is replaced
    // from the current spec like any dead replica, and the roll goes on.
    world.kill("server-1").await;
    world.set_healthy("server-1", true);
    h.until(SETTLE, "rolled", |h| {
        h.world.spawned_specs("server-2").len() == 2 && h.in_ring().len() == 2
    })
    .await;
    let last = world
        .spawned_specs("server-1")
        .last()
        .cloned()
        .expect("a start");
    assert_eq!(last.0.env["V"], "2", "started from the new spec");
    h.until(SETTLE, "done", |h| {
        let s = h.world.spawned_specs("server-1").len();
        s >= 2 && h.in_ring().len() == 2
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn adopted_replicas_of_another_spec_are_rolled_and_those_of_this_one_kept() {
    let (world, events) = World::new(true);
    let c = config(2);
    let current = crate::provider::AppSpec::from_config(&c.provider).fingerprint();
    world.existing_with_spec(1, "server-1", &current);
    world.existing_with_spec(2, "server-2", "0123456789abcdef");
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "server-2 rolled", |h| {
        h.world.spawned_specs("server-2").len() == 1 && h.world.retired().len() == 1
    })
    .await;
    let roll = roll_state(&h).await;
    assert_eq!(roll["state"], "done", "{roll}");
    assert_eq!(roll["rolled"], serde_json::json!(["server-2"]));
    assert!(
        roll["reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 adopted replica(s) run another spec")),
        "{roll}"
    );
    assert!(world.spawned_specs("server-1").is_empty(), "kept as it is");
    assert!(
        world.spawned_specs("server-2")[0].1,
        "beside the adopted one"
    );
}

#[tokio::test(start_paused = true)]
async fn a_spec_edit_on_swarm_says_it_is_not_rolled() {
    let world = World::swarm();
    let h = Harness::start(config(2), world.clone(), world.subscribe());
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    reload(&h, with_env(config(2), "A", "1")).await;
    let mut roll = roll_state(&h).await;
    for _ in 0..100 {
        if roll["state"] == "stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        roll = roll_state(&h).await;
    }
    assert_eq!(roll["state"], "stopped", "{roll}");
    assert!(
        roll["stopped"]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("does not roll replicas in place")),
        "{roll}"
    );
    let e = h.handle.roll().await.expect_err("not on swarm");
    assert!(matches!(e, ControlError::Roll(_)), "{e:?}");
}

/// The counters the data plane keeps for replica `name` (the ones the controller reads).
fn stats_of(h: &Harness, name: &str) -> std::sync::Arc<crate::snapshot::ReplicaStats> {
    h.snapshot()
        .upstreams
        .iter()
        .flatten()
        .find(|u| u.name == name)
        .map(|u| u.stats.clone())
        .unwrap_or_else(|| panic!("{name} routed"))
}

#[tokio::test(start_paused = true)]
async fn autoscale_follows_in_flight_and_removes_the_least_loaded_replica() {
    use std::sync::atomic::Ordering::SeqCst;
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 1,
        max: 6,
        target_in_flight: 10.0,
        stable_window: Duration::from_secs(20),
        panic_window: Duration::from_secs(4),
        scale_down_delay: Duration::from_secs(30),
        max_step: 2,
        ..Default::default()
    };
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    // 50 requests in flight: five replicas' worth at 10 each, reached max_step at a time
    // within seconds (the panic window sees it first).
    let one = stats_of(&h, "server-1");
    one.in_flight.fetch_add(50, SeqCst);
    h.until(Duration::from_secs(8), "five members", |h| {
        h.snapshot().members.len() == 5
    })
    .await;
    h.until(SETTLE, "five in the ring", |h| h.in_ring().len() == 5)
        .await;
    let status = h.handle.status().await.expect("status");
    let a = &status["autoscale"];
    assert_eq!(a["desired"], 5, "{a}");
    assert_eq!(a["last_decision"]["direction"], "up", "{a}");
    assert_eq!(a["last_decision"]["to"], 5, "{a}");
    assert_eq!(a["last_decision"]["panic_in_flight"], 50.0, "{a}");
    // Load gone; every replica but server-2 keeps answering, so server-2's keys carried the
    // least: it goes first, not the newest (server-5).
    one.in_flight.fetch_sub(50, SeqCst);
    let load_gone = tokio::time::Instant::now();
    while h.snapshot().members.len() == 5 {
        assert!(load_gone.elapsed() < SETTLE * 2, "never scaled down");
        for name in h.in_ring() {
            if name != "server-2" {
                stats_of(&h, &name).record_response(200);
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        load_gone.elapsed() >= Duration::from_secs(30),
        "down before scale_down_delay: {:?}",
        load_gone.elapsed()
    );
    let members = h.snapshot().members.clone();
    assert!(!members.contains(&"server-2".to_string()), "{members:?}");
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["autoscale"]["last_decision"]["direction"], "down");
    // And on to min.
    h.until(SETTLE * 2, "one member", |h| {
        h.snapshot().members.len() == 1
    })
    .await;
    h.until(SETTLE, "the removed ones stopped", |h| {
        h.world.running().len() == 1
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn with_autoscale_on_add_and_rm_are_bounded_by_min_and_max() {
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.autoscale.enabled = true;
    c.autoscale.min = 2;
    c.autoscale.max = 3;
    let h = Harness::start(c, world, events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    let err = h.handle.add(scale(2, &[])).await.expect_err("above max");
    assert!(
        err.to_string().contains("more than autoscale.max (3)"),
        "{err}"
    );
    let err = h.handle.remove(scale(1, &[])).await.expect_err("below min");
    assert!(
        err.to_string().contains("fewer than autoscale.min (2)"),
        "{err}"
    );
    let added = h.handle.add(scale(1, &[])).await.expect("within bounds");
    assert_eq!(added.members.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn with_slow_start_the_autoscaler_stops_a_replica_slowly() {
    use std::sync::atomic::Ordering::SeqCst;
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.health.slow_start = Duration::from_secs(10);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 1,
        max: 3,
        target_in_flight: 10.0,
        stable_window: Duration::from_secs(10),
        panic_window: Duration::from_secs(2),
        scale_down_delay: Duration::from_secs(10),
        max_step: 1,
        ..Default::default()
    };
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    // Idle: after the delay, one replica goes, slowly.
    h.until(SETTLE, "N = 1", |h| h.snapshot().members.len() == 1)
        .await;
    let snap = h.snapshot();
    let retiring = snap
        .upstreams
        .iter()
        .flatten()
        .find(|u| !snap.members.contains(&u.name))
        .expect("the removed replica is still on the ring");
    let ramp = retiring.ramp.expect("handing its keys over");
    assert!(ramp.down, "{ramp:?}");
    let name = retiring.name.clone();
    assert!(world.running().contains(&name), "not stopped yet");
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["desired"], 1, "N fell at once");
    // A request in flight at it is waited for once its keys are handed over.
    retiring.stats.in_flight.fetch_add(1, SeqCst);
    let stats = retiring.stats.clone();
    h.until(Duration::from_secs(15), "off the ring", |h| {
        !h.in_ring().contains(&name)
    })
    .await;
    assert!(world.running().contains(&name), "draining its request");
    stats.in_flight.fetch_sub(1, SeqCst);
    h.until(SETTLE, "stopped", |h| !h.world.running().contains(&name))
        .await;
    assert_eq!(h.in_ring().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retiring_replica_that_dies_hands_its_keys_over_at_once() {
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.health.slow_start = Duration::from_secs(30);
    c.autoscale.enabled = true;
    c.autoscale.min = 1;
    c.autoscale.stable_window = Duration::from_secs(10);
    c.autoscale.panic_window = Duration::from_secs(2);
    c.autoscale.scale_down_delay = Duration::from_secs(10);
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    h.until(SETTLE, "N = 1", |h| h.snapshot().members.len() == 1)
        .await;
    let snap = h.snapshot();
    let name = snap
        .upstreams
        .iter()
        .flatten()
        .find(|u| !snap.members.contains(&u.name))
        .map(|u| u.name.clone())
        .expect("retiring, still on the ring");
    world.kill(&name).await;
    h.until(Duration::from_millis(50), "off the ring at once", |h| {
        !h.in_ring().contains(&name)
    })
    .await;
    h.until(SETTLE, "forgotten", |h| h.in_ring().len() == 1)
        .await;
    let status = h.handle.status().await.expect("status");
    assert_eq!(
        status["replicas"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(world.spawns_of(&name).len(), 1, "not replaced");
}

#[tokio::test(start_paused = true)]
async fn idle_scales_to_zero_asleep_and_a_wake_brings_one_replica_back() {
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 0,
        max: 3,
        idle_to_zero: Duration::from_secs(10),
        ..Default::default()
    };
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "two up", |h| h.in_ring().len() == 2).await;
    assert!(!h.snapshot().asleep);
    // No request for idle_to_zero: both go at once, and the snapshot says asleep.
    h.until(Duration::from_secs(12), "N = 0", |h| {
        h.snapshot().members.is_empty() && h.snapshot().asleep
    })
    .await;
    h.until(SETTLE, "both stopped", |h| h.world.running().is_empty())
        .await;
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["autoscale"]["scaled_to_zero"], true, "{status:#}");
    assert_eq!(status["autoscale"]["last_decision"]["to"], 0);
    // Nothing comes: it stays there.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.snapshot().members.is_empty() && h.snapshot().asleep);
    // A held request's hint: one replica starts, and once it serves the snapshot is awake.
    let published = h.snapshot().holds.clone();
    let notified = published.published.notified();
    h.handle.wake();
    h.until(SETTLE, "one serves", |h| h.in_ring().len() == 1)
        .await;
    tokio::time::timeout(SETTLE, notified)
        .await
        .expect("held requests are told of the publish");
    let snap = h.snapshot();
    assert!(!snap.asleep);
    assert_eq!(snap.members.len(), 1, "one replica, not the old two");
    let status = h.handle.status().await.expect("status");
    assert_eq!(status["autoscale"]["last_decision"]["direction"], "up");
    assert_eq!(status["autoscale"]["scaled_to_zero"], false);
}

#[tokio::test(start_paused = true)]
async fn replicas_down_are_not_asleep_and_a_wake_then_changes_nothing() {
    let (world, events) = World::new(true);
    let mut c = config(1);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 0,
        max: 3,
        idle_to_zero: Duration::from_secs(600),
        ..Default::default()
    };
    let h = Harness::start(c, world.clone(), events);
    h.until(SETTLE, "one up", |h| h.in_ring().len() == 1).await;
    world.set_healthy("server-1", false);
    h.until(SETTLE, "out of the ring", |h| h.in_ring().is_empty())
        .await;
    let snap = h.snapshot();
    assert!(!snap.asleep, "down is a 503, not a hold");
    h.handle.wake();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.snapshot().members.len(), 1, "a wake-up only from zero");
}

#[tokio::test(start_paused = true)]
async fn autoscale_turned_off_at_zero_brings_replicas_count_back() {
    let (world, events) = World::new(true);
    let mut c = config(2);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 0,
        max: 3,
        idle_to_zero: Duration::from_secs(5),
        ..Default::default()
    };
    let h = Harness::start(c.clone(), world, events);
    h.until(SETTLE, "N = 0", |h| {
        h.snapshot().members.is_empty() && h.snapshot().asleep
    })
    .await;
    c.autoscale.enabled = false;
    assert!(
        h.handle
            .send(super::Command::Reload {
                config: Box::new(c),
            })
            .await
    );
    h.until(SETTLE, "replicas.count serving", |h| h.in_ring().len() == 2)
        .await;
    assert!(!h.snapshot().asleep);
}

/// Two gateways sharing a ring with `[autoscale]` on: each publishes its own autoscaler's N
/// in the record; N follows the largest, and falls only when both propose less.
#[tokio::test(start_paused = true)]
async fn gateways_sharing_a_ring_agree_on_the_largest_proposal() {
    use std::sync::atomic::Ordering::SeqCst;
    let world = World::swarm();
    let mut c = config(1);
    c.autoscale = crate::config::AutoscaleConfig {
        enabled: true,
        min: 1,
        max: 6,
        target_in_flight: 10.0,
        stable_window: Duration::from_secs(20),
        panic_window: Duration::from_secs(4),
        scale_down_delay: Duration::from_secs(30),
        max_step: 2,
        ..Default::default()
    };
    let a = Harness::start_named(c.clone(), world.clone(), world.subscribe(), "gw-a");
    let b = Harness::start_named(c, world.clone(), world.subscribe(), "gw-b");
    a.until(SETTLE, "both route to one", |a| agree(a, &b, 1))
        .await;
    // A sees 50 in flight (5 replicas' worth), B 25 (3): N goes to A's 5, not B's 3, and
    // B's lower proposal never takes it back down.
    let on_a = stats_of(&a, "server-1");
    let on_b = stats_of(&b, "server-1");
    on_a.in_flight.fetch_add(50, SeqCst);
    on_b.in_flight.fetch_add(25, SeqCst);
    a.until(Duration::from_secs(20), "five members on both", |a| {
        agree(a, &b, 5)
    })
    .await;
    let record = world.record().get();
    let proposals: Vec<(String, u32)> = record
        .proposals
        .values()
        .map(|p| (p.gateway.split('/').next().unwrap_or("").to_owned(), p.n))
        .collect();
    assert_eq!(
        proposals,
        vec![("gw-a".into(), 5), ("gw-b".into(), 3)],
        "{record:?}"
    );
    let status = b.handle.status().await.expect("status");
    let agreement = &status["autoscale"]["agreement"];
    assert_eq!(agreement["agreed"], 5, "{agreement:#}");
    assert_eq!(agreement["proposals"].as_array().map(Vec::len), Some(2));
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(world.record().get().members.len(), 5, "nobody fights");
    }
    // A's load goes, B's stays: N falls, after A's delay, to B's 3 and no further. B's load
    // sits on one replica; if a scale-down takes that one, B's requests are on another.
    on_a.in_flight.fetch_sub(50, SeqCst);
    let gone = tokio::time::Instant::now();
    let mut on_b = on_b;
    let mut keep_b_loaded = |b: &Harness| {
        let carrier = b
            .snapshot()
            .upstreams
            .iter()
            .flatten()
            .any(|u| std::sync::Arc::ptr_eq(&u.stats, &on_b));
        if !carrier {
            on_b.in_flight.fetch_sub(25, SeqCst);
            let next = b.in_ring().into_iter().next().expect("a replica");
            on_b = stats_of(b, &next);
            on_b.in_flight.fetch_add(25, SeqCst);
        }
    };
    while !agree(&a, &b, 3) {
        assert!(gone.elapsed() < SETTLE * 4, "never fell to 3");
        keep_b_loaded(&b);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone.elapsed() >= Duration::from_secs(30),
        "down before scale_down_delay: {:?}",
        gone.elapsed()
    );
    for _ in 0..400 {
        keep_b_loaded(&b);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(a.snapshot().members.len(), 3, "B still asks for 3: N stays");
    }
    // Both agree on less: N falls to min.
    on_b.in_flight.fetch_sub(25, SeqCst);
    a.until(SETTLE * 4, "one member on both", |a| agree(a, &b, 1))
        .await;
    a.until(SETTLE, "the removed ones stopped", |a| {
        a.world.running().len() == 1
    })
    .await;
}
