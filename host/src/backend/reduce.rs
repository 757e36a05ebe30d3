//! The one seam for reductions across data-parallel workers (ranks). The step's `reduce` phase
//! and any statistic over the global batch go through a [`Collective`]; the ops never know how
//! many ranks there are.
//!
//! Every sum over ranks is taken in rank order, `((x_0 + x_1) + x_2) + ...` element by element
//! ([`ordered_sum_into`]), whatever the engine underneath: the result is the same bits on every
//! rank and in every run, and the same bits whether the ranks are threads of one process
//! ([`ThreadCollective`], `--shards N`) or processes under `mpirun` (`MpiCollective`, feature
//! `mpi`).
use std::sync::{Arc, Barrier, Mutex};

use anyhow::{ensure, Result};
use dinovmf_core::sinkhorn::SinkhornRanks;

/// Collective operations over the ranks of one data-parallel run. Every rank must make the same
/// calls in the same order with the same lengths (as MPI requires).
pub trait Collective: Send {
    /// This worker's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks, in rank order.
    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()>;
    /// As [`Collective::sum_f32`], in f64.
    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `local` (all of the same length), concatenated in rank order into `all`
    /// (`world_size() * local.len()` values).
    fn all_gather_f32(&mut self, local: &[f32], all: &mut [f32]) -> Result<()>;

    /// Bytes this rank has sent and seconds it has spent in collectives so far (0 where the
    /// engine does not count them).
    fn traffic(&self) -> (u64, f64) {
        (0, 0.0)
    }

    /// The element-wise mean over ranks: the rank-ordered sum divided by the world size.
    fn mean_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let n = self.world_size();
        if n > 1 {
            self.sum_f32(buf)?;
            let w = n as f32;
            buf.iter_mut().for_each(|x| *x /= w);
        }
        Ok(())
    }
}

/// Core's Sinkhorn-Knopp rounds over the ranks of a collective (equal shards: the batch has
/// `world_size()` times this rank's rows). The column maxima are gathered and folded in rank
/// order, the column sums are [`Collective::sum_f32`]: the same bits on every rank.
pub struct SinkhornOver<'a>(pub &'a mut dyn Collective);

impl SinkhornRanks<f32> for SinkhornOver<'_> {
    type Error = anyhow::Error;
    fn batch_rows(&self, local: usize) -> usize {
        local * self.0.world_size()
    }
    fn max_over_ranks(&mut self, col_max: &mut [f32]) -> Result<()> {
        let world = self.0.world_size();
        if world == 1 {
            return Ok(());
        }
        let mut all = vec![0.0f32; world * col_max.len()];
        self.0.all_gather_f32(col_max, &mut all)?;
        for part in all.chunks_exact(col_max.len().max(1)) {
            for (m, &x) in col_max.iter_mut().zip(part) {
                *m = m.max(x);
            }
        }
        Ok(())
    }
    fn sum_over_ranks(&mut self, col_sum: &mut [f32]) -> Result<()> {
        if self.0.world_size() == 1 {
            return Ok(());
        }
        self.0.sum_f32(col_sum)
    }
}

/// The sum over ranks of one element range: `out = parts[0] + parts[1] + ...`, added in that
/// order. Both engines call this, so they give the same bits.
pub fn ordered_sum_into<T: Copy + std::ops::AddAssign>(out: &mut [T], parts: &[&[T]]) {
    let Some((first, rest)) = parts.split_first() else {
        return;
    };
    out.copy_from_slice(first);
    for p in rest {
        for (o, &x) in out.iter_mut().zip(p.iter()) {
            *o += x;
        }
    }
}

/// One process, one rank: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn sum_f32(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&mut self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_f32(&mut self, local: &[f32], all: &mut [f32]) -> Result<()> {
        ensure!(
            all.len() == local.len(),
            "all_gather: output holds {} values, expected {}",
            all.len(),
            local.len()
        );
        all.copy_from_slice(local);
        Ok(())
    }
}

