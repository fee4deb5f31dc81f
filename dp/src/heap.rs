//! Keeps glibc's malloc from handing freed memory back to the kernel after every burst.
//!
//! The multiplexed transports move data through short-lived heap buffers: quinn copies each
//! received datagram batch into a fresh `BytesMut` and each written chunk into a `Bytes` it
//! holds until acknowledged; the pooled TLS transport's HTTP/2 frames do the same. With
//! glibc's defaults (`M_TRIM_THRESHOLD` 128 KiB) the top of the heap shrinks as soon as those
//! buffers are freed and grows again for the next ones: one bulk stream through a pooled or
//! QUIC pair made 250,000–550,000 page faults and 8,600–26,000 `brk` calls in 4 s (`perf stat
//! -e page-faults,syscalls:sys_enter_brk` on both proxies), each fault a zeroed page charged
//! to the cgroup. The TLS transport, which reuses its buffers, made 8.
//!
//! glibc raises both of its thresholds by itself once a program frees a block that was
//! mapped on its own (mallopt(3), "dynamic mmap threshold"): the mmap threshold to that
//! block's size and the trim threshold to twice that. [`keep_freed_memory`] frees one
//! untouched 1 MiB block at start, so the heap keeps up to 2 MiB of freed memory at its top
//! for reuse. Measured on the bench (`weft-bench datapath`, A/B in one run): the faults of a
//! bulk stream drop to a few hundred (a 1 MiB trim threshold still left 94,000–170,000), and
//! with the faults gone (a higher trim threshold through `GLIBC_TUNABLES`) one bulk stream
//! went from 3.0–3.8 to 3.9–4.5 Gbit/s over pooled TLS and from 2.5–2.9 to 3.0–3.3 over QUIC,
//! round by round (BENCHMARKS.md, "QUIC against rusnel"). Whether the faults happen at all
//! without this depends on history: freeing any large mapped block raises the thresholds
//! the same way, which a dataplane may or may not have done. The block is never written, so
//! it costs no resident memory; a process keeps at most those 2 MiB per malloc arena beyond
//! what it uses. Thresholds an operator set through `GLIBC_TUNABLES` or `MALLOC_*_` turn
//! glibc's dynamic adjustment off, and this with it. Other allocators are unaffected.

/// The block freed at start: glibc's new mmap threshold (and half its trim threshold).
const BLOCK: usize = 1 << 20;

/// Raises glibc's trim threshold to 2 MiB (see the module doc). Call once, early.
pub fn keep_freed_memory() {
    // Allocated by mmap (above glibc's initial 128 KiB threshold) and freed untouched; the
    // black box keeps the compiler from eliding the pair.
    drop(std::hint::black_box(Vec::<u8>::with_capacity(BLOCK)));
}
