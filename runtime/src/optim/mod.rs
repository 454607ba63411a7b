//! Fused optimizers: SGD, Adam and AdamW on PyTorch's fused kernels (`_fused_sgd_`,
//! `_fused_adam_`, `_fused_adamw_`, through the ATen shim), built from a `VarStore` the way tch's
//! `nn::Adam` is, so switching is one line:
//!
//! ```no_run
//! use tch::nn;
//! let vs = nn::VarStore::new(tch::Device::Cpu);
//! // let mut opt = nn::Adam::default().build(&vs, 1e-3)?;
//! let mut opt = stepguard::optim::Adam::default().build(&vs, 1e-3)?;
//! # Ok::<(), tch::TchError>(())
//! ```
//!
//! One kernel launch per (group, device, dtype) instead of a loop over parameters, numbers equal
//! to PyTorch's `fused=True` optimizers (tested against fixtures PyTorch wrote), and a step that
//! can be skipped on the device: [`FusedOptimizer::step_with`] takes a `found_inf` tensor and
//! leaves params, every moment buffer and the step counters bitwise untouched when it is
//! non-zero, with no host read. Buffers created lazily are right even when the first step is
//! skipped (PyTorch 2.11's fused SGD leaves its momentum buffer uninitialised then).
//!
//! The state follows its parameter: after `vs.double()`, `vs.half()` or `vs.set_device(..)`
//! the next step casts the moments and momentum buffers to the parameter's dtype and device (the
//! step counters stay f32, on its device), as PyTorch's `Optimizer.load_state_dict` casts them,
//! and converts a grad left in the old dtype or on the old device, as PyTorch's `Module.to`
//! converts `.grad` (so does [`FusedOptimizer::zero_grad`]).
//!
//! Sparse grads (an `nn::embedding` with `sparse: true`): [`Sgd`] without momentum and weight
//! decay steps them as torch.optim.SGD does, `param.add_(grad, -lr)`, outside the fused kernels;
//! [`Adam`], [`AdamW`] and [`Sgd`] with momentum or weight decay refuse them with an error naming
//! the parameter, before anything changes (torch.optim.Adam and AdamW refuse them too, and
//! torch.optim.SGD refuses them with weight decay).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tch::nn::{VarStore, Variables};
use tch::{Kind, TchError, Tensor};

use crate::shim::{self, AdamStep, FusedLists, SgdStep};

mod checkpoint;
mod config;
mod follow;
mod plan;
mod sparse;

pub use crate::sources::{DeviceSkipOptimizer, GuardedOptimizer};
use config::check;
pub use config::{Adam, AdamW, Sgd};

#[derive(Debug, Clone, Copy)]
enum Algo {
    Sgd(Sgd),
    Adam(Adam, bool),
}

/// The per-parameter state, created at the parameter's first step.
#[derive(Debug)]
struct State {
    /// Momentum buffer (SGD) or first moment (Adam).
    first: Tensor,
    /// Second moment (Adam).
    second: Option<Tensor>,
    /// Running maximum of the second moment (AMSGrad).
    max: Option<Tensor>,
    /// Step counter, an f32 0-dim tensor on the parameter's device (Adam).
    step: Option<Tensor>,
}

/// A fused optimizer over a `VarStore`'s trainable variables (parameter groups as tch's:
/// `vs.root().set_group(g)`), implementing [`GuardedOptimizer`] and [`DeviceSkipOptimizer`].
#[derive(Debug)]
pub struct FusedOptimizer {
    algo: Algo,
    vars: Arc<Mutex<Variables>>,
    lrs: BTreeMap<usize, f64>,
    default_lr: f64,
    state: Vec<Option<State>>,
    /// SGD with momentum: whether a step (of any parameter) has certainly been applied, and the
    /// `found_inf` of a first step whose outcome only the device knows.
    sgd_started: bool,
    sgd_first_verdict: Option<Tensor>,
}

