//! Deterministic, parallel batch loading.
//!
//! Batch i of epoch e is a pure function of (seed, e, i): the epoch's order is a Fisher-Yates shuffle
//! drawn from a stream seeded by (seed, e), and each sample's crops from streams seeded by
//! (seed, e, dataset index, crop number). No random choice depends on which thread runs it, so any
//! number of workers, and a resume at any `start_batch`, give bit-identical batches.
//!
//! Threads: one producer thread per epoch walks the batches in order; each batch's samples are
//! decoded and augmented in parallel on the loader's own rayon pool of `workers` threads. Finished
//! batches wait in a bounded queue of `prefetch` (a `sync_channel`), so the producer runs ahead of
//! the training step by at most `prefetch + 1` batches. Dropping the iterator raises a stop flag,
//! closes the queue and joins the producer (within one sample's work). `workers == 0` runs
//! everything inline in the consumer's thread (no threads, no read-ahead): handy for debugging.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::augment::{eval_transform, multi_crop_into, CropConfig};
use super::{derive_seed, DataError, Dataset};

const TAG_PERM: u64 = 0x7065_726d;
const TAG_AUG: u64 = 0x6175_676d;

/// One training batch of multi-crop views.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// [n_global][batch_size][3][global_size][global_size], crop-major.
    pub global: Vec<f32>,
    /// [n_local][batch_size][3][local_size][local_size], crop-major.
    pub local: Vec<f32>,
    pub labels: Vec<u32>,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    pub global_size: usize,
    pub local_size: usize,
    pub batch_size: usize,
    pub n_global: usize,
    pub n_local: usize,
}

impl Batch {
    /// Global crop `g` of every sample: [batch_size][3][G][G].
    pub fn global_crop(&self, g: usize) -> &[f32] {
        let n = self.batch_size * 3 * self.global_size * self.global_size;
        &self.global[g * n..(g + 1) * n]
    }

    /// Local crop `l` of every sample: [batch_size][3][L][L].
    pub fn local_crop(&self, l: usize) -> &[f32] {
        let n = self.batch_size * 3 * self.local_size * self.local_size;
        &self.local[l * n..(l + 1) * n]
    }

    /// Shard `rank` of `ranks` equal shards: samples `rank * b..(rank + 1) * b` of every crop,
    /// `b = batch_size / ranks` (what rank `rank` of a data-parallel run trains on).
    pub fn shard(&self, rank: usize, ranks: usize) -> Result<Batch, DataError> {
        if ranks == 0 || rank >= ranks || !self.batch_size.is_multiple_of(ranks) {
            return Err(DataError::Config(format!(
                "a batch of {} cannot be split into {ranks} equal shards (shard {rank} asked)",
                self.batch_size
            )));
        }
        let b = self.batch_size / ranks;
        let take = |buf: &[f32], crops: usize| -> Vec<f32> {
            let per = buf.len() / (crops * self.batch_size).max(1);
            let mut out = Vec::with_capacity(crops * b * per);
            for c in 0..crops {
                let start = (c * self.batch_size + rank * b) * per;
                out.extend_from_slice(&buf[start..start + b * per]);
            }
            out
        };
        Ok(Batch {
            global: take(&self.global, self.n_global),
            local: take(&self.local, self.n_local),
            labels: self.labels[rank * b..(rank + 1) * b].to_vec(),
            indices: self.indices[rank * b..(rank + 1) * b].to_vec(),
            batch_size: b,
            ..*self
        })
    }
}

/// Everything a producer needs to build the batches of one epoch.
struct EpochJob {
    dataset: Arc<dyn Dataset>,
    crops: CropConfig,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    pool: Option<Arc<rayon::ThreadPool>>,
    /// `(rank, ranks)`: build only this rank's shard of each batch.
    shard: (usize, usize),
}

