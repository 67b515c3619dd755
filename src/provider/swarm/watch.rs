//! Watching the swarm: what the engine holds, turned into provider events as it changes.
//!
//! Owns: the one loop per gateway that looks at the ring record and our replicas' tasks
//! whenever the engine reports a change of a service or of one of our containers, and at
//! least every [`POLL`] (tasks on other nodes have no events here); it sends the record when
//! its version moved ([`ProviderEvent::Ring`]), what changed in the running tasks
//! ([`ProviderEvent::Running`], [`ProviderEvent::Exited`]), a container of ours dying the
//! moment the engine says so, and whether the engine answers ([`ProviderEvent::Engine`]).
//! Must not touch: decisions. The controller decides what each event means.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::EventsOptions;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::engine::Engine;
use super::spec::task_events;
use crate::provider::docker::LABEL_INSTANCE;
use crate::provider::{Instance, ProviderEvent};

/// The longest the gateway goes without looking at the engine.
pub const POLL: Duration = Duration::from_millis(500);
/// Event-stream reconnection back-off.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether an engine event may change what we observe: a service event (ours or not: service
/// events name no labels), or an event of one of our containers.
fn relevant(msg: &EventMessage, instance: &str) -> bool {
    match msg.typ {
        Some(EventMessageTypeEnum::SERVICE) => true,
        Some(EventMessageTypeEnum::CONTAINER) => msg
            .actor
            .as_ref()
            .and_then(|a| a.attributes.as_ref())
            .and_then(|a| a.get(LABEL_INSTANCE))
            .is_some_and(|i| i == instance),
        _ => false,
    }
}

/// A container of ours that died, as (service name, container id).
fn died(msg: &EventMessage) -> Option<(String, String)> {
    if msg.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = msg.action.as_deref()?;
    let actor = msg.actor.as_ref()?;
    let attrs = actor.attributes.as_ref()?;
    let fatal = match action {
        "die" | "oom" => true,
        "kill" => matches!(
            attrs.get("signal").map(String::as_str),
            Some("9" | "KILL" | "SIGKILL")
        ),
        _ => false,
    };
    if !fatal {
        return None;
    }
    Some((
        attrs.get("com.docker.swarm.service.name")?.clone(),
        actor.id.clone()?,
    ))
}

struct Watch {
    engine: Arc<Engine>,
    events: mpsc::Sender<ProviderEvent>,
    version: Option<u64>,
    running: BTreeMap<String, Instance>,
    reachable: Option<bool>,
}

impl Watch {
    async fn send(&self, event: ProviderEvent) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// One look at the engine; false once nobody listens.
    async fn refresh(&mut self) -> bool {
        let looked = async {
            let record = self.engine.read_record().await?;
            let running = self.engine.observe().await?;
            Ok::<_, crate::provider::ProviderError>((record, running))
        }
        .await;
        match looked {
            Ok((record, running)) => {
                if self.reachable != Some(true) {
                    self.reachable = Some(true);
                    if !self
                        .send(ProviderEvent::Engine {
                            reachable: true,
                            detail: String::new(),
                        })
                        .await
                    {
                        return false;
                    }
                }
                if self.version != Some(record.version) {
                    self.version = Some(record.version);
                    if !self.send(ProviderEvent::Ring(record)).await {
                        return false;
                    }
                }
                let changes = task_events(&self.running, &running);
                self.running = running;
                for e in changes {
                    if !self.send(e).await {
                        return false;
                    }
                }
                true
            }
            Err(e) => {
                if self.reachable != Some(false) {
                    tracing::warn!(error = %e, "the Swarm engine does not answer; routing on the last ring seen");
                    self.reachable = Some(false);
                    return self
                        .send(ProviderEvent::Engine {
                            reachable: false,
                            detail: e.to_string(),
                        })
                        .await;
                }
                true
            }
        }
    }

    /// A container of ours died: reported at once, before the task list says so.
    async fn on_death(&mut self, service: String, container: String) -> bool {
        let ours = self
            .running
            .get(&service)
            .is_some_and(|i| i.instance_id == container);
        if !ours {
            return true;
        }
        self.running.remove(&service);
        tracing::info!(replica = %service, "replica container died");
        self.send(ProviderEvent::Exited {
            hostname: service,
            instance_id: container,
            detail: "its container died".into(),
        })
        .await
    }
}

/// Follows the engine until nobody listens.
pub(super) async fn watch(engine: Arc<Engine>, events: mpsc::Sender<ProviderEvent>) {
    let instance = engine.settings.instance.clone();
    let filters = HashMap::from([(
        "type".to_owned(),
        vec!["service".to_owned(), "container".to_owned()],
    )]);
    let mut w = Watch {
        engine: engine.clone(),
        events,
        version: None,
        running: BTreeMap::new(),
        reachable: None,
    };
    let mut backoff = POLL;
    loop {
        let options = EventsOptions {
            since: None,
            until: None,
            filters: Some(filters.clone()),
        };
        let mut stream = engine.docker.events(Some(options));
        // What happened before the subscription is read here.
        if !w.refresh().await {
            return;
        }
        let mut tick = tokio::time::interval(POLL);
        let broke = loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(Ok(msg)) => {
                        backoff = POLL;
                        if let Some((service, container)) = died(&msg) {
                            if !w.on_death(service, container).await {
                                return;
                            }
                        }
                        if relevant(&msg, &instance) && !w.refresh().await {
                            return;
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the engine closed the event stream".to_owned(),
                },
                _ = tick.tick() => {
                    if !w.refresh().await {
                        return;
                    }
                }
            }
        };
        tracing::debug!(reason = %broke, retry_in = ?backoff, "Swarm event stream broke; polling until it is back");
        let until = tokio::time::Instant::now() + backoff;
        while tokio::time::Instant::now() < until {
            if !w.refresh().await {
                return;
            }
            tokio::time::sleep(POLL.min(until - tokio::time::Instant::now())).await;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    fn event(typ: EventMessageTypeEnum, action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(typ),
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("c1".into()),
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
    fn service_events_and_our_containers_events_trigger_a_look() {
        use EventMessageTypeEnum::*;
        assert!(relevant(&event(SERVICE, "update", &[("name", "x")]), "me"));
        assert!(relevant(
            &event(CONTAINER, "start", &[(LABEL_INSTANCE, "me")]),
            "me"
        ));
        assert!(!relevant(
            &event(CONTAINER, "start", &[(LABEL_INSTANCE, "other")]),
            "me"
        ));
        assert!(!relevant(&event(NETWORK, "connect", &[]), "me"));
    }

    #[test]
    fn a_fatal_container_event_names_its_service() {
        use EventMessageTypeEnum::*;
        let svc = ("com.docker.swarm.service.name", "S5");
        assert_eq!(
            died(&event(CONTAINER, "die", &[svc])),
            Some(("S5".into(), "c1".into()))
        );
        assert!(died(&event(CONTAINER, "kill", &[svc, ("signal", "9")])).is_some());
        assert!(died(&event(CONTAINER, "kill", &[svc, ("signal", "15")])).is_none());
        assert!(died(&event(CONTAINER, "start", &[svc])).is_none());
        assert!(died(&event(CONTAINER, "die", &[])).is_none(), "not a task");
        assert!(died(&event(SERVICE, "die", &[svc])).is_none());
    }
}
