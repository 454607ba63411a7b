//! What `#[guarded_step]` needs from an optimizer, and where parameters and names come from.

use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

use crate::report::Names;

/// Where the parameters' names come from, consulted only when a check fails.
pub trait NameSource {
    /// The names.
    fn names(&self) -> Names;
    /// Parameters beyond the step's own that the slow path should also scan (e.g. every
    /// variable of the named `VarStore`s, to tell corrupted inputs from a bad update).
    fn extra_params(&self) -> Vec<Tensor> {
        Vec::new()
    }
    /// The `VarStore`s behind the names, if any (kept with a pending check to name it later).
    #[doc(hidden)]
    fn var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        Vec::new()
    }
}

impl NameSource for tch::nn::VarStore {
    fn names(&self) -> Names {
        Names::from_var_store(self)
    }
    fn var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        vec![self.variables_.clone()]
    }
}

impl NameSource for Names {
    fn names(&self) -> Names {
        self.clone()
    }
}

impl<T: NameSource + ?Sized> NameSource for &T {
    fn names(&self) -> Names {
        (**self).names()
    }
    fn extra_params(&self) -> Vec<Tensor> {
        (**self).extra_params()
    }
    fn var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        (**self).var_stores()
    }
}

/// An optimizer whose steps `#[guarded_step]` can guard.
///
/// Implemented for [`tch::nn::Optimizer`]; implement it for your own optimizer and the
/// attribute guards `opt.step()`, `opt.backward_step(&loss)`, ... on it like on tch's.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an optimizer that `#[guarded_step]` can guard",
    label = "`{Self}` does not implement `stepguard::optim::GuardedOptimizer`",
    note = "implement `stepguard::optim::GuardedOptimizer` for it (guard_params, guard_zero_grad, guard_step)"
)]
pub trait GuardedOptimizer {
    /// The parameters this optimizer updates (shallow clones).
    fn guard_params(&self) -> Vec<Tensor>;
    /// Sets their gradients to zero.
    fn guard_zero_grad(&mut self);
    /// Applies one update.
    fn guard_step(&mut self);
    /// Applies one update, or returns the error that refused it with nothing changed (what a
    /// guarded `backward_step` calls, so that a refused step is the step's error and not a
    /// panic). The default calls [`GuardedOptimizer::guard_step`].
    ///
    /// # Errors
    /// The optimizer's own, when it refuses the update.
    fn guard_try_step(&mut self) -> Result<(), crate::TorchError> {
        self.guard_step();
        Ok(())
    }
    /// The optimizer's state tensors (momentum buffers, moments, step counters), which
    /// `rollback = N` saves and restores with the parameters. The default is none: a rollback
    /// then restores parameters and buffers only (tch's `nn::Optimizer` does not expose its
    /// state; `stepguard::optim`'s optimizers do).
    fn guard_state(&self) -> Vec<Tensor> {
        Vec::new()
    }
    /// Clamps every gradient to `[-max, max]` (for `backward_step_clip`).
    fn guard_clip_grad_value(&mut self, max: f64) {
        let _guard = tch::no_grad_guard();
        for p in self.guard_params() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.clamp_(-max, max);
            }
        }
    }
}

impl GuardedOptimizer for tch::nn::Optimizer {
    fn guard_params(&self) -> Vec<Tensor> {
        self.trainable_variables()
    }
    fn guard_zero_grad(&mut self) {
        self.zero_grad()
    }
    fn guard_step(&mut self) {
        self.step()
    }
    fn guard_clip_grad_value(&mut self, max: f64) {
        self.clip_grad_value(max)
    }
}

/// An optimizer that can skip a step on the device: what `#[guarded_step(sync = "deferred")]`
/// needs, since it hands the verdict to the optimizer instead of reading it first.
/// Implemented by the fused optimizers of `stepguard::optim`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot skip a step on the device, which `sync = \"deferred\"` needs",
    label = "`{Self}` does not implement `stepguard::optim::DeviceSkipOptimizer`",
    note = "use a fused optimizer: `stepguard::optim::AdamW::default().build(&vs, lr)` (or `Adam`, `Sgd`), a one-line switch from tch's; or keep `sync = \"every_step\"` (the default)"
)]
pub trait DeviceSkipOptimizer: GuardedOptimizer {
    /// One step whose gradients are divided by `grad_scale` and that leaves everything as it
    /// was when `found_inf` (a 0-dim tensor) is non-zero, without a host read.
    fn guard_step_on_device(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor);
    /// [`DeviceSkipOptimizer::guard_step_on_device`], or the error that refused it with
    /// nothing changed. The default calls it.
    ///
    /// # Errors
    /// The optimizer's own, when it refuses the update.
    fn guard_try_step_on_device(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: &Tensor,
    ) -> Result<(), crate::TorchError> {
        self.guard_step_on_device(grad_scale, found_inf);
        Ok(())
    }
}

macro_rules! forward_optimizer {
    ($($t:ty),*) => {$(
        impl<T: GuardedOptimizer + ?Sized> GuardedOptimizer for $t {
            fn guard_params(&self) -> Vec<Tensor> {
                (**self).guard_params()
            }
            fn guard_zero_grad(&mut self) {
                (**self).guard_zero_grad()
            }
            fn guard_step(&mut self) {
                (**self).guard_step()
            }
            fn guard_try_step(&mut self) -> Result<(), crate::TorchError> {
                (**self).guard_try_step()
            }
            fn guard_state(&self) -> Vec<Tensor> {
                (**self).guard_state()
            }
            fn guard_clip_grad_value(&mut self, max: f64) {
                (**self).guard_clip_grad_value(max)
            }
        }
        impl<T: DeviceSkipOptimizer + ?Sized> DeviceSkipOptimizer for $t {
            fn guard_step_on_device(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor) {
                (**self).guard_step_on_device(grad_scale, found_inf)
            }
            fn guard_try_step_on_device(
                &mut self,
                grad_scale: Option<&Tensor>,
                found_inf: &Tensor,
            ) -> Result<(), crate::TorchError> {
                (**self).guard_try_step_on_device(grad_scale, found_inf)
            }
        }
    )*};
}

