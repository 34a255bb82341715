//! How much a connection reads at once: large reads for a few streams, small ones for the rest.
//!
//! Every read moves one frame through the proxy, and on loopback each frame costs a receive,
//! a send and a wake-up whatever its size: reading 1 MiB at a time moves a blob at about twice
//! the rate of 64 KiB reads, for half the CPU. But hyper keeps a connection's read buffer (and
//! the frame in flight) for as long as the connection lives, so a thousand busy transfers at
//! 1 MiB each would hold two gigabytes. So a fixed number of streams read large and the rest read
//! small, and memory stays bounded whatever the load:
//! `slots × 2 × LARGE + other streams × 2 × SMALL` at most.
//!
//! A stream reads large only if the proxy is quiet when it starts (at most `slots` streams on
//! its side, this one included) and a slot is free; it never waits for one. So a `docker push`
//! or `docker pull` gets large reads, and under a thousand concurrent transfers every stream
//! reads small and they share the CPU fairly (a large reader moves 64 times as many bytes per
//! turn as a small one).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Read size of a stream holding a slot.
pub const LARGE: usize = 1 << 20;

/// Read size of every other stream. Also the most an upstream response head may take.
pub const SMALL: usize = 16 << 10;

/// The large-read slots of one side of the proxy, and how many streams it has now. Cheap to
/// clone (shared).
#[derive(Debug, Clone)]
pub struct Slots {
    large: Arc<Semaphore>,
    count: usize,
    active: Arc<AtomicUsize>,
}

/// One stream (an exchange, or a client connection) for as long as it lives.
#[derive(Debug)]
pub struct Stream {
    slot: Option<OwnedSemaphorePermit>,
    active: Arc<AtomicUsize>,
}

impl Slots {
    pub fn new(count: usize) -> Self {
        Slots { large: Arc::new(Semaphore::new(count)), count, active: Arc::new(AtomicUsize::new(0)) }
    }

    /// Counts a new stream, with a large-read slot if the side is quiet and one is free.
    pub fn start(&self) -> Stream {
        let active = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = if active <= self.count { self.large.clone().try_acquire_owned().ok() } else { None };
        Stream { slot, active: self.active.clone() }
    }
}

impl Stream {
    /// Whether this stream reads large.
    pub fn large(&self) -> bool {
        self.slot.is_some()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_streams_of_a_quiet_side_read_large() {
        let slots = Slots::new(2);
        let a = slots.start();
        let b = slots.start();
        let c = slots.start();
        assert!(a.large() && b.large());
        assert!(!c.large(), "a third stream reads small");
        drop(a);
        // Two streams are active (b and c), so the side is not quiet: small, although a slot is free.
        let d = slots.start();
        assert!(!d.large());
        drop((c, d));
        let e = slots.start();
        assert!(e.large(), "quiet again: b and e");
        drop((b, e));
        assert_eq!(slots.active.load(Ordering::Relaxed), 0);
        assert_eq!(slots.large.available_permits(), 2);
    }

    #[test]
    fn zero_slots_means_every_stream_reads_small() {
        assert!(!Slots::new(0).start().large());
    }
}
