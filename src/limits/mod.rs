//! Resource limits: how much a connection reads at once, how many uploads stream at once, and
//! giving freed memory back to the system after a burst.

pub(crate) mod admission;
pub(crate) mod buffers;
pub(crate) mod trim;
