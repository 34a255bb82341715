//! Resource limits: how much a connection reads at once, how many uploads stream at once, how
//! long a connection may take to send a request head, and giving freed memory back to the
//! system after a burst.

pub(crate) mod admission;
pub(crate) mod buffers;
pub(crate) mod head_timeout;
pub(crate) mod shares;
pub(crate) mod trim;
