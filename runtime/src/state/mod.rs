//! What guarded steps remember between calls, per set of parameters: the last update's
//! unread parameters check, the losses of micro-batches not yet followed by an update, the
//! update counter and the consecutive skips.
//!
//! State belongs to the parameters being trained, not to the function: two models trained
//! through one guarded function (k-fold, a restart, two threads) never see each other's
//! verdicts. A set of parameters is recognised by where its first non-empty tensor's elements
//! live and its length ([`Key`]).

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tch::nn::Variables;
use tch::Tensor;

mod key;
mod saved;
pub(crate) use saved::{Import, SavedState, Unsaved};

pub(crate) use key::Key;

use crate::error::Origin;
use crate::flag::FiniteFlag;
use crate::report::Names;

/// A tensor bound by `let` in the step body, kept for the slow path of the `forward` check.
#[derive(Debug)]
pub(crate) struct Binding {
    pub name: &'static str,
    pub line: u32,
    pub kind: &'static str,
    pub value: Tensor,
}

/// A loss seen by the guard (before its backward), for naming the first non-finite one.
#[derive(Debug)]
pub(crate) struct LossRecord {
    pub value: Tensor,
    /// Source line of the `.backward()` / `backward_step` call (0 when unknown).
    pub line: u32,
    /// The loss expression as written (`"d_loss"`), empty when unknown.
    pub expr: &'static str,
    /// The call of the guarded function it came from.
    pub call: u64,
}

/// What a call observed (losses, forward bindings) and has not read yet.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub flag: FiniteFlag,
    pub losses: Vec<LossRecord>,
    pub bindings: Vec<Binding>,
}

impl Observed {
    pub(crate) fn is_empty(&self) -> bool {
        self.flag.is_empty()
    }

    /// The mean of the losses observed for an update (micro-batches included), 0-dim f64.
    pub(crate) fn mean_loss(&self) -> Option<Tensor> {
        let values: Vec<&Tensor> = self.losses.iter().map(|l| &l.value).collect();
        crate::values::mean_of(&values)
    }

    /// Keeps the losses' values without their autograd graphs (what is carried past the
    /// call that observed them).
    pub(crate) fn detach_losses(&mut self) {
        for l in &mut self.losses {
            if l.value.requires_grad() {
                l.value = crate::shim::detached(&l.value);
            }
        }
    }

    /// Appends what `other` observed (earlier micro-batches go first).
    pub(crate) fn absorb(&mut self, other: Observed) {
        self.flag.merge(other.flag);
        append(&mut self.losses, other.losses);
        append(&mut self.bindings, other.bindings);
    }
}

/// Appends `more` to `list`, taking `more` whole when `list` is empty (no copy, no allocation).
fn append<T>(list: &mut Vec<T>, mut more: Vec<T>) {
    if list.is_empty() {
        std::mem::swap(list, &mut more);
    } else {
        list.append(&mut more);
    }
}

/// The parameters check folded after an update and not read yet.
#[derive(Debug)]
pub(crate) struct Pending {
    pub flag: FiniteFlag,
    /// The same check on its way to the host (`sync = "deferred"`), instead of `flag`.
    pub early: Option<crate::flag::EarlyRead>,
    /// The parameters' version counters when `flag` was folded (`sync = "every_step"`).
    pub versions: Vec<i64>,
    /// Index of the update it checks.
    pub update: u64,
    /// The function and the call that made the update.
    pub origin: Origin,
    /// The updated parameters (shallow clones), to name the bad ones.
    pub params: Vec<Tensor>,
    /// Where their names are, when a `VarStore` was known (weak: a dropped model's state goes
    /// with it).
    pub vars: Vec<Weak<Mutex<Variables>>>,
}

/// The parameters' handles go in one call into the shim (a `Pending` is dropped at every update).
impl Drop for Pending {
    fn drop(&mut self) {
        crate::shim::release(std::mem::take(&mut self.params));
    }
}

impl Pending {
    pub(crate) fn names(&self) -> Names {
        names_of(&self.vars)
    }

    /// Whether this check already covers `params` as they are now: the same parameters (the
    /// update's key), none written since it was folded (their version counters unchanged), so
    /// checking them again before the next update would read the same values.
    pub(crate) fn covers(&self, params: &[Tensor]) -> bool {
        if self.versions.len() != params.len() {
            return false;
        }
        let (mut same, mut i) = (true, 0);
        crate::shim::versions(params, |v| {
            same &= v >= 0 && self.versions[i] == v;
            i += 1;
        });
        same
    }
}

/// The names of the variables of the `VarStore`s still alive.
pub(crate) fn names_of(vars: &[Weak<Mutex<Variables>>]) -> Names {
    let mut names = Names::default();
    for v in vars.iter().filter_map(Weak::upgrade) {
        let v = v.lock().unwrap_or_else(|e| e.into_inner());
        names.extend(Names::from_pairs(
            v.named_variables
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone())),
        ));
    }
    names
}

