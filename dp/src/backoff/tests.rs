use super::*;

const MAX: Duration = Duration::from_secs(3);

#[test]
fn delay_is_equal_jitter_of_the_capped_exponential_step() {
    // attempt 0: step 250ms -> [125ms, 250ms]
    assert_eq!(delay(0, MAX, 0.0), Duration::from_millis(125));
    assert_eq!(delay(0, MAX, 1.0), Duration::from_millis(250));
    // attempt 2: step 1s -> [500ms, 1s]
    assert_eq!(delay(2, MAX, 0.0), Duration::from_millis(500));
    assert_eq!(delay(2, MAX, 0.5), Duration::from_millis(750));
    // attempt 4: 4s capped at 3s -> [1.5s, 3s]
    assert_eq!(delay(4, MAX, 0.0), Duration::from_millis(1500));
    assert_eq!(delay(4, MAX, 1.0), MAX);
    // Huge attempt counts do not overflow.
    assert_eq!(delay(u32::MAX, MAX, 1.0), MAX);
    assert_eq!(delay(40, MAX, 0.0), MAX / 2);
}

#[test]
fn sequence_grows_stays_within_bounds_and_resets() {
    let mut b = Backoff::new(MAX);
    for attempt in 0..20u32 {
        let step = (BASE * 2u32.pow(attempt.min(10))).min(MAX);
        let d = b.next_delay();
        assert!(
            d >= step / 2 && d <= step,
            "attempt {attempt}: {d:?} not in [{:?}, {step:?}]",
            step / 2
        );
    }
    assert_eq!(b.attempts(), 20);
    b.reset();
    assert!(b.next_delay() <= BASE);
}

#[test]
fn jitter_spreads_delays() {
    let mut b = Backoff::new(MAX);
    let delays: std::collections::BTreeSet<Duration> = (0..50)
        .map(|_| {
            b.reset();
            for _ in 0..5 {
                b.next_delay();
            }
            b.next_delay()
        })
        .collect();
    assert!(delays.len() > 10, "equal jitter should spread: {delays:?}");
}
