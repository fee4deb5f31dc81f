//! weft wire-level types.
