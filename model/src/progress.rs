//! Loading progress as a callback: the model crate reports how many checkpoint bytes a
//! load has read, and the caller decides what to show (the CLI draws a bar; a worker
//! shows nothing). No terminal code lives in this crate.

/// Called after each tensor is read with `(bytes done, bytes total)`. The total is an
/// estimate for the dense weights (fixed when the load starts); `done` may stop short
/// of it.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// A [`Progress`] that shows nothing.
pub fn quiet(_done: u64, _total: u64) {}
