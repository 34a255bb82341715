//! A bounded copy of a body's first bytes, for the few bodies regscope reads (manifests, v1
//! ancestry).

use bytes::Buf;

/// A bounded copy of a body's bytes, taken while they stream past (manifests, v1 ancestry).
/// Allocated once up front; stops copying at its limit, never delays the stream.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    pub(crate) bytes: Vec<u8>,
    pub(crate) limit: usize,
    /// Set when the body outgrew the limit: a truncated copy is worthless, so it is dropped.
    pub(crate) overflowed: bool,
}

impl Capture {
    pub(crate) fn take(&mut self, data: &impl Buf) {
        if self.overflowed || self.limit == 0 {
            return;
        }
        let n = data.remaining();
        if self.bytes.len() + n > self.limit || n != data.chunk().len() {
            self.overflowed = true;
            self.bytes = Vec::new();
            return;
        }
        self.bytes.extend_from_slice(data.chunk());
    }

    pub(crate) fn take_bytes(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}
