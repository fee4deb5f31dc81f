//! weft control plane: Kuma-format resources in an embedded store, served over a REST API.
//!
//! `model` parses and validates resources, `store` keeps them (sled or memory) with versions
//! and a change feed, `rest` serves them, `app` wires it all, `cli` is `weftctl`.

pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod dpserver;
pub mod index;
pub mod insight;
pub mod keys;
pub mod meshca;
pub mod metrics;
pub mod model;
pub mod rest;
pub mod store;
pub mod tokens;
