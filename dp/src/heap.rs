//! Keeps glibc's malloc from handing freed memory back to the kernel after every burst.
//!
//! The multiplexed transports move data through short-lived heap buffers (quinn: a fresh
//! `BytesMut` per received datagram batch, a `Bytes` per written chunk until acknowledged;
//! h2: its frames). At glibc's default 128 KiB trim threshold the heap's top shrinks as soon
//! as they are freed and is faulted in again for the next ones: hundreds of thousands of
//! page faults per bulk stream on the pooled and QUIC pairs (measured in BENCHMARKS.md,
//! "QUIC against rusnel"), against a handful on `tls`, which reuses its buffers.
//!
//! glibc raises both of its thresholds by itself once a program frees a block that was
//! mapped on its own (mallopt(3), "dynamic mmap threshold"): the mmap threshold to that
//! block's size and the trim threshold to twice that. [`keep_freed_memory`] frees one
//! untouched 1 MiB block at start, so the heap keeps up to 2 MiB of freed memory at its top
//! for reuse (1 MiB of trim threshold was not enough). Without it, whether the faults happen
//! depends on history: freeing any large mapped block has the same effect. The block is
//! never written, so it costs no resident memory; a process keeps at most those 2 MiB per
//! malloc arena beyond what it uses. Thresholds an operator set through `GLIBC_TUNABLES` or
//! `MALLOC_*_` turn glibc's dynamic adjustment off, and this with it. Other allocators are
//! unaffected.

/// The block freed at start: glibc's new mmap threshold (and half its trim threshold).
const BLOCK: usize = 1 << 20;

/// Raises glibc's trim threshold to 2 MiB (see the module doc). Call once, early.
pub fn keep_freed_memory() {
    // Allocated by mmap (above glibc's initial 128 KiB threshold) and freed untouched; the
    // black box keeps the compiler from eliding the pair.
    drop(std::hint::black_box(Vec::<u8>::with_capacity(BLOCK)));
}