/// The verdict of an update under `sync = "deferred"`: handed to the optimizer as `found_inf`,
/// read (and explained) when the next update of the same parameters comes, or at `flush()`.
#[derive(Debug)]
pub(crate) struct DeferredVerdict {
    /// Parameters before the update, what the step observed (losses, bindings), the grads:
    /// on their way to the host.
    pub early: crate::flag::EarlyRead,
    pub obs: Observed,
    pub update: u64,
    pub origin: Origin,
    pub params: Vec<Tensor>,
    pub vars: Vec<Weak<Mutex<Variables>>>,
    /// Per-tensor grad norms kept on the device (the multi-tensor path), to name bad grads.
    pub grad_norms: Option<Tensor>,
    pub protected: Option<bool>,
    pub max_norm: Option<f64>,
    /// Loss scaling: the scale of the update (a copy) and the scaler's numbers.
    pub scale: Option<(Tensor, crate::amp::LossScale)>,
    /// Spike detection: the z-scores `[loss, norm]` and the threshold.
    pub spike: Option<(Tensor, f64)>,
    /// With a process group: every rank's verdicts and loss (reduced), this rank, and whether
    /// the verdicts came folded into the gradients' last bucket.
    pub ranks: Option<(Tensor, usize, bool)>,
}

/// The state of one set of parameters.
#[derive(Debug)]
pub(crate) struct ModelState {
    key: Key,
    /// The `VarStore` the parameters live in, when known: a dead one means the address was
    /// reused by another model, whose state starts afresh.
    alive: Option<Weak<Mutex<Variables>>>,
    /// Guarded updates attempted on these parameters (the next update's index).
    pub updates: u64,
    /// Calls in a row in which this optimizer's update was skipped.
    pub consecutive_skips: u32,
    /// The call whose skip was counted last (a call counts once, however many updates).
    pub last_skip_call: Option<u64>,
    pub pending: Option<Pending>,
    /// Observed in calls without an update (gradient accumulation), read at the next update.
    pub carried: Observed,
    /// The last update's verdict under `sync = "deferred"`, not read yet.
    pub deferred: Option<Box<DeferredVerdict>>,
    /// Spike detection: the running statistics of the loss and the grad norm.
    pub spike: Option<crate::spike::SpikeStats>,
    /// Rollback: the state of a good update.
    pub snapshot: Option<crate::rollback::Snapshot>,
    /// Rolled back, and no update has passed since.
    pub rolled_back: bool,
    /// A skip could not restore these parameters' buffers, and said so.
    pub buffers_noted: bool,
}

