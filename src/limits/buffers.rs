//! How much a connection reads at once: the quieter the proxy, the larger.
//!
//! Every read moves one frame through the proxy, and each frame costs a receive, a send and a
//! wake-up whatever its size, so large reads move a blob faster for less CPU. But hyper keeps a
//! connection's read buffer (and the frame in flight) for as long as the connection lives, so
//! large reads for every busy transfer would hold gigabytes. So a new stream's read size depends on how many streams
//! its side already has ([`CLASSES`]): a `docker push` or `docker pull` reads about 1 MiB at a
//! time, a few dozen concurrent transfers 56 KiB, more 16 KiB. A stream keeps its class for life,
//! and a class is only given while the side has at most its `until` streams, so no class ever
//! holds more than `until` streams and memory stays bounded whatever the load. Small reads also
//! share the CPU fairly between many streams. The measurements behind the classes are in
//! `docs/design.md` (Memory).
//! With more than 64 client connections open, an upstream stream counts them too: each can
//! start a transfer at any moment ([`Slots::start_with_open`]).
//!
//! The largest class also needs one of `--large-read-streams` slots, never waited for.
//!
//! Adaptive read sizes are ones hyper's buffer reaches without outgrowing them
//! ([`growth_size`]): 56 KiB rather than 64, 1016 rather than 1024.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How an HTTP/1 connection reads. The size is also the most a response head may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// Starting at 8 KiB and doubling while reads fill the buffer (hyper's adaptive reads).
    /// Also the most hyper queues to write: an upload's frames wait in the kernel, not here.
    UpTo(usize),
    /// Always this much: the buffer never grows past it. hyper then queues up to about 400 KiB
    /// to write (its default), so an exchange that sends a body reads [`Reads::sending`].
    Exactly(usize),
}

impl Reads {
    pub(crate) const fn max(self) -> usize {
        match self {
            Reads::UpTo(n) | Reads::Exactly(n) => n,
        }
    }

    /// How a connection of this class reads when its exchange sends a body: adaptively, at about
    /// the same size, so that hyper bounds its write queue to the read size instead of its much
    /// larger default. Only senders: adaptive reads hold more than exact ones for a burst of GETs.
    pub(crate) const fn sending(self) -> Reads {
        match self {
            Reads::UpTo(n) => Reads::UpTo(n),
            Reads::Exactly(n) => Reads::UpTo(growth_size(n)),
        }
    }
}

/// A read class: how a stream reads, and the most streams its side may have (the new one
/// included) for a new stream to get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Class {
    pub reads: Reads,
    pub until: usize,
}

/// hyper's first read buffer (its `INIT_BUFFER_SIZE`), from which adaptive reads double.
const FIRST_READ: usize = 8 << 10;

/// The smallest read size of at least `n` that hyper's adaptive reads reach without their buffer
/// growing past it: 8 KiB × (2^k − 1), so 8, 24, 56, 120 … 1016 KiB.
///
/// hyper grows a read buffer with `BytesMut::reserve` while the bytes it already handed out
/// still sit at the front of the allocation, and `bytes` then grows the allocation by that
/// front part too (8, then 24, 56, 120 KiB), keeping it for as long as the connection lives.
/// A connection reading up to 64 KiB so holds 120 KiB, one reading up to 1 MiB 2 MiB; reading
/// up to one of these sizes, it holds just that.
pub(crate) const fn growth_size(n: usize) -> usize {
    let n = if n > FIRST_READ { n } else { FIRST_READ };
    (n + FIRST_READ).next_power_of_two() - FIRST_READ
}

/// Read size of a stream holding a large-read slot: 1016 KiB, the growth size nearest 1 MiB.
pub(crate) const LARGE: usize = growth_size(1000 << 10);

/// The classes after the large one, from the largest. The last takes every stream beyond.
pub(crate) const CLASSES: [Class; 2] = [
    Class { reads: Reads::UpTo(growth_size(56 << 10)), until: 64 },
    Class { reads: Reads::Exactly(16 << 10), until: usize::MAX },
];

/// The large-read slots of one side of the proxy, and how many streams it has now. Cheap to
/// clone (shared).
#[derive(Debug, Clone)]
pub(crate) struct Slots {
    large: Arc<Semaphore>,
    count: usize,
    active: Arc<AtomicUsize>,
}

/// One stream (an exchange, or a client connection) for as long as it lives.
#[derive(Debug)]
pub(crate) struct Stream {
    /// 0: large (holding `slot`); `i + 1`: `CLASSES[i]`.
    class: usize,
    slot: Option<OwnedSemaphorePermit>,
    active: Arc<AtomicUsize>,
}

impl Slots {
    pub(crate) fn new(count: usize) -> Self {
        Slots { large: Arc::new(Semaphore::new(count)), count, active: Arc::new(AtomicUsize::new(0)) }
    }

    /// Every class of this side, from the largest: `1 + CLASSES.len()` of them.
    pub(crate) fn classes(&self) -> [Class; 1 + CLASSES.len()] {
        let [a, b] = CLASSES;
        [Class { reads: Reads::UpTo(LARGE), until: self.count }, a, b]
    }

    /// Counts a new stream and gives it the largest class the side's load allows.
    pub(crate) fn start(&self) -> Stream {
        self.start_with_open(0)
    }

