//! weft wire-level types shared by `weft-cp`, `weftctl` and `weft-dp`.
//!
//! No logic lives here: only the names of things that cross a process boundary, so that the
//! control plane, the CLI and the dataplane cannot disagree about them.

pub mod kind;
