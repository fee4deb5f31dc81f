//! weft dataplane proxy (`weft-dp`).
//!
//! Today this crate holds the dataplane's configuration: its TOML file, strictly parsed, with
//! the same flags overriding it. The runtime (joining the mesh, the config stream, the mTLS
//! listeners) builds on it.

pub mod config;
pub mod identity;
