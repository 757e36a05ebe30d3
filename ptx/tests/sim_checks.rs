//! The simulator's own checks must fire: these bodies are wrong on purpose.
use dinovmf_ptx::block::{Block, Shared};
use dinovmf_ptx::sim;

#[test]
#[should_panic(expected = "smem race")]
fn missing_barrier_is_a_race() {
    sim::launch([1, 1, 1], 64, 64, |b| {
        b.each0(|t, sm| sm.st(t as usize, t as f32));
        // No b.sync(): thread t reads its neighbour's word in the same phase.
        b.each0(|t, sm| {
            let _ = sm.ld((t as usize + 1) % 64);
        });
    });
}

#[test]
#[should_panic(expected = "unwritten")]
fn reading_unwritten_shared_memory_is_caught() {
    sim::launch([1, 1, 1], 32, 64, |b| {
        b.each0(|t, sm| sm.st(t as usize, 1.0));
        b.sync();
        b.each0(|t, sm| {
            let _ = sm.ld(32 + t as usize);
        });
    });
}

#[test]
#[should_panic(expected = "out of bounds")]
fn shared_memory_overflow_is_caught() {
    sim::launch([1, 1, 1], 32, 16, |b| {
        b.each0(|t, sm| sm.st(t as usize, 0.0))
    });
}

#[test]
fn barrier_separated_exchange_is_fine_and_warp_sums_are_butterflies() {
    sim::launch([2, 1, 1], 64, 64, |b| {
        b.each0(|t, sm| sm.st(t as usize, t as f32));
        b.sync();
        let mut l = b.local(0.0f32);
        b.each(&mut l, |t, v, sm| *v = sm.ld((t as usize + 1) % 64));
        b.warp_reduce(&mut l, dinovmf_ptx::Op::Sum, |v| v);
        b.each(&mut l, |t, v, _| {
            // Warp 0 holds 1..=31 and 32, warp 1 holds 33..=63 and 0.
            let want = if t < 32 {
                (1..=32).sum::<u32>()
            } else {
                (33..=63).sum::<u32>()
            };
            assert_eq!(*v, want as f32);
        });
    });
}