impl FusedOptimizer {
    fn new(algo: Algo, vs: &VarStore, lr: f64) -> Result<Self, TchError> {
        check("lr", lr)?;
        Ok(FusedOptimizer {
            algo,
            vars: vs.variables_.clone(),
            lrs: BTreeMap::new(),
            default_lr: lr,
            state: Vec::new(),
            sgd_started: false,
            sgd_first_verdict: None,
        })
    }

    /// Sets the learning rate of every group.
    pub fn set_lr(&mut self, lr: f64) {
        self.default_lr = lr;
        self.lrs.clear();
    }

    /// Sets the learning rate of one parameter group.
    pub fn set_lr_group(&mut self, group: usize, lr: f64) {
        self.lrs.insert(group, lr);
    }

    fn lr(&self, group: usize) -> f64 {
        self.lrs.get(&group).copied().unwrap_or(self.default_lr)
    }

    /// The trainable variables, with their groups.
    fn trainable(&self) -> Vec<(Tensor, usize)> {
        let v = self.vars.lock().unwrap_or_else(|e| e.into_inner());
        v.trainable_variables
            .iter()
            .map(|t| (t.tensor.shallow_clone(), t.group))
            .collect()
    }

    /// The parameters (shallow clones).
    pub fn params(&self) -> Vec<Tensor> {
        self.trainable().into_iter().map(|(t, _)| t).collect()
    }

    /// Sets every parameter's gradient to zero, of the parameter's dtype and on its device: a
    /// grad left in another dtype or on another device by `vs.double()` or `vs.set_device(..)`
    /// (which convert the variables, not their grads) follows its parameter, as PyTorch's
    /// `Module.to` converts `.grad`, and the next backward pass accumulates into it there.
    pub fn zero_grad(&mut self) {
        let _guard = tch::no_grad_guard();
        for p in self.params() {
            let mut g = p.grad();
            if g.defined() {
                // A grad that cannot be converted is zeroed where it is.
                let _ = follow::align_grad(&p);
                let _ = g.f_detach_();
                let _ = g.f_zero_();
            }
        }
    }

    /// One step (parameters without a gradient are left alone); panics with the error, like
    /// tch's `Optimizer::step` (see [`FusedOptimizer::try_step`], which returns it).
    pub fn step(&mut self) {
        or_panic(self.try_step())
    }

    /// One step ([`FusedOptimizer::step_with`] without a scale or a skip).
    ///
    /// # Errors
    /// Those of [`FusedOptimizer::step_with`]; such a step changes nothing.
    pub fn try_step(&mut self) -> Result<(), TchError> {
        self.step_with(None, None)
    }

