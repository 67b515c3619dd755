//! Idle connections held without a task: a kept-alive client connection that waits for its
//! next request costs its socket and a small record here, not a task, a future and a
//! registration with the runtime's reactor (about 2.5 KiB).
//!
//! Owns: [`Parking`], a table of one serving thread's held sockets (one per listener, and one
//! for idle tunnels), each with its deadline and whatever its owner needs to serve it again. A
//! record holds one socket or two (a tunnel's client and replica legs). They are watched for
//! readability through an epoll set of the table's own (`mio`), which the thread's runtime
//! watches as one descriptor; a record whose socket becomes readable (bytes, or a close)
//! leaves the table [`Leaving::Woken`], one whose deadline passes leaves it
//! [`Leaving::Expired`], and its owner may take one out by the [`Ticket`] it was held under
//! ([`Parking::take`]). Dropping the table closes every socket in it.
//! Must not touch: HTTP or tunnels (when a connection may be held, and what serving it again
//! means, are the HTTP/1 server's, the listener's and the tunnels'), the caps (a held
//! connection keeps its place under them: its owner's record holds it).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::time::{Instant, Sleep};

/// The most readiness events taken from the epoll set in one call.
const EVENTS: usize = 256;

/// A held socket, when its keep-alive ends, and what its owner keeps with it.
pub(crate) struct Held<T> {
    pub stream: TcpStream,
    /// A second socket watched with it (a tunnel's replica leg): either one wakes the record.
    pub also: Option<TcpStream>,
    pub deadline: Instant,
    pub rest: T,
}

/// What a record was held under: its key in the table and its number, so that a ticket kept
/// after its record left never takes the one held next under the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    key: usize,
    number: u64,
}

/// The epoll token of leg `leg` (0: `stream`, 1: `also`) of the record under `key`.
fn token(key: usize, leg: usize) -> Token {
    Token(key * 2 + leg)
}

/// Why a socket left the table.
pub(crate) enum Leaving<T> {
    /// Readable: bytes of a next request came, or the client closed it. No longer watched.
    Woken(Held<T>),
    /// Its deadline passed with nothing come.
    Expired(Held<T>),
}

/// One serving thread's held sockets.
///
/// Nothing here is allocated per socket: the table and the deadlines are two arrays, so that
/// the memory a connection's task used, freed when it is held, is not pinned by small records
/// of held connections between its pages and can go back to the system.
pub(crate) struct Parking<T> {
    /// The epoll set that watches the held sockets, itself watched by the runtime.
    poll: AsyncFd<Poll>,
    events: Events,
    /// The held sockets, each with the number it was held under (its deadline's entry).
    held: Slab<(u64, Held<T>)>,
    /// Deadlines, earliest first: (deadline, number held under, key into `held`). A socket that
    /// leaves early leaves its entry here, stale (the number no longer matches); they are
    /// dropped as they come up, and all at once when they outnumber the held sockets.
    deadlines: BinaryHeap<Reverse<(Instant, u64, usize)>>,
    /// The number the next socket is held under.
    next: u64,
    /// Fires at the earliest deadline (or later: it is moved only when it fires or an earlier
    /// deadline comes in).
    timer: Pin<Box<Sleep>>,
    armed: Instant,
}

