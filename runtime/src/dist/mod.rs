//! Data-parallel training on PyTorch's c10d, the engine of `torch.distributed` and DDP, which
//! the libtorch of every tch program already contains.
//!
//! A [`ProcessGroup`] comes from the standard environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`, as `torchrun` sets them): rank 0 serves c10d's TCPStore, every
//! rank joins it, and Gloo carries the collectives of CPU tensors. Without those variables (a
//! plain `cargo run`) the world is one process: no network, every collective a no-op
//! (`STEPGUARD_DIST_C10D=1` keeps c10d for a world of one: one GPU through NCCL).
//!
//! ```no_run
//! use stepguard::dist::{DataParallel, ProcessGroup};
//! use tch::nn::{self, Module, OptimizerConfig};
//!
//! let pg = ProcessGroup::from_env()?;
//! let vs = nn::VarStore::new(pg.device());
//! let net = nn::linear(vs.root() / "l", 4, 1, Default::default());
//! let ddp = DataParallel::new(&pg, &vs)?; // rank 0's parameters and buffers everywhere
//! let mut opt = nn::Sgd::default().build(&vs, 0.1).unwrap();
//! # let (x, y) = (tch::Tensor::zeros([2, 4], tch::kind::FLOAT_CPU), tch::Tensor::zeros([2, 1], tch::kind::FLOAT_CPU));
//! // Each rank: its own shard of the batch.
//! opt.zero_grad();
//! net.forward(&x).mse_loss(&y, tch::Reduction::Mean).backward();
//! ddp.average_gradients()?; // one all-reduce per bucket of gradients
//! opt.step();
//! # Ok::<(), stepguard::dist::DistError>(())
//! ```
//!
//! Launch: `torchrun --nproc-per-node 2 --no-python target/release/examples/ddp` (the binary
//! under `$CARGO_TARGET_DIR` when that is set).
//!
//! Every wait is bounded: the rendezvous as a whole and each collective end after the group's
//! timeout ([`Launch::timeout`], `STEPGUARD_DIST_TIMEOUT` seconds, default 10 minutes, at most
//! [`MAX_TIMEOUT`]) with a [`DistError::Unreachable`] naming the rank(s) that did not answer
//! (the rendezvous within the timeout and half a second, whatever the store does); a peer that
//! exits or is killed is noticed as soon as its connection closes.
//!
//! CUDA tensors go through NCCL where stepguard was built with it ([`ProcessGroup::has_nccl`]:
//! the NCCL and CUDA toolkit headers were found at build time); that path has not been run on a
//! GPU yet.

mod bucket;
mod env;
mod error;
#[allow(unsafe_code)]
mod ffi;
pub(crate) mod fold;
mod parallel;
mod rendezvous;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tch::{Device, Tensor};

pub use bucket::DEFAULT_BUCKET_BYTES;
pub use env::{Launch, DEFAULT_TIMEOUT, MAX_TIMEOUT};
pub use error::{DistError, Missing};
pub use parallel::DataParallel;

/// The reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// The sum over ranks.
    Sum,
    /// The maximum over ranks (for flags: "seen on any rank").
    Max,
    /// The minimum over ranks.
    Min,
}

/// A group of processes that run the same program on shards of the data.
///
/// Clones share the one c10d group. Collectives must be called in the same order on every rank.
#[derive(Debug, Clone)]
pub struct ProcessGroup {
    launch: Launch,
    /// `None` for a world of one.
    group: Option<Arc<Shared>>,
}

/// What the clones of a group share: the c10d group, and the number of collectives issued.
#[derive(Debug)]
struct Shared {
    group: Mutex<ffi::Group>,
    collectives: AtomicU64,
    /// More than one rank (counted in [`SHARED_WORLDS`] while alive).
    shared: bool,
}

