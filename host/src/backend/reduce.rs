//! The one seam for gradient reduction across processes. A data-parallel backend (NCCL) slots
//! in here; the ops never know about it.
use anyhow::Result;

pub trait GradReducer: Send {
    /// Replaces `grads` by their mean over every worker.
    fn all_reduce_mean(&mut self, grads: &mut [f32]) -> Result<()>;
    fn world_size(&self) -> usize;
}

/// One process: the local gradient is already the mean.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl GradReducer for SingleProcess {
    fn all_reduce_mean(&mut self, _grads: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn world_size(&self) -> usize {
        1
    }
}
