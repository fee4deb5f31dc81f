//! weft control plane.