/// What the threads of a [`ThreadCollective`] share: one posted buffer per rank.
struct Board {
    f32s: Mutex<Vec<Vec<f32>>>,
    f64s: Mutex<Vec<Vec<f64>>>,
    barrier: Barrier,
}

/// Ranks that are threads of one process (the in-process reference of a data-parallel run,
/// `--shards N`): each rank posts its buffer, waits for the others, and sums the posted
/// buffers in rank order. Every rank must run on its own thread.
pub struct ThreadCollective {
    rank: usize,
    world: usize,
    board: Arc<Board>,
}

impl ThreadCollective {
    /// The `world` ranks of one group, rank 0 first.
    pub fn group(world: usize) -> Vec<ThreadCollective> {
        let board = Arc::new(Board {
            f32s: Mutex::new(vec![Vec::new(); world]),
            f64s: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world.max(1)),
        });
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                world,
                board: Arc::clone(&board),
            })
            .collect()
    }

    /// Posts `local`, waits for every rank, hands all posted buffers (rank order) to `read`,
    /// and waits again so that no rank overwrites its post before all have read.
    fn exchange<T: Clone>(
        &self,
        slots: &Mutex<Vec<Vec<T>>>,
        local: &[T],
        read: impl FnOnce(&[&[T]]),
    ) -> Result<()> {
        {
            let mut s = slots
                .lock()
                .map_err(|_| anyhow::anyhow!("a rank thread panicked"))?;
            s[self.rank].clear();
            s[self.rank].extend_from_slice(local);
        }
        self.board.barrier.wait();
        {
            let s = slots
                .lock()
                .map_err(|_| anyhow::anyhow!("a rank thread panicked"))?;
            ensure!(
                s.iter().all(|p| p.len() == local.len()),
                "collective: the ranks posted buffers of different lengths"
            );
            let parts: Vec<&[T]> = s.iter().map(|p| &p[..]).collect();
            read(&parts);
        }
        self.board.barrier.wait();
        Ok(())
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn sum_f32(&mut self, buf: &mut [f32]) -> Result<()> {
        let local = buf.to_vec();
        self.exchange(&self.board.f32s, &local, |parts| {
            ordered_sum_into(buf, parts)
        })
    }
    fn sum_f64(&mut self, buf: &mut [f64]) -> Result<()> {
        let local = buf.to_vec();
        self.exchange(&self.board.f64s, &local, |parts| {
            ordered_sum_into(buf, parts)
        })
    }
    fn all_gather_f32(&mut self, local: &[f32], all: &mut [f32]) -> Result<()> {
        ensure!(
            all.len() == self.world * local.len(),
            "all_gather: output holds {} values, expected {} x {}",
            all.len(),
            self.world,
            local.len()
        );
        self.exchange(&self.board.f32s, local, |parts| {
            for (o, p) in all.chunks_exact_mut(local.len().max(1)).zip(parts) {
                o.copy_from_slice(p);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose sum depends on the order of addition in f32.
    fn rank_values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((rank * 7919 + i * 104_729) % 1000) as f32 * 1e-3 + [1e8, -1e8, 1.0][rank % 3]
            })
            .collect()
    }

    fn on_threads<R: Send>(world: usize, f: impl Fn(ThreadCollective) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ThreadCollective::group(world)
                .into_iter()
                .map(|c| s.spawn(|| f(c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn thread_sum_is_the_rank_ordered_sum_on_every_rank() {
        let (world, n) = (3, 37);
        let mut want = vec![0.0f32; n];
        let vals: Vec<Vec<f32>> = (0..world).map(|r| rank_values(r, n)).collect();
        let parts: Vec<&[f32]> = vals.iter().map(|v| &v[..]).collect();
        ordered_sum_into(&mut want, &parts);
        // The reference in f64 (what the ordered f32 sum approximates): within one f32 rounding
        // per addition of the largest term.
        for i in 0..n {
            let exact: f64 = (0..world).map(|r| vals[r][i] as f64).sum();
            assert!((want[i] as f64 - exact).abs() <= 2.0 * 1e8 * f32::EPSILON as f64);
        }
        let got = on_threads(world, |mut c| {
            let mut b = rank_values(c.rank(), n);
            c.sum_f32(&mut b).unwrap();
            b
        });
        for g in got {
            assert_eq!(
                g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn thread_mean_f64_and_gather() {
        let got = on_threads(2, |mut c| {
            let r = c.rank() as f64;
            let mut d = vec![r, 10.0 + r];
            c.sum_f64(&mut d).unwrap();
            let mut m = vec![2.0 * r as f32 + 1.0];
            c.mean_f32(&mut m).unwrap();
            let mut all = vec![f32::NAN; 4];
            c.all_gather_f32(&[r as f32, -(r as f32)], &mut all)
                .unwrap();
            (d, m, all)
        });
        for (d, m, all) in got {
            assert_eq!(d, vec![1.0, 21.0]);
            assert_eq!(m, vec![2.0]);
            assert_eq!(all, vec![0.0, -0.0, 1.0, -1.0]);
        }
    }

    /// Teacher-like logits `[n, k]`: spread over 40 nats (a cold teacher), not symmetric.
    fn logits(n: usize, k: usize) -> Vec<f32> {
        (0..n * k)
            .map(|i| ((i * 2_654_435_761) % 10_007) as f32 / 10_007.0 * 40.0 - 20.0)
            .collect()
    }

    #[test]
    fn sinkhorn_over_thread_ranks_is_the_whole_batchs_sinkhorn() {
        use dinovmf_core::sinkhorn::{sinkhorn_targets_inplace, sinkhorn_targets_over_ranks};
        let (world, n, k, iters) = (2, 12, 7, 3);
        let l = logits(n, k);
        // The reference: one process over the whole batch, in f64.
        let mut want: Vec<f64> = l.iter().map(|&x| x as f64).collect();
        let (mut cm, mut cs) = (vec![0.0f64; k], vec![0.0f64; k]);
        sinkhorn_targets_inplace(&mut want, &mut cm, &mut cs, n, k, iters);
        let rows = n / world;
        let got = on_threads(world, |mut c| {
            let r = c.rank();
            let mut q = l[r * rows * k..(r + 1) * rows * k].to_vec();
            let (mut cm, mut cs) = (vec![0.0f32; k], vec![0.0f32; k]);
            sinkhorn_targets_over_ranks(
                &mut q,
                &mut cm,
                &mut cs,
                rows,
                k,
                iters,
                &mut SinkhornOver(&mut c),
            )
            .unwrap();
            q
        });
        let got: Vec<f32> = got.concat();
        // f32 rounding of a few log-sum-exps over 40-nat spans: 1e-5 absolute on targets <= 1.
        let err = |a: &[f32]| {
            a.iter()
                .zip(&want)
                .fold(0.0f64, |m, (&x, &y)| m.max((x as f64 - y).abs()))
        };
        assert!(err(&got) <= 1e-5, "over ranks: {:e}", err(&got));
        // Balancing each half on its own is a different answer (the test is not vacuous).
        let mut halves = l.clone();
        for h in halves.chunks_exact_mut(rows * k) {
            let (mut cm, mut cs) = (vec![0.0f32; k], vec![0.0f32; k]);
            sinkhorn_targets_inplace(h, &mut cm, &mut cs, rows, k, iters);
        }
        assert!(err(&halves) > 1e-2, "halves: {:e}", err(&halves));
    }

    #[test]
    fn single_process_is_the_identity() {
        let mut c = SingleProcess;
        let mut b = vec![1.5f32, -2.0];
        c.mean_f32(&mut b).unwrap();
        assert_eq!(b, vec![1.5, -2.0]);
        let mut all = vec![0.0; 3];
        assert!(c.all_gather_f32(&b, &mut all).is_err());
    }
}