impl ModelState {
    fn new(key: Key) -> Self {
        ModelState {
            key,
            alive: None,
            updates: 0,
            consecutive_skips: 0,
            last_skip_call: None,
            pending: None,
            carried: Observed::default(),
            deferred: None,
            spike: None,
            snapshot: None,
            rolled_back: false,
            buffers_noted: false,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Models {
    /// Calls of the guarded function(s) using this state.
    pub calls: u64,
    list: Vec<ModelState>,
    /// Dynamic loss scaling: one scaler for every model of the state (as one GradScaler
    /// serves every optimizer of a training loop), created at the first scaled loss.
    pub scaler: Option<crate::amp::Scaler>,
}

impl Models {
    /// The state of `key`, created on first use. `vars`, when given, ties it to a `VarStore`.
    pub(crate) fn model(
        &mut self,
        key: Key,
        vars: Option<&Arc<Mutex<Variables>>>,
    ) -> &mut ModelState {
        // Models whose VarStore is gone: their state (a rollback snapshot, device memory) goes.
        let gone = |m: &ModelState| m.alive.as_ref().is_some_and(|w| w.strong_count() == 0);
        if self.list.iter().any(|m| m.key != key && gone(m)) {
            self.list.retain(|m| m.key == key || !gone(m));
        }
        let i = match self.list.iter().position(|m| m.key == key) {
            Some(i) => {
                let dead = self.list[i]
                    .alive
                    .as_ref()
                    .is_some_and(|w| w.strong_count() == 0);
                if dead {
                    self.list[i] = ModelState::new(key);
                }
                i
            }
            None => {
                self.list.push(ModelState::new(key));
                self.list.len() - 1
            }
        };
        let m = &mut self.list[i];
        if let (None, Some(v)) = (&m.alive, vars) {
            m.alive = Some(Arc::downgrade(v));
        }
        m
    }

    /// Takes `key`'s state out for an update (created on first use): the update works on its
    /// own copy and gives it back at once ([`Models::check_in`]). A placeholder stays meanwhile,
    /// where calls without an update carry what they observe.
    pub(crate) fn check_out(
        &mut self,
        key: Key,
        vars: Option<&Arc<Mutex<Variables>>>,
    ) -> ModelState {
        let m = self.model(key, vars);
        let placeholder = ModelState {
            alive: m.alive.clone(),
            ..ModelState::new(key)
        };
        std::mem::replace(m, placeholder)
    }

    /// Gives back an update's state ([`Models::check_out`]): what calls without an update
    /// observed meanwhile follows what the update kept. A model whose `VarStore` went away
    /// meanwhile is not brought back.
    pub(crate) fn check_in(&mut self, mut m: ModelState) {
        if let Some(slot) = self.list.iter_mut().find(|s| s.key == m.key) {
            m.carried.absorb(std::mem::take(&mut slot.carried));
            *slot = m;
        }
    }

    /// The parameters checks folded after an update and not read yet, of every model.
    pub(crate) fn pendings(&self) -> impl Iterator<Item = &Pending> {
        self.list.iter().filter_map(|m| m.pending.as_ref())
    }

    fn drain_pending(&mut self) -> Vec<(Key, Option<Pending>, Option<DeferredVerdict>)> {
        self.list
            .iter_mut()
            .map(|m| (m.key, m.pending.take(), m.deferred.take().map(|d| *d)))
            .filter(|(_, p, d)| p.is_some() || d.is_some())
            .collect()
    }

    /// Gives `key`'s parameters their pending check back (unless a newer one took its place).
    pub(crate) fn put_back_pending(&mut self, key: Key, p: Pending) {
        if let Some(m) = self.list.iter_mut().find(|m| m.key == key) {
            if m.pending.is_none() && m.deferred.is_none() {
                m.pending = Some(p);
            }
        }
    }
}

/// State carried from one guarded step to the next, per set of parameters: the parameters
/// check of the last update (read with the next update's single host read, or by
/// [`GuardState::flush`]), the losses of micro-batches not yet followed by an update,
/// update counters and consecutive skips.
///
/// Every `#[guarded_step]` function has one of its own; `state = <expr>` in the attribute
/// uses yours instead (a `GuardState` or a reference to one).
#[derive(Debug, Default)]
pub struct GuardState {
    inner: Mutex<Models>,
    /// Times the state was locked (see [`locks`]).
    #[cfg(feature = "test-hooks")]
    locks: std::sync::atomic::AtomicU64,
}

/// A state dropped with checks still pending (`state = ...` of the caller's, at the end of
/// training) reads them, and prints what failed: nothing is silently lost. The functions' own
/// states live in statics, which are never dropped: call [`flush`](crate::flush) at the end.
impl Drop for GuardState {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.has_pending() {
            return;
        }
        if let Err(e) = self.flush() {
            eprintln!("{e}\n  => found when a GuardState with pending checks was dropped");
        }
    }
}

impl GuardState {
    /// A fresh state.
    pub const fn new() -> Self {
        GuardState {
            inner: Mutex::new(Models {
                calls: 0,
                list: Vec::new(),
                scaler: None,
            }),
            #[cfg(feature = "test-hooks")]
            locks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Number of calls begun with this state (each may make several updates, or none).
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// The loss scale (`loss_scale = "dynamic"`) as last read with a step's check (`None`
    /// before the first scaled loss, or when scaling is off).
    pub fn loss_scale(&self) -> Option<f64> {
        self.lock().scaler.as_ref().and_then(|s| s.last_read)
    }

    /// The loss scale now: one host read (a wait for the device, on a GPU); for reports and
    /// plots, not for every step.
    pub fn read_loss_scale(&self) -> Option<f64> {
        let scale = self.lock().scaler.as_ref().map(crate::amp::Scaler::scale)?;
        let v = crate::sync::read_f64s(&scale.reshape([1])).ok()?[0];
        if let Some(s) = self.lock().scaler.as_mut() {
            s.last_read = Some(v);
        }
        Some(v)
    }

    /// Updates skipped because their grads overflowed at the loss scale (expected under
    /// dynamic loss scaling; not failures, not counted toward `max_skips`).
    pub fn overflow_skips(&self) -> u64 {
        self.lock().scaler.as_ref().map_or(0, |s| s.overflows)
    }

    /// Device memory held by rollback snapshots (`rollback = N`): one copy of each model's
    /// parameters, optimizer state (where the optimizer exposes it) and buffers.
    pub fn snapshot_bytes(&self) -> usize {
        self.lock()
            .list
            .iter()
            .filter_map(|m| m.snapshot.as_ref())
            .map(crate::rollback::Snapshot::bytes)
            .sum()
    }

    /// Whether an update's parameters check is still unread (see [`GuardState::flush`]).
    pub fn has_pending(&self) -> bool {
        self.lock()
            .list
            .iter()
            .any(|m| m.pending.is_some() || m.deferred.is_some())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Models> {
        #[cfg(feature = "test-hooks")]
        self.locks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pending parameters checks and deferred verdicts, taken out (read by
    /// [`GuardState::flush`]).
    pub(crate) fn take_pending(&self) -> Vec<(Key, Option<Pending>, Option<DeferredVerdict>)> {
        self.lock().drain_pending()
    }
}

/// How many times `state` was locked so far: a call locks it once when it begins, and each
/// update once to take its parameters' state and once to give it back with everything the
/// update changed.
#[cfg(feature = "test-hooks")]
pub fn locks(state: &GuardState) -> u64 {
    state.locks.load(std::sync::atomic::Ordering::Relaxed)
}