    /// As [`Slots::start`], on a proxy with `open` client connections. Beyond the middle
    /// class's `until`, each of them counts as a stream about to start (any may send a request
    /// at once), so a burst on a thousand idle connections reads small from its first stream
    /// on, where its first few would otherwise take the larger classes and keep them. A docker
    /// push or pull (a handful of connections) is not affected.
    pub(crate) fn start_with_open(&self, open: usize) -> Stream {
        let active = self.active.fetch_add(1, Ordering::Relaxed) + 1;
        let load = if open > CLASSES[0].until { active.max(open) } else { active };
        let slot = if load <= self.count { self.large.clone().try_acquire_owned().ok() } else { None };
        let class = if slot.is_some() { 0 } else { 1 + CLASSES.iter().position(|c| load <= c.until).unwrap_or(0) };
        Stream { class, slot, active: self.active.clone() }
    }
}

impl Stream {
    /// Index into [`Slots::classes`].
    pub(crate) fn class(&self) -> usize {
        self.class
    }

    /// Whether this stream reads large.
    pub(crate) fn large(&self) -> bool {
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
        assert!(!c.large(), "a third stream reads smaller");
        assert_eq!(c.class(), 1);
        drop(a);
        // Two streams are active (b and c), so the side is not quiet: smaller, although a slot is free.
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
    fn the_busier_the_side_the_smaller_the_reads() {
        let slots = Slots::new(4);
        let classes = slots.classes();
        let streams: Vec<Stream> = (0..1000).map(|_| slots.start()).collect();
        let read_size = |i: usize| classes[streams[i].class()].reads.max();
        assert_eq!((read_size(0), read_size(3)), (LARGE, LARGE));
        assert_eq!((read_size(4), read_size(63)), (56 << 10, 56 << 10));
        assert_eq!((read_size(64), read_size(999)), (16 << 10, 16 << 10));
        // No class holds more streams than its `until`.
        for (k, class) in classes.iter().enumerate() {
            assert!(streams.iter().filter(|s| s.class() == k).count() <= class.until);
        }
        // Read sizes only shrink down the list, and the last class takes everything.
        assert!(classes.windows(2).all(|w| w[0].reads.max() >= w[1].reads.max() && w[0].until <= w[1].until));
        assert_eq!(classes.last().unwrap().until, usize::MAX);
    }

    #[test]
    fn many_open_connections_make_a_quiet_side_read_small() {
        // (streams already active, open client connections) -> class of the next stream
        let cases = [
            ((0, 0), 0),
            ((0, 5), 0),
            ((0, 64), 0),
            ((0, 65), 2),
            ((0, 1000), 2),
            ((3, 64), 0),
            ((10, 64), 1),
            ((10, 65), 2),
            ((70, 10), 2),
        ];
        for ((active, open), want) in cases {
            let slots = Slots::new(4);
            let held: Vec<Stream> = (0..active).map(|_| slots.start()).collect();
            let next = slots.start_with_open(open);
            assert_eq!(next.class(), want, "{active} active, {open} open");
            drop(held);
        }
    }

    #[test]
    fn growth_sizes() {
        // n -> the smallest size of at least n that adaptive reads reach exactly
        let cases = [
            (0, 8),
            (8, 8),
            (9, 24),
            (16, 24),
            (24, 24),
            (56, 56),
            (64, 120),
            (1000, 1016),
            (1016, 1016),
            (1024, 2040),
        ];
        for (n, want) in cases {
            assert_eq!(growth_size(n << 10), want << 10, "{n} KiB");
        }
        for class in Slots::new(1).classes() {
            for reads in [class.reads, class.reads.sending()] {
                if let Reads::UpTo(max) = reads {
                    assert_eq!(growth_size(max), max, "{class:?}");
                }
            }
        }
    }

    /// What `growth_size` is for, on the `bytes` crate hyper uses: hyper's adaptive read loop
    /// (reserve the next read size when the room left is less, read, double the size after a
    /// full read, up to a most, hand the bytes out) with a client that always has more to send.
    #[test]
    fn adaptive_reads_up_to_a_growth_size_keep_a_buffer_of_that_size() {
        fn allocation_after_reads_up_to(max: usize) -> usize {
            let mut buf = bytes::BytesMut::new();
            let mut next = FIRST_READ;
            let mut allocation = 0;
            for _ in 0..40 {
                if buf.capacity() - buf.len() < next {
                    buf.reserve(next);
                    // Once the size stops growing, `reserve` reclaims the whole allocation
                    // (the frames handed out are gone), so the capacity it leaves is all of it.
                    allocation = buf.capacity();
                }
                let read = next.min(buf.capacity() - buf.len());
                buf.resize(buf.len() + read, 7);
                if read >= next {
                    next = (next * 2).min(max);
                }
                drop(buf.split_to(read).freeze());
            }
            allocation
        }
        for kib in [8, 24, 56, 1016] {
            assert_eq!(allocation_after_reads_up_to(kib << 10), kib << 10, "{kib} KiB");
        }
        // The sizes between grow past themselves: these are why the classes avoid them.
        assert_eq!(allocation_after_reads_up_to(64 << 10), 120 << 10);
        assert_eq!(allocation_after_reads_up_to(1 << 20), 2040 << 10);
    }

    #[test]
    fn zero_slots_means_no_stream_reads_large() {
        let s = Slots::new(0).start();
        assert!(!s.large());
        assert_eq!(s.class(), 1);
    }
}
