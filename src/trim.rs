//! Gives memory back to the system once a burst of connections is over.
//!
//! While a thousand transfers run, hyper holds some 60 KiB of buffers for each; when they end,
//! glibc's allocator keeps the freed chunks wherever a few live ones (pooled connections, kept
//! transfers) sit between them, and the next burst lands partly beside them. Resident memory
//! ratcheted up burst after burst (69, 88, 100, 102 MiB over four bursts of 1000 GETs) while
//! the live heap after each was 15 MiB. `malloc_trim` hands back every free page wherever it
//! is, so each burst starts again from what is live (the same bursts, trimmed between: 66, 66,
//! 73, 73 MiB). It walks the whole heap, so it runs only once a burst is over, off the
//! runtime's threads.

use std::time::Duration;

use crate::metrics::OpenClients;

/// Fewer open connections than this since the last trim is not a burst worth trimming after.
pub const BURST: usize = 64;

/// How often the open connections are looked at.
pub const EVERY: Duration = Duration::from_secs(1);

/// Decides from the open-connection counts seen once per [`EVERY`] when a burst is over.
#[derive(Debug, Default)]
pub struct Trigger {
    peak: usize,
}

impl Trigger {
    /// Records the connections open now. When a burst of at least [`BURST`] has come down to a
    /// quarter of its peak, returns that peak and starts over from `open`.
    pub fn observe(&mut self, open: usize) -> Option<usize> {
        self.peak = self.peak.max(open);
        if self.peak >= BURST && open <= self.peak / 4 {
            return Some(std::mem::replace(&mut self.peak, open));
        }
        None
    }
}

/// Watches the client connections open now (the `regscope_connections{side="client"}` gauge)
/// and trims after each burst, for as long as the runtime runs.
pub fn spawn(open: OpenClients) {
    tokio::spawn(run(open));
}

async fn run(open: OpenClients) {
    let mut trigger = Trigger::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = open.now();
        if let Some(peak) = trigger.observe(now) {
            let before = resident_kib();
            let released = tokio::task::spawn_blocking(release).await.unwrap_or(false);
            tracing::info!(
                peak,
                open = now,
                resident_kib_before = before,
                resident_kib_after = resident_kib(),
                released,
                "burst over: free heap returned to the system"
            );
        }
    }
}

/// The process's resident memory, where the system says.
fn resident_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns free heap pages to the system; true if any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() -> bool {
    // SAFETY: malloc_trim takes no pointers and only rearranges the allocator's free memory; it
    // is thread-safe (it locks each arena in turn).
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return memory their own way.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each case: the open counts seen, one per tick, and the ticks that trim with the peak each
    /// reports.
    #[test]
    fn trims_when_a_burst_has_come_down_and_never_for_small_loads() {
        type Case = (&'static str, &'static [usize], &'static [(usize, usize)]);
        let cases: &[Case] = &[
            ("quiet", &[0, 3, 10, 2, 0, 0], &[]),
            ("just under a burst", &[0, 63, 0, 0], &[]),
            ("one burst, trimmed again as it drains further", &[0, 1000, 900, 300, 250, 10, 0], &[(4, 1000), (5, 250)]),
            ("two bursts", &[1000, 100, 0, 0, 500, 120, 0], &[(1, 1000), (2, 100), (5, 500), (6, 120)]),
            ("a burst that never comes down far", &[1000, 600, 400, 300, 251], &[]),
            ("a new peak before it came down", &[100, 800, 300, 150], &[(3, 800)]),
            ("a long-lived load between bursts", &[40, 140, 40, 35, 140, 30], &[(3, 140), (5, 140)]),
        ];
        for (name, opens, want) in cases {
            let mut trigger = Trigger::default();
            let got: Vec<(usize, usize)> =
                opens.iter().enumerate().filter_map(|(i, &open)| Some((i, trigger.observe(open)?))).collect();
            assert_eq!(&got, want, "{name}");
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn release_gives_freed_pages_back() {
        // Many live 16 KiB chunks, freed all but every 16th: holes glibc's free cannot return.
        let mut chunks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 16 << 10]).collect();
        let before = resident_kib().unwrap();
        for (i, chunk) in chunks.iter_mut().enumerate() {
            if i % 16 != 0 {
                *chunk = Vec::new();
            }
        }
        let freed_but_kept = resident_kib().unwrap();
        assert!(release(), "there were free pages to return");
        let after = resident_kib().unwrap();
        assert!(
            after + 32 * 1024 < freed_but_kept,
            "64 MiB allocated ({before} KiB resident), 60 freed ({freed_but_kept} KiB resident), \
             {after} KiB resident after the trim"
        );
        drop(chunks);
    }
}
