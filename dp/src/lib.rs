//! weft dataplane proxy (`weft-dp`).
//!
//! [`app::run`] joins the mesh and keeps the dataplane in sync with the control plane: it
//! certifies its own key ([`identity`]), holds the discovery stream ([`discovery`]), probes its
//! inbounds ([`probe`]) and serves `/ready`, `/config` and `/metrics` ([`admin`]). The applied
//! config ([`model`]) and the credentials are published in `watch<Arc<…>>` channels that the
//! traffic listeners subscribe to.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod config;
pub mod cp;
pub mod dataplane;
pub mod discovery;
pub mod heap;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod probe;
pub mod proxy;
pub mod shutdown;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