impl EpochJob {
    fn build(&self, i: usize, stop: &AtomicBool) -> Result<Batch, DataError> {
        let (rank, ranks) = self.shard;
        let b = self.batch_size / ranks;
        let first = i * self.batch_size + rank * b;
        let indices = &self.order[first..first + b];
        let c = &self.crops;
        let (gl, ll) = (c.global_len(), c.local_len());
        let mut global = vec![0.0f32; c.n_global * b * gl];
        let mut local = vec![0.0f32; c.n_local * b * ll];
        // Each sample's crops are disjoint slices of the crop-major batch buffers: workers write
        // straight into them.
        let mut slots: Vec<Vec<&mut [f32]>> = (0..b)
            .map(|_| Vec::with_capacity(c.n_global + c.n_local))
            .collect();
        for (buf, len) in [(&mut global, gl), (&mut local, ll)] {
            if len > 0 {
                for crop in buf.chunks_exact_mut(b * len) {
                    for (slot, piece) in slots.iter_mut().zip(crop.chunks_exact_mut(len)) {
                        slot.push(piece);
                    }
                }
            }
        }
        let work = |(&d, outs): (&usize, &mut Vec<&mut [f32]>)| -> Result<(), DataError> {
            if stop.load(Ordering::Relaxed) {
                return Err(DataError::Cancelled);
            }
            let img = self.dataset.load(d)?;
            let seed = derive_seed(&[self.seed, TAG_AUG, self.epoch, d as u64]);
            multi_crop_into(&img, c, seed, outs);
            Ok(())
        };
        let results: Vec<Result<(), DataError>> = match &self.pool {
            Some(pool) => pool.install(|| {
                indices
                    .par_iter()
                    .zip(slots.par_iter_mut())
                    .map(work)
                    .collect()
            }),
            None => indices.iter().zip(slots.iter_mut()).map(work).collect(),
        };
        drop(slots);
        // The first failure in batch order, whichever thread met it first.
        results
            .into_iter()
            .collect::<Result<Vec<()>, DataError>>()?;
        Ok(Batch {
            global,
            local,
            labels: indices
                .iter()
                .map(|&d| self.dataset.label(d) as u32)
                .collect(),
            indices: indices.to_vec(),
            global_size: c.global_size,
            local_size: c.local_size,
            batch_size: b,
            n_global: c.n_global,
            n_local: c.n_local,
        })
    }
}

/// Multi-crop training batches from a dataset (drop_last: a partial final batch is not produced).
pub struct Loader {
    dataset: Arc<dyn Dataset>,
    crops: CropConfig,
    batch_size: usize,
    seed: u64,
    workers: usize,
    prefetch: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
    shard: (usize, usize),
}

impl Loader {
    /// `workers`: decode/augment threads (0: inline in the caller, see the module note);
    /// `prefetch`: ready batches that may wait in the queue. A batch size of 0 gives empty epochs.
    /// The crop configuration is checked when an epoch starts (its first item is the error).
    pub fn new(
        dataset: Arc<dyn Dataset>,
        crops: CropConfig,
        batch_size: usize,
        seed: u64,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let pool = if workers > 0 {
            rayon::ThreadPoolBuilder::new()
                .num_threads(workers)
                .thread_name(|i| format!("dinovmf-data-{i}"))
                .build()
                .ok()
                .map(Arc::new)
        } else {
            None
        };
        Loader {
            dataset,
            crops,
            batch_size,
            seed,
            workers,
            prefetch,
            pool,
            shard: (0, 1),
        }
    }

    /// Builds only shard `rank` of `ranks` of every batch ([`Batch::shard`] of the whole one,
    /// decoding only its images): rank `rank` of a data-parallel run. The batch size stays the
    /// global one, so the epochs have the same batches.
    pub fn sharded(mut self, rank: usize, ranks: usize) -> Result<Self, DataError> {
        if ranks == 0 || rank >= ranks || !self.batch_size.is_multiple_of(ranks) {
            return Err(DataError::Config(format!(
                "a batch of {} cannot be split into {ranks} equal shards (rank {rank})",
                self.batch_size
            )));
        }
        self.shard = (rank, ranks);
        Ok(self)
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.dataset.len().checked_div(self.batch_size).unwrap_or(0)
    }

    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.dataset
    }

    pub fn crops(&self) -> &CropConfig {
        &self.crops
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The order in which epoch `epoch` visits the dataset.
    pub fn permutation(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(&[self.seed, TAG_PERM, epoch]));
        order.shuffle(&mut rng);
        order
    }

    fn job(&self, epoch: u64) -> EpochJob {
        EpochJob {
            dataset: Arc::clone(&self.dataset),
            crops: self.crops.clone(),
            batch_size: self.batch_size,
            seed: self.seed,
            epoch,
            order: self.permutation(epoch),
            pool: self.pool.clone(),
            shard: self.shard,
        }
    }

    /// Builds one batch synchronously (the same bits the epoch iterator yields for it).
    pub fn batch(&self, epoch: u64, i: usize) -> Result<Batch, DataError> {
        self.crops.validate()?;
        if i >= self.batches_per_epoch() {
            return Err(DataError::OutOfRange {
                index: i,
                len: self.batches_per_epoch(),
            });
        }
        self.job(epoch).build(i, &AtomicBool::new(false))
    }

    /// Batches `start_batch..batches_per_epoch()` of `epoch`, built ahead on the workers. After an
    /// error item the iterator ends.
    pub fn epoch(&self, epoch: u64, start_batch: usize) -> EpochIter {
        let end = self.batches_per_epoch();
        if let Err(e) = self.crops.validate() {
            return EpochIter(Prefetch::failed(e));
        }
        let job = Arc::new(self.job(epoch));
        let f = move |i: usize, stop: &AtomicBool| job.build(i, stop);
        EpochIter(if self.workers == 0 {
            Prefetch::inline(Box::new(f), start_batch, end)
        } else {
            Prefetch::spawn(f, start_batch, end, self.prefetch, "dinovmf-batches")
        })
    }
}

