//! Spreading client connections evenly over the serving threads.
//!
//! Each serving thread accepts on its own `SO_REUSEPORT` socket, and the kernel picks the socket
//! by a hash of the connection's addresses: 64 connections come out 36/28 or 41/23 (measured),
//! and a handful of long-lived ones (another proxy in front, HTTP/2 clients) can all land on one
//! thread and leave the other CPUs idle. So a thread that accepts a connection while it serves
//! more than another thread hands it over to the least busy one, which serves it from then on
//! (the connection, its requests and their upstream connections stay on that thread). As with
//! HAProxy's choice of a thread at accept, or Envoy's exact connection balance.
//!
//! Owns: the open-connection count of each serving thread ([`ThreadLoad`]), the choice of a
//! thread ([`pick`], pure), and the hand-over channels ([`Spread`], one per listening address).
//! Must not touch: what a connection is served with (the listener) or admission (the caps are
//! checked once, before a connection is handed anywhere).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::admission::Admitted;

/// The thread that should serve a new connection accepted by thread `own`: the one with the
/// fewest open connections, `own` itself on a tie (a hand-over costs a wake-up of another thread
/// and a re-registration of the socket, so it is made only when it evens something out).
pub fn pick(own: usize, open: &[usize]) -> usize {
    let Some(&least) = open.iter().min() else {
        return own;
    };
    if open.get(own).is_none_or(|&o| o <= least) {
        return own;
    }
    open.iter().position(|&o| o == least).unwrap_or(own)
}

/// Open client connections per serving thread, over all its listeners.
#[derive(Debug)]
pub struct ThreadLoad {
    open: Vec<AtomicUsize>,
}

impl ThreadLoad {
    pub fn new(threads: usize) -> ThreadLoad {
        ThreadLoad {
            open: (0..threads.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Open connections of each thread now.
    pub fn open(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .collect()
    }

    /// Counts a connection on thread `index` until the returned guard is dropped.
    fn count(self: &Arc<Self>, index: usize) -> Counted {
        if let Some(o) = self.open.get(index) {
            o.fetch_add(1, Ordering::Relaxed);
        }
        Counted {
            load: self.clone(),
            index,
        }
    }
}

/// A connection counted on its thread for as long as it lives.
#[derive(Debug)]
pub struct Counted {
    load: Arc<ThreadLoad>,
    index: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(o) = self.load.open.get(self.index) {
            o.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A connection handed to another thread: the socket out of the accepting thread's reactor, and
/// what the accept found out about it.
pub struct Handed {
    pub stream: std::net::TcpStream,
    pub client: SocketAddr,
    pub admitted: Admitted,
    pub counted: Counted,
}

/// The hand-over channels of one listening address: one inbox per serving thread.
pub struct Spread {
    load: Arc<ThreadLoad>,
    inboxes: Vec<mpsc::UnboundedSender<Handed>>,
}

/// What one serving thread's listener on an address gets: its index, its inbox, and the way to
/// the others.
pub struct Slot {
    pub index: usize,
    pub inbox: mpsc::UnboundedReceiver<Handed>,
    spread: Arc<Spread>,
}

/// Where an accepted connection goes.
pub enum Placed {
    /// Served by the accepting thread, counted on it.
    Here(tokio::net::TcpStream, Admitted, Counted),
    /// Handed to another thread's inbox.
    HandedOver,
    /// Lost on the way: the socket could not leave this thread's reactor, or the other thread
    /// has stopped (it was shutting down). The connection is closed.
    Lost,
}

impl Spread {
    /// The slots of `threads` serving threads over `load`, in thread order.
    pub fn slots(threads: usize, load: &Arc<ThreadLoad>) -> Vec<Slot> {
        let (inboxes, receivers): (Vec<_>, Vec<_>) = (0..threads.max(1))
            .map(|_| mpsc::unbounded_channel())
            .unzip();
        let spread = Arc::new(Spread {
            load: load.clone(),
            inboxes,
        });
        receivers
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| Slot {
                index,
                inbox,
                spread: spread.clone(),
            })
            .collect()
    }
}

impl Slot {
    /// Places a connection this thread accepted: here, or on the least busy thread.
    pub fn place(
        &self,
        stream: tokio::net::TcpStream,
        client: SocketAddr,
        admitted: Admitted,
    ) -> Placed {
        let spread = &self.spread;
        let target = pick(self.index, &spread.load.open());
        let counted = spread.load.count(target);
        let Some(inbox) = spread.inboxes.get(target).filter(|_| target != self.index) else {
            return Placed::Here(stream, admitted, counted);
        };
        let Ok(stream) = stream.into_std() else {
            return Placed::Lost;
        };
        let handed = Handed {
            stream,
            client,
            admitted,
            counted,
        };
        match inbox.send(handed) {
            Ok(()) => Placed::HandedOver,
            Err(_) => Placed::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_to_the_least_busy_thread() {
        assert_eq!(pick(0, &[3, 1, 2]), 1);
        assert_eq!(pick(2, &[0, 5, 9]), 0);
    }

    #[test]
    fn the_accepting_thread_keeps_it_on_a_tie() {
        assert_eq!(pick(1, &[2, 2, 3]), 1, "tied with the least: no hand-over");
        assert_eq!(pick(0, &[0, 0]), 0);
        assert_eq!(pick(1, &[4, 4]), 1);
    }

    #[test]
    fn nothing_to_choose_from_keeps_it_here() {
        assert_eq!(pick(0, &[]), 0);
        assert_eq!(pick(3, &[1, 0]), 3, "an index past the counts: here");
        assert_eq!(pick(0, &[7]), 0);
    }

    #[test]
    fn the_counts_follow_the_guards() {
        let load = Arc::new(ThreadLoad::new(2));
        let a = load.count(0);
        let b = load.count(1);
        let c = load.count(1);
        assert_eq!(load.open(), vec![1, 2]);
        drop(b);
        drop(a);
        assert_eq!(load.open(), vec![0, 1]);
        drop(c);
        assert_eq!(load.open(), vec![0, 0]);
    }
}
