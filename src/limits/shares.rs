//! Admission slots divided among the event loops.
//!
//! A connection stays on the loop it was dealt (see [`crate::wire::loops`]). With one line for
//! all loops the holders drift: a loop holding more slots moves each of its transfers more
//! slowly, yet frees slots no faster than one holding few, and a freed slot goes to whoever
//! waited longest, on either loop. So the holders wander to one loop, which is then saturated
//! while another idles. With a share each, every loop that has the demand streams its share.
//! Fewer slots than loops are one line for all, so `--upload-slots 1` still means one.

use std::sync::Arc;

use crate::limits::admission::Admission;
use crate::metrics::Metrics;

/// The slots of one kind (uploads or downloads), one [`Admission`] per loop.
pub(crate) struct Shares(Box<[Arc<Admission>]>);

impl Shares {
    /// `slots` at a time, divided among `loops` event loops; `kind` makes one share's
    /// admission ([`Admission::uploads`] or [`Admission::downloads`]).
    pub(crate) fn new(
        slots: usize,
        loops: usize,
        kind: fn(usize, &Metrics) -> Arc<Admission>,
        metrics: &Metrics,
    ) -> Shares {
        Shares(split(slots, loops).into_iter().map(|share| kind(share, metrics)).collect())
    }

    /// The slots that a connection on loop `on_loop` waits for.
    pub(crate) fn of_loop(&self, on_loop: usize) -> &Arc<Admission> {
        &self.0[on_loop % self.0.len()]
    }
}

/// Each loop's share of `slots`: as even as whole slots allow, or one share for all when there
/// are fewer slots than loops.
fn split(slots: usize, loops: usize) -> Vec<usize> {
    let loops = loops.max(1);
    if slots < loops {
        return vec![slots];
    }
    (0..loops).map(|i| slots / loops + usize::from(i < slots % loops)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_split_evenly_or_shared() {
        let cases: &[(usize, usize, &[usize])] = &[
            (64, 1, &[64]),
            (64, 2, &[32, 32]),
            (65, 2, &[33, 32]),
            (10, 4, &[3, 3, 2, 2]),
            (2, 2, &[1, 1]),
            // Fewer slots than loops: one line for all.
            (1, 2, &[1]),
            (3, 8, &[3]),
            (5, 0, &[5]),
        ];
        for &(slots, loops, expected) in cases {
            assert_eq!(split(slots, loops), expected, "{slots} slots, {loops} loops");
            assert_eq!(split(slots, loops).iter().sum::<usize>(), slots, "{slots} slots, {loops} loops: none lost");
        }
    }

    #[test]
    fn a_loop_waits_for_its_own_share() {
        let metrics = Metrics::new(0);
        let shares = Shares::new(4, 2, Admission::downloads, &metrics);
        assert!(!std::ptr::eq(shares.of_loop(0), shares.of_loop(1)));
        assert!(std::ptr::eq(shares.of_loop(0), shares.of_loop(2)), "loops beyond the shares wrap");
        let one = Shares::new(1, 2, Admission::uploads, &metrics);
        assert!(std::ptr::eq(one.of_loop(0), one.of_loop(1)), "one slot is one line for all");
    }
}