/// The batches of one epoch, in order; see [`Loader::epoch`].
pub struct EpochIter(Prefetch<Batch>);

impl Iterator for EpochIter {
    type Item = Result<Batch, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Evaluation batches: (images [B][3][size][size] normalised, labels), in dataset order, the last batch
/// possibly shorter. Built ahead on a producer thread using rayon's global pool.
pub struct EvalBatches(Prefetch<(Vec<f32>, Vec<u32>)>);

impl Iterator for EvalBatches {
    type Item = Result<(Vec<f32>, Vec<u32>), DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

/// Every sample of `dataset` through [`eval_transform`], `batch_size` at a time.
pub fn eval_batches(dataset: Arc<dyn Dataset>, size: usize, batch_size: usize) -> EvalBatches {
    let n = dataset.len();
    let batches = if batch_size == 0 {
        0
    } else {
        n.div_ceil(batch_size)
    };
    let f = move |i: usize, stop: &AtomicBool| {
        let range: Vec<usize> = (i * batch_size..((i + 1) * batch_size).min(n)).collect();
        let crops: Vec<Result<Vec<f32>, DataError>> = range
            .par_iter()
            .map(|&d| {
                if stop.load(Ordering::Relaxed) {
                    return Err(DataError::Cancelled);
                }
                Ok(eval_transform(&dataset.load(d)?, size))
            })
            .collect();
        let mut images = Vec::with_capacity(range.len() * 3 * size * size);
        for c in crops {
            images.extend_from_slice(&c?);
        }
        let labels = range.iter().map(|&d| dataset.label(d) as u32).collect();
        Ok((images, labels))
    };
    EvalBatches(Prefetch::spawn(f, 0, batches, 2, "dinovmf-eval"))
}

type Producer<T> = Box<dyn Fn(usize, &AtomicBool) -> Result<T, DataError> + Send + Sync>;

enum Mode<T> {
    Inline(Producer<T>),
    Threaded {
        rx: Option<Receiver<Result<T, DataError>>>,
        stop: Arc<AtomicBool>,
        handle: Option<JoinHandle<()>>,
    },
    Failed(Option<DataError>),
}

/// Items `next..end` of `f`, in order, either computed on demand or by a producer thread ahead of
/// the consumer. Ends after the first error.
struct Prefetch<T> {
    mode: Mode<T>,
    next: usize,
    end: usize,
}

impl<T: Send + 'static> Prefetch<T> {
    fn failed(e: DataError) -> Self {
        Prefetch {
            mode: Mode::Failed(Some(e)),
            next: 0,
            end: 0,
        }
    }

    fn inline(f: Producer<T>, start: usize, end: usize) -> Self {
        Prefetch {
            mode: Mode::Inline(f),
            next: start,
            end,
        }
    }

    fn spawn<F>(f: F, start: usize, end: usize, queue: usize, name: &str) -> Self
    where
        F: Fn(usize, &AtomicBool) -> Result<T, DataError> + Send + 'static,
    {
        let (tx, rx) = sync_channel(queue);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for i in start..end {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let item = f(i, &flag);
                    let failed = item.is_err();
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
            });
        match spawned {
            Ok(handle) => Prefetch {
                mode: Mode::Threaded {
                    rx: Some(rx),
                    stop,
                    handle: Some(handle),
                },
                next: start,
                end,
            },
            Err(e) => Prefetch::failed(DataError::Worker(format!("cannot start thread: {e}"))),
        }
    }
}

impl<T> Prefetch<T> {
    fn next(&mut self) -> Option<Result<T, DataError>> {
        let item = match &mut self.mode {
            Mode::Failed(e) => return e.take().map(Err),
            _ if self.next >= self.end => return None,
            Mode::Inline(f) => f(self.next, &AtomicBool::new(false)),
            Mode::Threaded { rx, handle, .. } => {
                match rx.as_ref().map(|r| r.recv()) {
                    Some(Ok(item)) => item,
                    _ => {
                        // The producer ended early: only a panic does that without sending an error.
                        self.end = self.next;
                        let msg = match handle.take().map(|h| h.join()) {
                            Some(Err(p)) => p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "panic".into()),
                            _ => "producer thread ended early".into(),
                        };
                        return Some(Err(DataError::Worker(msg)));
                    }
                }
            }
        };
        self.next += 1;
        if item.is_err() {
            self.end = self.next;
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match &self.mode {
            Mode::Failed(e) => {
                let n = usize::from(e.is_some());
                (n, Some(n))
            }
            _ => {
                let n = self.end.saturating_sub(self.next);
                (n, Some(n))
            }
        }
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        if let Mode::Threaded { rx, stop, handle } = &mut self.mode {
            stop.store(true, Ordering::Relaxed);
            drop(rx.take()); // a producer blocked in send() now gets an error
            if let Some(h) = handle.take() {
                let _ = h.join();
            }
        }
    }
}
