use std::collections::BTreeMap;

use super::*;

fn slots(spec: &[(bool, usize)]) -> Vec<Slot> {
    spec.iter()
        .enumerate()
        .map(|(i, (healthy, active))| Slot {
            address: format!("10.0.0.{i}:1"),
            healthy: *healthy,
            active: Arc::new(AtomicUsize::new(*active)),
        })
        .collect()
}

#[test]
fn round_robin_spreads_evenly_over_healthy_endpoints() {
    let b = Balancer::default();
    let s = slots(&[(true, 0), (false, 0), (true, 0), (true, 0)]);
    let mut count = BTreeMap::new();
    for _ in 0..300 {
        let order = b.order(LoadBalancer::RoundRobin, &s, 3);
        assert_eq!(order.len(), 3, "the chosen one and two fallbacks");
        assert!(!order.contains(&1), "unhealthy endpoints are never tried");
        *count.entry(order[0]).or_insert(0) += 1;
    }
    assert_eq!(count, BTreeMap::from([(0, 100), (2, 100), (3, 100)]));
}

#[test]
fn least_request_prefers_the_less_loaded() {
    let b = Balancer::default();
    let s = slots(&[(true, 50), (true, 0)]);
    let picks = (0..1000)
        .filter(|_| b.order(LoadBalancer::LeastRequest, &s, 1)[0] == 1)
        .count();
    // Two random choices: the idle one wins unless both draws are the busy one (1/4).
    assert!(picks > 650, "idle endpoint picked {picks}/1000 times");
}

#[test]
fn nothing_healthy_means_no_endpoint() {
    let b = Balancer::default();
    assert!(
        b.order(LoadBalancer::RoundRobin, &slots(&[(false, 0)]), 3)
            .is_empty()
    );
    assert!(b.order(LoadBalancer::RoundRobin, &[], 3).is_empty());
}
