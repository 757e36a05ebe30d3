//! Data parallelism inside one process (`--shards N`): N CPU backends, each with `B / N` of the
//! batch, one thread each, reducing through a [`ThreadCollective`]. The same code and the same
//! rank-ordered sums as N ranks under `mpirun`, so it is the one-process reference an MPI run
//! matches bit for bit (and a way to test the reduction without MPI).
use anyhow::{ensure, Context, Result};

use super::CpuBackend;
use crate::backend::{
    Backend, BackendConfig, Net, StepHyper, StepMetrics, ThreadCollective, TrainState,
};
use crate::data::Batch;

pub struct ShardedCpu {
    /// Rank 0 first; every shard holds the same state after each step.
    shards: Vec<CpuBackend>,
}

impl ShardedCpu {
    /// `ranks` CPU backends for `cfg`, each for `cfg.shapes.batch / ranks` images.
    pub fn open(cfg: &BackendConfig, ranks: usize) -> Result<Self> {
        let b = cfg.shapes.batch;
        ensure!(ranks >= 1, "--shards must be at least 1");
        ensure!(
            b.is_multiple_of(ranks) && b >= ranks,
            "a batch of {b} cannot be split into {ranks} equal shards: use a --batch-size that \
             is a multiple of {ranks}"
        );
        let shards = ThreadCollective::group(ranks)
            .into_iter()
            .map(|c| CpuBackend::open_rank(cfg, Box::new(c)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { shards })
    }

    fn first(&mut self) -> &mut CpuBackend {
        &mut self.shards[0]
    }
}

impl Backend for ShardedCpu {
    fn name(&self) -> String {
        format!(
            "cpu ({} in-process shards, {} threads)",
            self.shards.len(),
            rayon::current_num_threads()
        )
    }

    fn set_state(&mut self, s: &TrainState) -> Result<()> {
        self.shards.iter_mut().try_for_each(|b| b.set_state(s))
    }

    fn state(&mut self) -> Result<TrainState> {
        self.first().state()
    }

    fn train_step(&mut self, batch: &Batch, hp: &StepHyper) -> Result<StepMetrics> {
        let ranks = self.shards.len();
        // Every shard must reach the step's collectives: split (and refuse a bad batch) before
        // any of them starts.
        let parts = (0..ranks)
            .map(|r| batch.shard(r, ranks))
            .collect::<Result<Vec<_>, _>>()?;
        let results: Vec<Result<StepMetrics>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .shards
                .iter_mut()
                .zip(&parts)
                .map(|(be, part)| s.spawn(move || be.train_step(part, hp)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a shard thread panicked"))?
                })
                .collect()
        });
        let mut metrics = Vec::with_capacity(ranks);
        for r in results {
            metrics.push(r?);
        }
        metrics.into_iter().next().context("no shards")
    }

    fn embed(&mut self, net: Net, images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
        self.first().embed(net, images, n, size)
    }

    fn embed_blocks(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
        blocks: usize,
    ) -> Result<Vec<f32>> {
        self.first().embed_blocks(net, images, n, size, blocks)
    }

    fn cls_attention(
        &mut self,
        net: Net,
        images: &[f32],
        n: usize,
        size: usize,
    ) -> Result<Vec<f32>> {
        self.first().cls_attention(net, images, n, size)
    }

    fn set_koleo_proto(&mut self, weight: f32) -> Result<()> {
        self.shards
            .iter_mut()
            .try_for_each(|b| b.set_koleo_proto(weight))
    }

    fn set_koleo(&mut self, weight: f32) -> Result<()> {
        self.shards.iter_mut().try_for_each(|b| b.set_koleo(weight))
    }

    fn koleo_proto_loss(&self) -> Option<f32> {
        self.shards[0].koleo_proto_loss()
    }
}
