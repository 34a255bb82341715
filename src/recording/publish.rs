//! What a finished transfer tells the outside: its metrics and its one log line.

use super::model::{BlobOutcome, Transfer};
use crate::metrics::Metrics;
use crate::protocol::Phase;
use crate::protocol::{Culprit, Party};

/// Records a finished transfer in the image-level metrics and logs it at info (target
/// `regscope::transfer`).
pub(crate) fn publish(m: &Metrics, transfer: &Transfer) {
    let dir = transfer.direction.as_str();
    m.image_transfer.with_label_values(&[dir, transfer.outcome.as_str()]).observe(transfer.wall_seconds);
    for party in Party::ALL {
        m.image_time_total.with_label_values(&[dir, party.as_str()]).inc_by(transfer.parties.get(party).max(0.0));
    }
    for culprit in Culprit::ALL {
        m.lost_seconds.with_label_values(&[dir, culprit.as_str()]).inc_by(transfer.lost.get(culprit).max(0.0));
    }
    let failed = transfer.blobs.iter().flat_map(|b| &b.attempts).filter_map(|a| a.failed_by.zip(a.cause));
    for (culprit, cause) in failed {
        m.failed_attempts.with_label_values(&[dir, culprit.as_str(), cause.as_str()]).inc();
    }
    for blob in &transfer.blobs {
        if let (Some(phases), BlobOutcome::Committed) = (&blob.phases, blob.outcome) {
            for phase in Phase::ALL {
                m.upload_phase.with_label_values(&[transfer.api.as_str(), phase.as_str()]).observe(phases.get(phase));
            }
        }
    }
    let pct = |party| {
        if transfer.wall_seconds > 0.0 {
            100.0 * transfer.parties.get(party) / transfer.wall_seconds
        } else {
            0.0
        }
    };
    tracing::info!(
        target: "regscope::transfer",
        direction = dir,
        outcome = transfer.outcome.as_str(),
        repository = transfer.repository,
        tag = transfer.tag.as_deref(),
        client = transfer.client,
        wall_s = transfer.wall_seconds,
        client_pct = pct(Party::Client),
        registry_pct = pct(Party::Registry),
        transfer_pct = pct(Party::Moving),
        lost_s = transfer.lost.total(),
        blobs = transfer.blobs.len(),
        bytes = transfer.bytes,
        "transfer"
    );
}
