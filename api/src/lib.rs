//! weft wire-level types shared by `weft-cp`, `weftctl` and `weft-dp`.
//!
//! No logic lives here: only the names of things that cross a process boundary, so that the
//! control plane, the CLI and the dataplane cannot disagree about them.
//!
//! [`v1`] is generated from `proto/weft/v1/weft.proto` and checked in; after editing the proto,
//! regenerate it with `WEFT_REGEN=1 cargo test -p weft-api --test codegen` (the same test fails
//! when the checked-in code drifts from the proto).

pub mod kind;

/// The `weft.v1` gRPC API between `weft-dp` and `weft-cp`: messages, clients and servers.
#[rustfmt::skip]
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::nursery
)]
pub mod v1 {
    include!("gen/weft.v1.rs");
}
