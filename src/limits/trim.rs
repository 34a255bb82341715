//! Gives memory back to the system once a burst of transfers is over.
//!
//! While many transfers run, hyper holds buffers for each; when they end, glibc's allocator keeps
//! the freed chunks wherever a few live ones (pooled connections, kept transfers) sit between
//! them, and the next burst lands partly beside them, so resident memory ratchets up burst after
//! burst while the live heap stays small. `malloc_trim` hands back every free page wherever it
//! is, so each burst starts again from what is live.
//!
//! When to trim is read off the allocator itself: once a second, how much of the resident
//! memory is not live heap. When that has grown by [`SLACK`] since the last trim, a burst has
//! freed its buffers, whether or not the next burst has already opened its connections. The
//! trim walks the whole heap, so it runs off the runtime's threads; the look once a second does
//! not. The measurements behind this are in `docs/design.md` (Memory).

use std::time::Duration;

/// Resident memory beyond the live heap, grown since the last trim, that is worth a trim.
pub(crate) const SLACK: u64 = 16 << 20;

/// How often the process's memory is looked at.
pub(crate) const EVERY: Duration = Duration::from_secs(1);

/// The process's memory at one moment, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Resident set (`/proc/self/statm`, the same as `VmRSS`).
    pub resident: u64,
    /// Heap in use: allocated chunks and mapped large blocks.
    pub live: u64,
}

impl Sample {
    /// Resident but not live: code, stacks, and free heap the allocator kept.
    fn idle(self) -> u64 {
        self.resident.saturating_sub(self.live)
    }
}

/// Decides from periodic [`Sample`]s when a trim is worth it.
#[derive(Debug, Default)]
pub(crate) struct Trigger {
    /// The least idle memory seen since the last trim (or start): what a trim cannot give back.
    floor: Option<u64>,
}

impl Trigger {
    /// Records a sample; true when idle memory has grown by [`SLACK`] over its floor.
    pub(crate) fn observe(&mut self, now: Sample) -> bool {
        let idle = now.idle();
        let floor = self.floor.map_or(idle, |f| f.min(idle));
        self.floor = Some(floor);
        idle >= floor + SLACK
    }

    /// After a trim: what it left idle is the new floor, so memory it could not return does not
    /// trigger it again.
    pub(crate) fn trimmed(&mut self, after: Sample) {
        self.floor = Some(after.idle());
    }
}

/// Looks at the process's memory every [`EVERY`] and trims when [`Trigger`] says so, for as
/// long as the runtime runs. Does nothing where the allocator cannot be asked.
pub(crate) fn spawn() {
    if sample().is_some() {
        tokio::spawn(run());
    }
}

async fn run() {
    let mut trigger = Trigger::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A look is two small reads (tens of µs): here. A trim walks the whole heap: on a
        // blocking thread, which exists only while trims happen.
        let Some(before) = sample() else { return };
        if !trigger.observe(before) {
            continue;
        }
        let Ok(Some(after)) = tokio::task::spawn_blocking(trim).await else { return };
        trigger.trimmed(after);
        tracing::info!(
            resident_kib_before = before.resident >> 10,
            live_kib = before.live >> 10,
            resident_kib_after = after.resident >> 10,
            "free heap returned to the system"
        );
    }
}

/// Gives free heap pages back; the memory after.
fn trim() -> Option<Sample> {
    release();
    sample()
}

/// Resident memory and the allocator's live heap now.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn sample() -> Option<Sample> {
    // statm: sizes in pages, the second is the resident set.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf and mallinfo2 take no pointers and return plain values; mallinfo2 is
    // thread-safe (it locks each arena in turn while it counts).
    let (page, info) = unsafe { (libc::sysconf(libc::_SC_PAGESIZE), libc::mallinfo2()) };
    let live = u64::try_from(info.uordblks.saturating_add(info.hblkhd)).ok()?;
    Some(Sample { resident: pages * u64::try_from(page).ok()?, live })
}

/// Other allocators keep their own counts and return memory their own way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn sample() -> Option<Sample> {
    None
}

