//! weft dataplane.
