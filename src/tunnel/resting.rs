//! Idle tunnels held without a task: a tunnel that carried nothing for `[tunnels] rest_after`
//! costs its two sockets and a record in its serving thread's table, not a task, a future, two
//! registrations with the runtime's reactor and a timer (about 1.7 KiB).
//!
//! Owns: [`Table`], one serving thread's resting tunnels, and [`Door`], how that thread's
//! tunnel tasks hand theirs in. A record is given a task again ([`Rest::wake`]) when either of
//! its sockets becomes readable (bytes, or a close), when the gateway closes it (re-homing, a
//! drain: its [`Registration`] hears it for the table and sends the record's ticket, so that a
//! close wakes exactly that tunnel), or when its idle deadline passes; the task it gets finds
//! out which.
//! Must not touch: what a tunnel holds or how it resumes (its owner's: [`Rest`]), the bytes.

use tokio::sync::mpsc;

use super::Registration;
use crate::parking::{Held, Leaving, Parking, Ticket};

/// What a resting tunnel's owner keeps in its record.
pub trait Rest: Send + Sized + 'static {
    /// Where the gateway's close of the tunnel is heard.
    fn registration(&mut self) -> &mut Registration;
    /// Gives the tunnel a task again (readable, closed, or past its deadline); on this thread's
    /// runtime.
    fn wake(held: Held<Self>);
}

/// Where a serving thread's tunnels hand themselves in to rest.
pub type Door<T> = mpsc::UnboundedSender<Held<T>>;

/// One serving thread's resting tunnels.
pub struct Table<T> {
    parking: Parking<T>,
    incoming: mpsc::UnboundedReceiver<Held<T>>,
    /// The tickets of records whose close came, sent by their registrations.
    closed: mpsc::UnboundedReceiver<Ticket>,
    closes: mpsc::UnboundedSender<Ticket>,
}

impl<T: Rest> Table<T> {
    /// A table and its door; an error if its epoll set cannot be made (the tunnels then keep
    /// their tasks).
    pub fn new() -> std::io::Result<(Door<T>, Table<T>)> {
        let parking = Parking::new()?;
        let (door, incoming) = mpsc::unbounded_channel();
        let (closes, closed) = mpsc::unbounded_channel();
        let table = Table {
            parking,
            incoming,
            closed,
            closes,
        };
        Ok((door, table))
    }

    /// Holds the tunnels handed in and gives them tasks again as they wake, until every door
    /// is dropped; then the tunnels still resting are closed with the table.
    pub async fn run(mut self) {
        let mut leaving = Vec::new();
        loop {
            tokio::select! {
                held = self.incoming.recv() => match held {
                    Some(held) => self.hold(held),
                    None => return,
                },
                Some(ticket) = self.closed.recv() => {
                    if let Some(held) = self.parking.take(ticket) {
                        T::wake(held);
                    }
                }
                () = self.parking.leaving(&mut leaving) => {
                    for gone in leaving.drain(..) {
                        match gone {
                            Leaving::Woken(held) | Leaving::Expired(held) => T::wake(held),
                        }
                    }
                }
            }
        }
    }

