//! The engine's event stream: a replica container's death reported the moment it happens.
//!
//! Owns: following (and re-following) the event stream for our instance's containers, turning
//! `die`/`oom`/`kill -9`/`stop` into one [`ProviderEvent::Exited`] per container, and the set of
//! containers already reported (or being removed by us, whose death is no news).
//! Must not touch: containers (it only reads events), health or routing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{short, LABEL_INSTANCE, LABEL_MANAGED};
use crate::provider::ProviderEvent;

/// Event-stream reconnection back-off.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How many container ids we remember as already reported (events come in bursts per
/// container: kill, die, stop).
const REPORTED_MEMORY: usize = 1024;

/// Containers we already reported dead, or are removing ourselves: their further events are
/// not news.
#[derive(Default)]
pub(super) struct Reported {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Reported {
    /// Remembers `id`; returns false when it was already known.
    pub(super) fn insert(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > REPORTED_MEMORY {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

pub(super) type SharedReported = Arc<Mutex<Reported>>;

pub(super) use crate::sync::lock;

fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Turns one engine event into an `Exited` report, if it means the replica is gone.
///
/// `die` and `oom` always do. `kill` does only for SIGKILL, which cannot be caught (other
/// signals may be handled; their `die` follows if they are fatal). `stop` comes after `die`
/// and is caught by the de-duplication unless the `die` was missed.
fn exit_of(msg: &EventMessage) -> Option<(String, String, String)> {
    let action = msg.action.as_deref()?;
    let actor = msg.actor.as_ref()?;
    let id = actor.id.clone()?;
    let attrs = actor.attributes.as_ref();
    let attr = |k: &str| attrs.and_then(|a| a.get(k)).cloned();
    // The replica's hostname: its label (a roll's replacement runs under another name for a
    // moment), else the container's name.
    let name = attr(super::LABEL_HOSTNAME).or_else(|| attr("name"))?;
    let detail = match action {
        "die" => format!(
            "container died (exit code {})",
            attr("exitCode").unwrap_or_else(|| "?".into())
        ),
        "oom" => "container ran out of memory".to_owned(),
        "stop" => "container stopped".to_owned(),
        "kill" => {
            let signal = attr("signal").unwrap_or_default();
            if !matches!(signal.as_str(), "9" | "KILL" | "SIGKILL") {
                return None;
            }
            "container killed (SIGKILL)".to_owned()
        }
        _ => return None,
    };
    Some((name, id, detail))
}

/// Follows the engine's event stream for our containers and reports deaths; reconnects with
/// back-off when the stream breaks, replaying what was missed (`since`).
pub(super) async fn watch_events(
    docker: Docker,
    instance: String,
    reported: SharedReported,
    events: mpsc::Sender<ProviderEvent>,
) {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "label".to_owned(),
            vec![
                format!("{LABEL_MANAGED}=true"),
                format!("{LABEL_INSTANCE}={instance}"),
            ],
        ),
        (
            "event".to_owned(),
            ["die", "kill", "oom", "stop"].map(String::from).to_vec(),
        ),
    ]);
    // Start a little in the past so that nothing between `connect` and the subscription being
    // in place is missed; replays are de-duplicated.
    let mut since = unix_now_secs() - 1.0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let options = EventsOptions {
            since: Some(format!("{since:.9}")),
            until: None,
            filters: Some(filters.clone()),
        };
        let mut stream = docker.events(Some(options));
        let reason = loop {
            match stream.next().await {
                None => break "the engine closed the event stream".to_owned(),
                Some(Err(e)) => break e.to_string(),
                Some(Ok(msg)) => {
                    backoff = BACKOFF_MIN;
                    if let Some(t) = msg.time_nano {
                        since = since.max(t as f64 / 1e9);
                    }
                    let Some((hostname, instance_id, detail)) = exit_of(&msg) else {
                        continue;
                    };
                    if !lock(&reported).insert(&instance_id) {
                        continue;
                    }
                    tracing::info!(replica = %hostname, container = %short(&instance_id), %detail, "replica container exited");
                    let event = ProviderEvent::Exited {
                        hostname,
                        instance_id,
                        detail,
                    };
                    if events.send(event).await.is_err() {
                        // Nobody listens any more: the gateway is stopping.
                        return;
                    }
                }
            }
        };
        if events.is_closed() {
            return;
        }
        tracing::warn!(%reason, retry_in = ?backoff, "Docker event stream broke; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn event(action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: Some(
                    attrs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn deaths_are_recognised() {
        let die = exit_of(&event("die", &[("name", "s1"), ("exitCode", "137")])).expect("die");
        assert_eq!((die.0.as_str(), die.1.as_str()), ("s1", "abc"));
        assert!(die.2.contains("137"), "{}", die.2);
        assert!(exit_of(&event("kill", &[("name", "s1"), ("signal", "9")])).is_some());
        assert!(exit_of(&event("kill", &[("name", "s1"), ("signal", "15")])).is_none());
        assert!(exit_of(&event("oom", &[("name", "s1")])).is_some());
        assert!(exit_of(&event("start", &[("name", "s1")])).is_none());
        assert!(exit_of(&event("die", &[])).is_none(), "no name, no report");
        let replacement = exit_of(&event(
            "die",
            &[("name", "s1.0a1b2c"), ("ringgate.hostname", "s1")],
        ))
        .expect("die");
        assert_eq!(replacement.0, "s1", "named by its hostname label");
    }

    #[test]
    fn reported_ids_are_remembered_and_bounded() {
        let mut r = Reported::default();
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        for i in 0..REPORTED_MEMORY {
            r.insert(&i.to_string());
        }
        assert!(r.insert("a"), "the oldest id was forgotten");
        assert!(r.ids.len() <= REPORTED_MEMORY);
    }
}