/// Groups of more than one rank alive in this process.
static SHARED_WORLDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Shared {
    fn drop(&mut self) {
        if self.shared {
            SHARED_WORLDS.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Whether a process group of more than one rank is alive in this process: a guarded call
/// without `group = ..` is then not replayed (its ranks do not agree on its failure, so a
/// replay's collectives would not match theirs).
pub(crate) fn ranks_alive() -> bool {
    SHARED_WORLDS.load(Ordering::Relaxed) > 0
}

impl ProcessGroup {
    /// A world of one process without c10d: every collective is a no-op.
    pub fn single() -> Self {
        ProcessGroup {
            launch: Launch::single(),
            group: None,
        }
    }

    /// The group of the launch environment ([`Launch::from_env`]); blocks until every rank has
    /// joined, or the timeout ran out.
    pub fn from_env() -> Result<Self, DistError> {
        Self::new(Launch::from_env()?)
    }

    /// The group of `launch`; blocks until every rank has joined, or the timeout ran out. A
    /// timeout longer than [`MAX_TIMEOUT`] is cut to it.
    pub fn new(launch: Launch) -> Result<Self, DistError> {
        let launch = Launch {
            timeout: launch.timeout.min(MAX_TIMEOUT),
            ..launch
        };
        if launch.world_size == 1 && !launch.c10d {
            return Ok(ProcessGroup {
                launch,
                group: None,
            });
        }
        let group = rendezvous::join(&launch)?;
        let shared = launch.world_size > 1;
        if shared {
            SHARED_WORLDS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(ProcessGroup {
            launch,
            group: Some(Arc::new(Shared {
                group: Mutex::new(group),
                collectives: AtomicU64::new(0),
                shared,
            })),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.launch.rank
    }

    /// The number of processes.
    pub fn world_size(&self) -> usize {
        self.launch.world_size
    }

    /// The rank on this machine.
    pub fn local_rank(&self) -> usize {
        self.launch.local_rank
    }

    /// How long the collectives wait for the other ranks.
    pub fn timeout(&self) -> Duration {
        self.launch.timeout
    }

    /// Whether this is rank 0 (the one to log and save checkpoints).
    pub fn is_main(&self) -> bool {
        self.launch.rank == 0
    }

    /// The device for this process's model: `cuda:LOCAL_RANK` where CUDA is available and this
    /// build has NCCL (or the world is one process), else the CPU.
    pub fn device(&self) -> Device {
        let cuda = tch::Cuda::device_count() as usize;
        if cuda > self.launch.local_rank && (self.group.is_none() || Self::has_nccl()) {
            Device::Cuda(self.launch.local_rank)
        } else {
            Device::Cpu
        }
    }

    /// The number of collectives (all-reduces, broadcasts, barriers) this process has issued on
    /// this group and its clones: always 0 for a world of one.
    pub fn collectives(&self) -> u64 {
        self.group
            .as_ref()
            .map_or(0, |s| s.collectives.load(Ordering::Relaxed))
    }

    /// The identity of the c10d group (shared by clones); `None` for a world of one.
    pub(crate) fn id(&self) -> Option<usize> {
        self.group.as_ref().map(|s| Arc::as_ptr(s) as usize)
    }

    /// Whether this build has the NCCL backend for CUDA tensors (its headers were found when
    /// stepguard was compiled). Without it, CUDA tensors in a world of more than one are an error.
    pub fn has_nccl() -> bool {
        ffi::has_nccl()
    }

    fn with_group<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&ffi::Group) -> Result<T, ffi::Error>,
    ) -> Result<Option<T>, DistError> {
        let Some(shared) = &self.group else {
            return Ok(None);
        };
        shared.collectives.fetch_add(1, Ordering::Relaxed);
        // A panic while the lock was held cannot leave the C++ group half-updated.
        let g = shared.group.lock().unwrap_or_else(PoisonError::into_inner);
        f(&g).map(Some).map_err(|e| {
            error::from_c10d(
                e.kind,
                e.text,
                op,
                self.launch.rank,
                self.launch.world_size,
                self.launch.timeout,
            )
        })
    }

    fn failed(&self, op: &'static str, detail: impl Into<String>) -> DistError {
        DistError::Failed {
            op,
            rank: self.launch.rank,
            detail: detail.into(),
        }
    }

    /// A failed tensor operation during `op`.
    fn tch_failed(&self, op: &'static str) -> impl Fn(tch::TchError) -> DistError {
        let rank = self.launch.rank;
        move |e| error::from_tch(e, op, rank)
    }

    /// Reduces `t` over every rank, in place: one collective, whatever its size (the guard's
    /// flags and statistics travel this way). Floating or integer dtypes; a non-contiguous `t`
    /// goes through a contiguous copy. A NaN propagates through `Sum`; through `Max` and `Min`
    /// it is not guaranteed to: reduce 0/1 flags, not the values themselves.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<(), DistError> {
        if self.group.is_none() {
            return Ok(());
        }
        if !t.defined() || t.is_sparse() {
            return Err(self.failed("all_reduce", "an undefined or sparse tensor"));
        }
        let code = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        };
        let _no_grad = tch::no_grad_guard();
        if t.is_contiguous() {
            self.with_group("all_reduce", |g| g.all_reduce(t, code))?;
        } else {
            let failed = self.tch_failed("all_reduce");
            let c = t.f_contiguous().map_err(&failed)?;
            self.with_group("all_reduce", |g| g.all_reduce(&c, code))?;
            t.shallow_clone().f_copy_(&c).map_err(failed)?;
        }
        Ok(())
    }

    /// Replaces `t` by rank `root`'s, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        if self.group.is_none() {
            return Ok(());
        }
        if root >= self.world_size() {
            return Err(self.failed("broadcast", format!("root rank {root} out of range")));
        }
        if !t.defined() || t.is_sparse() {
            return Err(self.failed("broadcast", "an undefined or sparse tensor"));
        }
        let _no_grad = tch::no_grad_guard();
        if t.is_contiguous() {
            self.with_group("broadcast", |g| g.broadcast(t, root))?;
        } else {
            let failed = self.tch_failed("broadcast");
            let c = t.f_contiguous().map_err(&failed)?;
            self.with_group("broadcast", |g| g.broadcast(&c, root))?;
            t.shallow_clone().f_copy_(&c).map_err(failed)?;
        }
        Ok(())
    }

    /// Waits until every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.with_group("barrier", |g| g.barrier()).map(|_| ())
    }

    /// Replaces every tensor by rank 0's, in buckets of at most `bucket_bytes` per (device,
    /// dtype): one broadcast per bucket. Dense tensors only: an undefined or sparse one is an
    /// error before any collective.
    pub fn broadcast_tensors(&self, ts: &[Tensor], bucket_bytes: usize) -> Result<(), DistError> {
        if self.group.is_none() {
            return Ok(());
        }
        if ts.iter().any(|t| !t.defined() || t.is_sparse()) {
            return Err(self.failed("broadcast", "an undefined or sparse tensor"));
        }
        let _no_grad = tch::no_grad_guard();
        let failed = self.tch_failed("broadcast");
        for b in bucket::plan(ts, bucket_bytes) {
            let flat = bucket::flatten(ts, &b).map_err(&failed)?;
            self.broadcast(&flat, 0)?;
            bucket::unflatten(ts, &b, &flat).map_err(&failed)?;
        }
        Ok(())
    }

    /// Replaces every tensor by its mean over the ranks, in buckets of at most `bucket_bytes` per
    /// (device, dtype): one all-reduce (sum) per bucket, then one division by the world size.
    /// The result is bitwise the same on every rank. Dense floating tensors only: any other is
    /// an error before any collective, every tensor left as it was.
    pub fn average_tensors(&self, ts: &[Tensor], bucket_bytes: usize) -> Result<(), DistError> {
        if self.group.is_none() {
            return Ok(());
        }
        let problem = |t: &Tensor| {
            if !t.defined() {
                Some("an undefined")
            } else if t.is_sparse() {
                Some("a sparse")
            } else if !matches!(t.f_is_floating_point(), Ok(true)) {
                Some("a non-floating")
            } else {
                None
            }
        };
        if let Some(what) = ts.iter().find_map(problem) {
            return Err(self.failed("average", format!("{what} tensor cannot be averaged")));
        }
        let _no_grad = tch::no_grad_guard();
        let world = self.world_size() as f64;
        let failed = self.tch_failed("average");
        for b in bucket::plan(ts, bucket_bytes) {
            let mut flat = bucket::flatten(ts, &b).map_err(&failed)?;
            self.all_reduce(&flat, ReduceOp::Sum)?;
            let _ = flat.f_div_scalar_(world).map_err(&failed)?;
            bucket::unflatten(ts, &b, &flat).map_err(&failed)?;
        }
        Ok(())
    }

    /// Replaces every variable of `vs` (parameters and buffers) by rank 0's, in buckets (by
    /// name, so the order is the same on every rank).
    pub fn broadcast_from_rank0(&self, vs: &tch::nn::VarStore) -> Result<(), DistError> {
        let ts: Vec<Tensor> = parallel::by_name(vs.variables())
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        self.broadcast_tensors(&ts, DEFAULT_BUCKET_BYTES)
    }
}