// `opt` passed on (`&mut opt`, a boxed optimizer), `self.opt.borrow_mut().step()`,
// `opt.lock().unwrap().step()`.
forward_optimizer!(
    &mut T,
    Box<T>,
    std::cell::RefMut<'_, T>,
    std::sync::MutexGuard<'_, T>,
    std::sync::RwLockWriteGuard<'_, T>
);

/// Where a step's parameters (and their names) come from: `params = ...` in the attribute,
/// and every `VarStore` argument of the guarded function.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot serve as `params = ...` of `#[guarded_step]`",
    note = "use a `tch::nn::VarStore`, a `tch::nn::Optimizer`, or a `Vec<Tensor>`/`[Tensor]` of parameters"
)]
pub trait ParamSource {
    /// The parameters.
    fn guard_params(&self) -> Vec<Tensor>;
    /// Their names (empty when the source has none).
    fn guard_names(&self) -> Names;
    /// The `VarStore` they live in, if any (its buffers are restored when a step is skipped).
    #[doc(hidden)]
    fn guard_var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        Vec::new()
    }
}

impl ParamSource for tch::nn::VarStore {
    fn guard_params(&self) -> Vec<Tensor> {
        self.trainable_variables()
    }
    fn guard_names(&self) -> Names {
        Names::from_var_store(self)
    }
    fn guard_var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        vec![self.variables_.clone()]
    }
}

impl ParamSource for Tensor {
    fn guard_params(&self) -> Vec<Tensor> {
        vec![self.shallow_clone()]
    }
    fn guard_names(&self) -> Names {
        Names::default()
    }
}

impl ParamSource for tch::nn::Optimizer {
    fn guard_params(&self) -> Vec<Tensor> {
        self.trainable_variables()
    }
    fn guard_names(&self) -> Names {
        Names::default()
    }
}

impl<T: ParamSource> ParamSource for [T] {
    fn guard_params(&self) -> Vec<Tensor> {
        self.iter().flat_map(ParamSource::guard_params).collect()
    }
    fn guard_names(&self) -> Names {
        let mut all = Names::default();
        for s in self {
            all.extend(s.guard_names());
        }
        all
    }
    fn guard_var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        self.iter()
            .flat_map(ParamSource::guard_var_stores)
            .collect()
    }
}

/// Sources that are another source: arrays and vectors their slice, references what they
/// point to (`$to` gives the source they are).
macro_rules! delegated_source {
    ($($ty:ty => [$($generics:tt)*] $to:path),*) => {$(
        impl<$($generics)*> ParamSource for $ty {
            fn guard_params(&self) -> Vec<Tensor> {
                $to(self).guard_params()
            }
            fn guard_names(&self) -> Names {
                $to(self).guard_names()
            }
            fn guard_var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
                $to(self).guard_var_stores()
            }
        }
    )*};
}

fn items<T, C: AsRef<[T]>>(c: &C) -> &[T] {
    c.as_ref()
}

fn target<R: std::ops::Deref>(r: &R) -> &R::Target {
    r
}

delegated_source!(
    [T; N] => [T: ParamSource, const N: usize] items,
    Vec<T> => [T: ParamSource] items,
    &T => [T: ParamSource + ?Sized] target,
    &mut T => [T: ParamSource + ?Sized] target
);

/// The names of several sources together.
pub(crate) struct Sources<'a>(pub &'a [&'a dyn ParamSource]);

impl NameSource for Sources<'_> {
    fn names(&self) -> Names {
        let mut all = Names::default();
        for s in self.0 {
            all.extend(s.guard_names());
        }
        all
    }
    fn extra_params(&self) -> Vec<Tensor> {
        dedup(self.0.iter().flat_map(|s| s.guard_params()))
    }
    fn var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        let mut all: Vec<Arc<Mutex<Variables>>> = Vec::new();
        for s in self.0 {
            let more = s.guard_var_stores();
            if all.is_empty() {
                all = more;
            } else {
                all.extend(more);
            }
        }
        // Each once, where it first appears.
        let mut i = 0;
        while i < all.len() {
            if all[..i].iter().any(|a| Arc::ptr_eq(a, &all[i])) {
                all.remove(i);
            } else {
                i += 1;
            }
        }
        all
    }
}

/// `params` without repeats (the same tensor reached through two sources counts once).
pub(crate) fn dedup(params: impl IntoIterator<Item = Tensor>) -> Vec<Tensor> {
    let mut seen = std::collections::HashSet::new();
    params
        .into_iter()
        .filter(|p| !p.defined() || seen.insert(p.data_ptr() as usize))
        .collect()
}

impl<A: ParamSource, B: ParamSource> ParamSource for (A, B) {
    fn guard_params(&self) -> Vec<Tensor> {
        let mut v = self.0.guard_params();
        v.extend(self.1.guard_params());
        v
    }
    fn guard_names(&self) -> Names {
        let mut n = self.0.guard_names();
        n.extend(self.1.guard_names());
        n
    }
    fn guard_var_stores(&self) -> Vec<Arc<Mutex<Variables>>> {
        let mut v = self.0.guard_var_stores();
        v.extend(self.1.guard_var_stores());
        v
    }
}