    /// One step whose gradients are divided by `grad_scale` inside the kernel (and written back
    /// so), and that is skipped on the device when `found_inf` (a 0-dim tensor) is non-zero:
    /// params, moments and step counters then stay bitwise as they were, without a host read
    /// (parameters with sparse grads: one host read of `found_inf`).
    ///
    /// The state follows its parameter: when a parameter's dtype or device changed since its
    /// state was created (`vs.double()`, `vs.set_device(..)`), the state is cast to it as
    /// PyTorch's `load_state_dict` casts it, and a grad of another dtype or device than its
    /// parameter is converted to the parameter's, in place, first. Sparse grads: see
    /// [`crate::optim`].
    ///
    /// # Errors
    /// Parameters of a dtype the fused kernels do not take (they take f16, bf16, f32 and f64),
    /// a sparse grad this optimizer does not take, a grad or a state of other sizes than its
    /// parameter's, or what libtorch reports. A step refused so changes nothing: everything is
    /// checked before the first kernel runs, state created or cast for the step is kept only
    /// once the step has run, and the step counters are written only after their kernel
    /// succeeded. (An error libtorch raises only while a kernel runs, such as running out of
    /// memory, can still stop a step after an earlier bucket.)
    pub fn step_with(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: Option<&Tensor>,
    ) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let trainable = self.trainable();
        let plan = self.plan(&trainable)?;
        let (is_first_step, sgd_next) = self.sgd_first_step(found_inf)?;
        // The sparse step has no device-side skip: it reads the verdict.
        let skip_sparse = match found_inf {
            Some(f) if plan.has_sparse() => crate::sync::read_f64s(&f.f_reshape([1])?)?[0] != 0.0,
            _ => false,
        };
        // Nothing has changed so far.
        for &i in &plan.stray_grads {
            follow::align_grad(&trainable[i].0)?;
        }
        let state_of = |i: usize| -> Option<&State> {
            plan.pending
                .get(&i)
                .or_else(|| self.state.get(i).and_then(Option::as_ref))
        };
        for (bucket, idx) in &plan.buckets {
            let lr = self.lr(bucket.group);
            let device = trainable[idx[0]].0.device();
            let on = |t: Option<&Tensor>| -> Result<Option<Tensor>, TchError> {
                t.map(|t| t.f_to_device(device)?.f_to_kind(Kind::Float))
                    .transpose()
            };
            let params: Vec<Tensor> = idx
                .iter()
                .map(|&i| trainable[i].0.shallow_clone())
                .collect();
            if bucket.sparse {
                if !skip_sparse {
                    sparse::step(&params, lr, on(grad_scale)?.as_ref())?;
                }
                continue;
            }
            let (scale, inf) = (on(grad_scale)?, on(found_inf)?);
            let grads: Vec<Tensor> = params.iter().map(Tensor::grad).collect();
            let st = |f: fn(&State) -> Option<&Tensor>| -> Vec<Tensor> {
                idx.iter()
                    .filter_map(|&i| state_of(i).and_then(f).map(Tensor::shallow_clone))
                    .collect()
            };
            let first = st(|s| Some(&s.first));
            let second = st(|s| s.second.as_ref());
            let max = st(|s| s.max.as_ref());
            let steps = st(|s| s.step.as_ref());
            let lists = FusedLists {
                params: &params,
                grads: &grads,
                first: &first,
                second: &second,
                max: &max,
                steps: &steps,
            };
            let r = match self.algo {
                Algo::Sgd(s) => shim::fused_sgd_(
                    &FusedLists {
                        first: if s.momentum > 0.0 { &first } else { &[] },
                        ..lists
                    },
                    SgdStep {
                        lr,
                        momentum: s.momentum,
                        dampening: s.dampening,
                        weight_decay: s.wd,
                        nesterov: s.nesterov,
                        is_first_step,
                    },
                    scale.as_ref(),
                    inf.as_ref(),
                ),
                Algo::Adam(a, adamw) => shim::fused_adam_(
                    &lists,
                    AdamStep {
                        lr,
                        beta1: a.beta1,
                        beta2: a.beta2,
                        weight_decay: a.wd,
                        eps: a.eps,
                        amsgrad: a.amsgrad,
                        adamw,
                    },
                    scale.as_ref(),
                    inf.as_ref(),
                ),
            };
            r.map_err(TchError::from)?;
        }
        if self.state.len() < trainable.len() {
            self.state.resize_with(trainable.len(), || None);
        }
        for (i, s) in plan.pending {
            self.state[i] = Some(s);
        }
        if let Some((started, verdict)) = sgd_next {
            self.sgd_started = started;
            self.sgd_first_verdict = verdict;
        }
        Ok(())
    }

    /// The state of `p`'s first step: zeros of its dtype on its device, the step counter an f32
    /// zero.
    fn new_state(&self, p: &Tensor) -> Result<State, TchError> {
        let zeros = || p.f_zeros_like();
        Ok(match self.algo {
            Algo::Sgd(_) => State {
                first: zeros()?,
                second: None,
                max: None,
                step: None,
            },
            Algo::Adam(a, _) => State {
                first: zeros()?,
                second: Some(zeros()?),
                max: a.amsgrad.then(zeros).transpose()?,
                step: Some(Tensor::f_zeros([], (Kind::Float, p.device()))?),
            },
        })
    }

    /// Whether fused SGD initialises its momentum buffers from the gradient in this step (as
    /// PyTorch does on its first step), and what `sgd_started` and `sgd_first_verdict` become
    /// once the step has run (`None`: unchanged). Buffers start at zero, so when a first step
    /// was skipped on the device a later step with dampening 0 gives the same numbers either
    /// way; with dampening it needs to know whether that first step happened: one host read,
    /// once.
    #[allow(clippy::type_complexity)]
    fn sgd_first_step(
        &self,
        found_inf: Option<&Tensor>,
    ) -> Result<(bool, Option<(bool, Option<Tensor>)>), TchError> {
        let Algo::Sgd(s) = self.algo else {
            return Ok((false, None));
        };
        if s.momentum == 0.0 || self.sgd_started {
            return Ok((false, None));
        }
        if let Some(prev) = &self.sgd_first_verdict {
            let skipped = crate::sync::read_f64s(&prev.reshape([1]))?[0] != 0.0;
            if !skipped || s.dampening == 0.0 {
                return Ok((false, Some((true, None))));
            }
        }
        let next = match found_inf {
            Some(f) => (false, Some(f.shallow_clone())),
            None => (true, None),
        };
        Ok((true, Some(next)))
    }

    /// Every state tensor (moments, momentum buffers, step counters), in parameter order.
    fn state_tensors(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        for s in self.state.iter().flatten() {
            out.push(s.first.shallow_clone());
            for t in [&s.second, &s.max, &s.step].into_iter().flatten() {
                out.push(t.shallow_clone());
            }
        }
        out
    }

    /// Backward on `loss`, then a step (gradients zeroed first), as tch's `backward_step`.
    pub fn backward_step(&mut self, loss: &Tensor) {
        self.zero_grad();
        loss.backward();
        self.step();
    }

    /// [`FusedOptimizer::backward_step`] with every gradient clamped to `[-max, max]`.
    pub fn backward_step_clip(&mut self, loss: &Tensor, max: f64) {
        self.zero_grad();
        loss.backward();
        GuardedOptimizer::guard_clip_grad_value(self, max);
        self.step();
    }

    /// [`FusedOptimizer::backward_step`] with the global gradient norm clipped to `max_norm`
    /// on the device ([`crate::clip_grad_norm`]); an invalid `max_norm` leaves the grads as
    /// they are.
    pub fn backward_step_clip_norm(&mut self, loss: &Tensor, max_norm: f64) {
        self.zero_grad();
        loss.backward();
        let _ = crate::clip_grad_norm(self.params(), max_norm, 2);
        self.step();
    }
}