    /// Holds `held`; a tunnel that cannot be watched, or whose close came meanwhile, is given a
    /// task again at once.
    fn hold(&mut self, held: Held<T>) {
        let ticket = match self.parking.hold(held) {
            Ok(ticket) => ticket,
            Err((held, e)) => {
                tracing::debug!(error = %e, "an idle tunnel could not be held; it keeps a task");
                return T::wake(held);
            }
        };
        let Some(held) = self.parking.get_mut(ticket) else {
            return;
        };
        if held
            .rest
            .registration()
            .rest(&self.closes, ticket)
            .is_some()
        {
            if let Some(held) = self.parking.take(ticket) {
                T::wake(held);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::testing::{registered, Teller};
    use crate::tunnel::Close;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::task::Poll;
    use std::task::{Context, Waker};
    use std::time::Duration;
    use tokio::time::Instant;

    /// A record that, woken, reports its number and the close it heard.
    struct Probe {
        n: u32,
        registration: Registration,
        woke: mpsc::UnboundedSender<(u32, Option<Close>, bool)>,
    }

    impl Rest for Probe {
        fn registration(&mut self) -> &mut Registration {
            &mut self.registration
        }

        fn wake(held: Held<Self>) {
            let expired = Instant::now() >= held.deadline;
            let Probe {
                n,
                mut registration,
                woke,
            } = held.rest;
            // As the task it would get: whether its close came is asked of its registration.
            let heard = match registration.poll_closed(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(why) => Some(why),
                Poll::Pending => None,
            };
            let _ = woke.send((n, heard, expired));
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        (client, server)
    }

    /// A resting tunnel: the far ends of its client and replica legs, and its close.
    struct Tunnel {
        client: TcpStream,
        replica: TcpStream,
        close: Teller,
    }

    fn hand_in(
        door: &Door<Probe>,
        n: u32,
        deadline: Instant,
        woke: &mpsc::UnboundedSender<(u32, Option<Close>, bool)>,
    ) -> Tunnel {
        let (client, client_leg) = pair();
        let (replica, replica_leg) = pair();
        let (registration, close) = registered();
        let held = Held {
            stream: client_leg,
            also: Some(replica_leg),
            deadline,
            rest: Probe {
                n,
                registration,
                woke: woke.clone(),
            },
        };
        assert!(door.send(held).is_ok());
        Tunnel {
            client,
            replica,
            close,
        }
    }

    async fn next(
        woken: &mut mpsc::UnboundedReceiver<(u32, Option<Close>, bool)>,
    ) -> (u32, Option<Close>, bool) {
        tokio::time::timeout(Duration::from_secs(5), woken.recv())
            .await
            .expect("woken within 5 s")
            .expect("the table runs")
    }

    #[tokio::test]
    async fn each_resting_tunnel_wakes_alone_by_its_client_its_replica_its_close_or_its_deadline() {
        let (door, table) = Table::<Probe>::new().expect("epoll");
        let running = tokio::spawn(table.run());
        let (woke, mut woken) = mpsc::unbounded_channel();
        let later = Instant::now() + Duration::from_secs(60);
        let mut tunnels: Vec<Tunnel> = (0..4).map(|n| hand_in(&door, n, later, &woke)).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;

        tunnels[1].client.write_all(b"x").expect("write");
        assert_eq!(next(&mut woken).await, (1, None, false), "its client wrote");
        tunnels[2].replica.write_all(b"y").expect("write");
        assert_eq!(
            next(&mut woken).await,
            (2, None, false),
            "its replica wrote"
        );
        let Tunnel { close, .. } = tunnels.remove(3);
        assert!(close.tell(Close::Shutdown), "resting");
        assert_eq!(
            next(&mut woken).await,
            (3, Some(Close::Shutdown), false),
            "its close came, and is there for its task"
        );
        let soon = hand_in(&door, 4, Instant::now() + Duration::from_millis(200), &woke);
        assert_eq!(
            next(&mut woken).await,
            (4, None, true),
            "its deadline passed"
        );
        drop(soon);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(woken.try_recv().is_err(), "tunnel 0 rests on");
        drop((door, tunnels));
        tokio::time::timeout(Duration::from_secs(5), running)
            .await
            .expect("the table ends with its doors")
            .expect("joined");
    }

    #[tokio::test]
    async fn a_tunnel_whose_close_came_before_it_rested_is_woken_at_once() {
        let (door, table) = Table::<Probe>::new().expect("epoll");
        let running = tokio::spawn(table.run());
        let (woke, mut woken) = mpsc::unbounded_channel();
        let (client, client_leg) = pair();
        let (replica, replica_leg) = pair();
        let (registration, close) = registered();
        assert!(close.tell(Close::Shutdown), "open");
        let held = Held {
            stream: client_leg,
            also: Some(replica_leg),
            deadline: Instant::now() + Duration::from_secs(60),
            rest: Probe {
                n: 9,
                registration,
                woke,
            },
        };
        assert!(door.send(held).is_ok());
        assert_eq!(next(&mut woken).await, (9, Some(Close::Shutdown), false));
        drop((door, client, replica));
        running.await.expect("joined");
    }
}
