//! Seconds per party: a transfer's shares, a body's or a phase's split.

use serde::{Deserialize, Serialize};

use crate::protocol::Party;

/// Seconds spent per party. Also used for a body's or a phase's split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Split {
    pub client: f64,
    pub registry: f64,
    /// Bytes moving (called `transfer` in the image-level metrics).
    pub moving: f64,
    /// The storage or CDN a registry redirected blobs to.
    #[serde(default)]
    pub storage: f64,
    /// The token service the registry sent the client to.
    #[serde(default)]
    pub auth: f64,
}

impl Split {
    /// `seconds`, all of them `party`'s.
    pub(crate) fn only(party: Party, seconds: f64) -> Split {
        let mut split = Split::default();
        *split.get_mut(party) = seconds;
        split
    }

    /// The seconds that went to `party`.
    pub fn get(&self, party: Party) -> f64 {
        match party {
            Party::Client => self.client,
            Party::Registry => self.registry,
            Party::Moving => self.moving,
            Party::Storage => self.storage,
            Party::Auth => self.auth,
        }
    }

    pub(crate) fn get_mut(&mut self, party: Party) -> &mut f64 {
        match party {
            Party::Client => &mut self.client,
            Party::Registry => &mut self.registry,
            Party::Moving => &mut self.moving,
            Party::Storage => &mut self.storage,
            Party::Auth => &mut self.auth,
        }
    }

    pub fn total(&self) -> f64 {
        Party::ALL.iter().map(|&party| self.get(party)).sum()
    }

    pub fn add(&mut self, other: Split) {
        for party in Party::ALL {
            *self.get_mut(party) += other.get(party);
        }
    }
}