impl GuardedOptimizer for FusedOptimizer {
    fn guard_params(&self) -> Vec<Tensor> {
        self.params()
    }
    fn guard_state(&self) -> Vec<Tensor> {
        self.state_tensors()
    }
    fn guard_zero_grad(&mut self) {
        self.zero_grad()
    }
    fn guard_step(&mut self) {
        self.step()
    }
    fn guard_try_step(&mut self) -> Result<(), crate::TorchError> {
        self.try_step().map_err(Into::into)
    }
}

impl DeviceSkipOptimizer for FusedOptimizer {
    fn guard_step_on_device(&mut self, grad_scale: Option<&Tensor>, found_inf: &Tensor) {
        or_panic(self.step_with(grad_scale, Some(found_inf)))
    }
    fn guard_try_step_on_device(
        &mut self,
        grad_scale: Option<&Tensor>,
        found_inf: &Tensor,
    ) -> Result<(), crate::TorchError> {
        self.step_with(grad_scale, Some(found_inf))
            .map_err(Into::into)
    }
}

/// The error of a step whose caller takes none (`step`, `backward_step`, the guard's step): a
/// panic, as tch's `Optimizer::step` panics with its error.
fn or_panic(r: Result<(), TchError>) {
    if let Err(e) = r {
        panic!("stepguard::optim: the step was refused: {e}");
    }
}