impl<T> Parking<T> {
    pub fn new() -> io::Result<Parking<T>> {
        let poll = Poll::new()?;
        #[allow(unsafe_code)]
        // SAFETY: the epoll set's descriptor is owned by `poll`, which is moved into the
        // `AsyncFd` and never replaced or taken out of it: the descriptor stays open and the
        // same until the `AsyncFd` is dropped.
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }?;
        let armed = far_future();
        Ok(Parking {
            poll,
            events: Events::with_capacity(EVENTS),
            held: Slab::new(),
            deadlines: BinaryHeap::new(),
            next: 0,
            timer: Box::pin(tokio::time::sleep_until(armed)),
            armed,
        })
    }

    /// How many sockets are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Holds `held` until it becomes readable or its deadline passes; gives it back with the
    /// reason if it cannot be watched.
    pub fn hold(&mut self, held: Held<T>) -> Result<Ticket, (Held<T>, io::Error)> {
        let entry = self.held.vacant_entry();
        let key = entry.key();
        let registry = self.poll.get_ref().registry();
        // Edge-triggered, as mio registers: a socket already readable is reported at once.
        let watch = |leg: usize, stream: &TcpStream| {
            let fd = stream.as_raw_fd();
            registry.register(&mut SourceFd(&fd), token(key, leg), Interest::READABLE)
        };
        if let Err(e) = watch(0, &held.stream) {
            return Err((held, e));
        }
        if let Some(also) = &held.also {
            if let Err(e) = watch(1, also) {
                unwatch(registry, &held);
                return Err((held, e));
            }
        }
        let (deadline, number) = (held.deadline, self.next);
        self.next += 1;
        entry.insert((number, held));
        if self.deadlines.len() > 2 * self.held.len() + 64 {
            let live = self
                .held
                .iter()
                .map(|(k, (n, h))| Reverse((h.deadline, *n, k)));
            self.deadlines = live.collect();
        } else {
            self.deadlines.push(Reverse((deadline, number, key)));
        }
        if deadline < self.armed {
            self.timer.as_mut().reset(deadline);
            self.armed = deadline;
        }
        Ok(Ticket { key, number })
    }

    /// The record held under `ticket`, while it is held.
    pub fn get_mut(&mut self, ticket: Ticket) -> Option<&mut Held<T>> {
        match self.held.get_mut(ticket.key) {
            Some((number, held)) if *number == ticket.number => Some(held),
            _ => None,
        }
    }

    /// Takes the record held under `ticket` out of the table, no longer watched; `None` if it
    /// left already.
    pub fn take(&mut self, ticket: Ticket) -> Option<Held<T>> {
        self.get_mut(ticket)?;
        let (_, held) = self.held.remove(ticket.key);
        unwatch(self.poll.get_ref().registry(), &held);
        Some(held)
    }

    /// Waits until at least one socket leaves the table and puts those that left into `out`.
    /// Cancel-safe: what has left is in `out` as soon as it has left.
    pub async fn leaving(&mut self, out: &mut Vec<Leaving<T>>) {
        loop {
            tokio::select! {
                ready = self.poll.readable_mut() => {
                    let taken = ready.and_then(|mut guard| {
                        let (events, held) = (&mut self.events, &mut self.held);
                        let drained = take_woken(guard.get_inner_mut(), events, held, out)?;
                        if drained {
                            guard.clear_ready();
                        }
                        Ok(())
                    });
                    if let Err(e) = taken {
                        // The epoll set itself failed (never seen): nothing held can be
                        // watched any more, so every socket goes back to be served by a task
                        // (and the table is empty, so this is not met again and again).
                        tracing::warn!(error = %e, "the table of idle connections cannot be watched; serving them again");
                        self.deadlines.clear();
                        let registry = self.poll.get_ref().registry();
                        out.extend(self.held.drain().map(|(_, h)| {
                            unwatch(registry, &h);
                            Leaving::Woken(h)
                        }));
                    }
                }
                () = self.timer.as_mut() => {
                    let now = Instant::now();
                    while let Some(&Reverse((deadline, number, key))) = self.deadlines.peek() {
                        if deadline > now {
                            break;
                        }
                        self.deadlines.pop();
                        if let Some(held) = self.take(Ticket { key, number }) {
                            out.push(Leaving::Expired(held));
                        }
                    }
                    let next = self.deadlines.peek().map_or_else(far_future, |Reverse((d, _, _))| *d);
                    self.timer.as_mut().reset(next);
                    self.armed = next;
                }
            }
            if !out.is_empty() {
                return;
            }
        }
    }
}