/// Returns free heap pages to the system (the samples around it say how many).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() {
    // SAFETY: malloc_trim takes no pointers and only rearranges the allocator's free memory; it
    // is thread-safe (it locks each arena in turn).
    unsafe { libc::malloc_trim(0) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: one sample per tick as (resident, live, resident after a trim) in MiB, the
    /// last used only when that tick trims; and the ticks that trim.
    #[test]
    fn trims_when_idle_memory_grows_by_the_slack_and_not_again_for_what_it_cannot_return() {
        type Case = (&'static str, &'static [(u64, u64, u64)], &'static [usize]);
        let cases: &[Case] = &[
            ("quiet", &[(10, 3, 0), (11, 4, 0), (10, 3, 0), (12, 5, 0)], &[]),
            ("a burst runs: all of it live", &[(10, 3, 0), (60, 50, 0), (62, 52, 0)], &[]),
            (
                "a burst comes down: trimmed, and again for what it frees after",
                &[(10, 3, 0), (60, 50, 0), (60, 20, 28), (30, 6, 14), (14, 6, 0)],
                &[2, 3],
            ),
            (
                "back to back: the next burst's connections open before the first's are gone",
                &[(10, 3, 0), (60, 50, 0), (62, 20, 28), (60, 52, 0), (61, 22, 30)],
                &[2, 4],
            ),
            ("churn below the slack", &[(30, 20, 0), (35, 20, 0), (40, 30, 0), (38, 24, 0), (36, 22, 0)], &[]),
            (
                "a trim that returns nothing is not repeated",
                &[(10, 3, 0), (60, 20, 58), (60, 20, 0), (61, 20, 0)],
                &[1],
            ),
            ("freed memory reused lowers the floor", &[(40, 10, 0), (40, 35, 0), (40, 15, 25)], &[2]),
            ("just under the slack", &[(10, 3, 0), (60, 50, 0), (60, 38, 0)], &[]),
        ];
        let mib = |m: u64| m << 20;
        for (name, ticks, want) in cases {
            let mut trigger = Trigger::default();
            let mut got = Vec::new();
            for (i, &(resident, live, after)) in ticks.iter().enumerate() {
                if trigger.observe(Sample { resident: mib(resident), live: mib(live) }) {
                    got.push(i);
                    trigger.trimmed(Sample { resident: mib(after), live: mib(live) });
                }
            }
            assert_eq!(&got, want, "{name}");
        }
    }

    /// The two tests below read and trim the whole process's heap: one at a time. The other
    /// tests of this binary (threads of the same process under `cargo test`) allocate and free
    /// up to about 10 MiB meanwhile, which the margins allow for.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    static WHOLE_HEAP: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The allocator's count follows what is allocated: a live 128 MiB shows, and is gone once
    /// freed (give or take 32 MiB that other tests allocate or free meanwhile).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn sample_counts_the_live_heap() {
        let _heap = WHOLE_HEAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = sample().expect("glibc answers");
        let chunks: Vec<Vec<u8>> = (0..8192).map(|i| vec![i as u8; 16 << 10]).collect();
        let held = sample().unwrap();
        assert!(held.live >= before.live + (96 << 20), "{before:?} then {held:?} with 128 MiB allocated");
        assert!(held.resident >= held.live, "{held:?}");
        drop(chunks);
        let after = sample().unwrap();
        assert!(after.live + (96 << 20) <= held.live, "{held:?} then {after:?} after freeing them");
    }

    /// A look and a trim with the real allocator: nothing while the memory is live, a trim
    /// that gives the freed pages back once it is not, and nothing more to trim after.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_real_allocator_is_trimmed_once_freed_memory_exceeds_the_slack() {
        let _heap = WHOLE_HEAP.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut trigger = Trigger::default();
        // Many live 16 KiB chunks, freed all but every 16th: holes glibc's free cannot return.
        let mut chunks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 << 10]).collect();
        assert!(!trigger.observe(sample().unwrap()), "64 MiB live is not idle");
        for (i, chunk) in chunks.iter_mut().enumerate() {
            if i % 16 != 0 {
                *chunk = Vec::new();
            }
        }
        let before = sample().unwrap();
        assert!(trigger.observe(before), "60 MiB freed: a trim ({before:?})");
        let after = trim().unwrap();
        trigger.trimmed(after);
        assert!(
            after.resident + (32 << 20) < before.resident,
            "60 of 64 MiB freed: {before:?} before the trim, {after:?} after"
        );
        assert!(!trigger.observe(sample().unwrap()), "nothing more to give back");
        drop(chunks);
    }
}
