//! Exponential backoff with "equal jitter", for reconnecting to the control plane and retrying
//! certification.
//!
//! The delay for attempt `n` is `d/2 + rand(0..d/2)` with `d = min(max, 250ms · 2^n)`: never
//! less than half the exponential step (so a flapping CP is not hammered) and spread over the
//! other half (so 1000 dataplanes returning together do not stampede it). With the default cap
//! of 3 s a dataplane is back within a few seconds of the CP returning.

use std::time::Duration;

#[cfg(test)]
mod tests;

/// The first step of the backoff.
pub const BASE: Duration = Duration::from_millis(250);

/// The delay of attempt `attempt` (0-based), with `random` in `[0, 1)` choosing the jitter.
pub fn delay(attempt: u32, max: Duration, random: f64) -> Duration {
    let step = BASE
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = step / 2;
    half + half.mul_f64(random.clamp(0.0, 1.0))
}

/// The state of one backoff sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    max: Duration,
}

impl Backoff {
    /// A sequence capped at `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff { attempt: 0, max }
    }

    /// The next delay, randomised; each call grows the step until the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.attempt, self.max, fastrand::f64());
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts over from the first step (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}