/// Takes the sockets the epoll set reports readable out of the table into `out`; `true` if it
/// reported all it had (its readiness can be cleared).
fn take_woken<T>(
    poll: &mut Poll,
    events: &mut Events,
    held: &mut Slab<(u64, Held<T>)>,
    out: &mut Vec<Leaving<T>>,
) -> io::Result<bool> {
    loop {
        match poll.poll(events, Some(Duration::ZERO)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        let mut reported = 0;
        for event in events.iter() {
            reported += 1;
            let Token(token) = event.token();
            // Both legs of a record may be reported: the first takes it, the second finds
            // nothing.
            let Some((_, woken)) = held.try_remove(token / 2) else {
                continue;
            };
            unwatch(poll.registry(), &woken);
            out.push(Leaving::Woken(woken));
        }
        if reported < EVENTS {
            return Ok(true);
        }
    }
}

/// Takes `held`'s sockets out of the epoll set: its owner registers them with the runtime next,
/// and they must not be watched twice.
fn unwatch<T>(registry: &mio::Registry, held: &Held<T>) {
    for stream in std::iter::once(&held.stream).chain(&held.also) {
        let fd = stream.as_raw_fd();
        if let Err(e) = registry.deregister(&mut SourceFd(&fd)) {
            tracing::debug!(error = %e, "an idle connection could not be unwatched");
        }
    }
}

/// Later than any deadline (about 30 years).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        (client, server)
    }

    async fn next(parking: &mut Parking<u32>) -> Vec<Leaving<u32>> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), parking.leaving(&mut out))
            .await
            .expect("something left within 5 s");
        out
    }

    #[tokio::test]
    async fn a_held_socket_leaves_when_its_client_writes_and_the_others_stay() {
        let mut parking = Parking::new().expect("epoll");
        let mut clients = Vec::new();
        for n in 0..3 {
            let (client, server) = pair();
            let deadline = Instant::now() + Duration::from_secs(60);
            let held = Held {
                stream: server,
                also: None,
                deadline,
                rest: n,
            };
            assert!(parking.hold(held).is_ok());
            clients.push(client);
        }
        assert_eq!(parking.len(), 3);
        clients[1].write_all(b"GET").expect("write");
        let left = next(&mut parking).await;
        assert_eq!(left.len(), 1);
        assert!(matches!(&left[0], Leaving::Woken(h) if h.rest == 1));
        assert_eq!(parking.len(), 2);
        // A close wakes too: the owner finds out by reading.
        drop(clients.remove(0));
        let left = next(&mut parking).await;
        assert!(matches!(&left[..], [Leaving::Woken(h)] if h.rest == 0));
        assert_eq!(parking.len(), 1);
    }

    #[tokio::test]
    async fn a_socket_readable_before_it_is_held_leaves_at_once() {
        let mut parking = Parking::new().expect("epoll");
        let (mut client, server) = pair();
        client.write_all(b"GET").expect("write");
        std::thread::sleep(Duration::from_millis(50));
        let held = Held {
            stream: server,
            also: None,
            deadline: Instant::now() + Duration::from_secs(60),
            rest: 7,
        };
        assert!(parking.hold(held).is_ok());
        let left = next(&mut parking).await;
        assert!(matches!(&left[..], [Leaving::Woken(h)] if h.rest == 7));
    }

    #[tokio::test]
    async fn held_sockets_expire_in_deadline_order_whatever_order_they_came_in() {
        let mut parking = Parking::new().expect("epoll");
        let now = Instant::now();
        let mut clients = Vec::new();
        for (n, ms) in [(0, 400), (1, 100), (2, 250)] {
            let (client, server) = pair();
            let held = Held {
                stream: server,
                also: None,
                deadline: now + Duration::from_millis(ms),
                rest: n,
            };
            assert!(parking.hold(held).is_ok());
            clients.push(client);
        }
        let mut order = Vec::new();
        while order.len() < 3 {
            for leaving in next(&mut parking).await {
                match leaving {
                    Leaving::Expired(h) => {
                        assert!(Instant::now() >= h.deadline, "not before its deadline");
                        order.push(h.rest);
                    }
                    Leaving::Woken(h) => panic!("{} woke with nothing sent", h.rest),
                }
            }
        }
        assert_eq!(order, [1, 2, 0]);
        assert_eq!(parking.len(), 0);
    }

    #[tokio::test]
    async fn a_socket_that_left_early_never_expires_the_one_held_after_it_under_its_key() {
        let mut parking = Parking::new().expect("epoll");
        let now = Instant::now();
        // Held with a near deadline, woken before it: its deadline's entry stays, stale.
        for round in 0..300 {
            let (mut client, server) = pair();
            let held = Held {
                stream: server,
                also: None,
                deadline: now + Duration::from_millis(300),
                rest: round,
            };
            assert!(parking.hold(held).is_ok());
            client.write_all(b"x").expect("write");
            let left = next(&mut parking).await;
            assert!(matches!(&left[..], [Leaving::Woken(h)] if h.rest == round));
        }
        assert!(
            parking.deadlines.len() <= 2 * parking.len() + 65,
            "stale deadlines are dropped: {}",
            parking.deadlines.len()
        );
        // The same key again, held for longer: the stale deadlines do not close it.
        let (_client, server) = pair();
        let held = Held {
            stream: server,
            also: None,
            deadline: now + Duration::from_millis(900),
            rest: 1000,
        };
        assert!(parking.hold(held).is_ok());
        let left = next(&mut parking).await;
        match &left[..] {
            [Leaving::Expired(h)] => {
                assert_eq!(h.rest, 1000);
                assert!(Instant::now() >= now + Duration::from_millis(900));
            }
            _ => panic!("only the last one expires, at its own deadline"),
        }
    }

    #[tokio::test]
    async fn many_ready_at_once_all_leave() {
        let mut parking = Parking::new().expect("epoll");
        let mut clients = Vec::new();
        let count = EVENTS as u32 * 2 + 5;
        for n in 0..count {
            let (client, server) = pair();
            let held = Held {
                stream: server,
                also: None,
                deadline: Instant::now() + Duration::from_secs(60),
                rest: n,
            };
            assert!(parking.hold(held).is_ok());
            clients.push(client);
        }
        for client in &mut clients {
            client.write_all(b"x").expect("write");
        }
        let mut woken = 0;
        while woken < count {
            woken += next(&mut parking).await.len() as u32;
        }
        assert_eq!(parking.len(), 0);
    }
}
