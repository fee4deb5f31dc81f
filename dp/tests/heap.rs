//! `heap::keep_freed_memory` stops the heap from returning freed memory to the kernel after
//! each burst. Its own test binary: glibc's thresholds are process-wide and only ever rise,
//! so no other test may have moved them first.

use std::hint::black_box;

/// Minor page faults of the calling thread so far (`/proc/thread-self/stat`, field 10).
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("read stat");
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let after_comm = &stat[stat.rfind(')').expect("stat has a command name") + 2..];
    after_comm
        .split_whitespace()
        .nth(7)
        .expect("stat has minflt")
        .parse()
        .expect("minflt is a number")
}

/// Page faults taken by 32 rounds of: allocate 1 MiB as 16 buffers of 64 KiB (each below
/// glibc's 128 KiB mmap threshold, so from the heap, as a transport's buffers are), write
/// every page, free them all.
fn churn() -> u64 {
    let before = minor_faults();
    for _ in 0..32 {
        let bufs: Vec<Vec<u8>> = (0..16).map(|_| black_box(vec![1u8; 64 << 10])).collect();
        black_box(&bufs);
    }
    minor_faults() - before
}

#[test]
fn freed_blocks_are_reused_without_page_faults() {
    // With glibc's defaults the heap's top shrinks once 128 KiB of it is free: every round
    // faults its 256 pages in again.
    let cold = churn();
    assert!(
        cold >= 32 * 128,
        "baseline: expected the default allocator to fault each round's pages in, got {cold} faults"
    );
    weft_dp::heap::keep_freed_memory();
    // Now the block comes from the heap, and its pages stay there when it is freed.
    let warm = churn();
    assert!(
        warm < cold / 10,
        "after keep_freed_memory: {warm} page faults for the same churn (before: {cold})"
    );
}
