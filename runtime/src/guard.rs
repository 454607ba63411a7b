//! One guarded training step: clip, fold every check into one device flag, read it once.

use tch::Tensor;

use crate::clip::{clip_host, defined_grads, scale_grads, total_norm, NormType};
use crate::error::{Check, Diagnosis, GuardError};
use crate::flag::FiniteFlag;
use crate::fused;
use crate::report::{find_non_finite, largest_param, report_tensor, Names, Role};

/// Above this magnitude finite parameters count as diverged when the loss is non-finite.
const DIVERGED_ABS: f64 = 1e10;

/// Which finiteness checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// The loss, before backward.
    pub loss: bool,
    /// The gradients, before the optimizer step.
    pub grads: bool,
    /// The parameters, after the optimizer step.
    pub params: bool,
    /// Every tensor bound by `let` in the step body (off by default).
    pub forward: bool,
}

impl Checks {
    /// `loss`, `grads` and `params`: the default.
    pub const DEFAULT: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: false,
    };
    /// No check at all.
    pub const NONE: Checks = Checks {
        loss: false,
        grads: false,
        params: false,
        forward: false,
    };
    /// Every check, `forward` included.
    pub const ALL: Checks = Checks {
        loss: true,
        grads: true,
        params: true,
        forward: true,
    };
}

impl Default for Checks {
    fn default() -> Self {
        Checks::DEFAULT
    }
}

/// What a failed check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnNan {
    /// Panic with the [`GuardError`] text.
    #[default]
    Panic,
    /// Return `Err(GuardError.into())` before any further update.
    Error,
    /// Skip the optimizer step (parameters untouched, grads zeroed); escalate after
    /// `max_skips` consecutive skips.
    Skip,
}

/// The configuration of a guarded step (what `#[guarded_step(...)]` compiles to).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Which checks run.
    pub checks: Checks,
    /// Clip the global grad norm to this value before each optimizer step.
    pub max_norm: Option<f64>,
    /// The norm used by `max_norm` (and for the reported grad norm).
    pub norm_type: NormType,
    /// Epsilon of the protected operations.
    pub eps: f64,
    /// Whether `/` and `.div()` are protected.
    pub protect_div: bool,
    /// Whether `.log()`, `.log2()` and `.log10()` are protected.
    pub protect_log: bool,
    /// What a failed check does.
    pub on_nan: OnNan,
    /// With [`OnNan::Skip`], consecutive skips before escalating.
    pub max_skips: u32,
}

impl Config {
    /// The attribute's defaults: all three checks, no clipping, eps 1e-8, div and log
    /// protected, panic on failure, 3 skips.
    pub const DEFAULT: Config = Config {
        checks: Checks::DEFAULT,
        max_norm: None,
        norm_type: NormType::L2,
        eps: crate::safe::DEFAULT_EPS,
        protect_div: true,
        protect_log: true,
        on_nan: OnNan::Panic,
        max_skips: 3,
    };
}

impl Default for Config {
    fn default() -> Self {
        Config::DEFAULT
    }
}

/// Where the parameters' names come from, consulted only when a check fails.
pub trait NameSource {
    /// The names.
    fn names(&self) -> Names;
    /// Parameters beyond the step's own that the slow path should also scan (e.g. every
    /// variable of the named `VarStore`s, to tell corrupted inputs from a bad update).
    fn extra_params(&self) -> Vec<Tensor> {
        Vec::new()
    }
}

impl NameSource for tch::nn::VarStore {
    fn names(&self) -> Names {
        Names::from_var_store(self)
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
}

/// State carried from one guarded step to the next: the step counter and the parameters
/// check of the previous update, which is folded into the next step's single read.
#[derive(Debug, Default)]
pub struct GuardState {
    step: u64,
    pending_params: Option<(FiniteFlag, u64)>,
}

impl GuardState {
    /// A fresh state (step 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// Index of the next step.
    pub fn step(&self) -> u64 {
        self.step
    }
}

/// One guarded step. Create it at the start of the step, feed it the loss, call
/// [`StepGuard::before_update`] just before the optimizer step (clipping, one host read) and
/// [`StepGuard::after_update`] right after it.
pub struct StepGuard<'a> {
    config: &'a Config,
    function: &'static str,
    location: Option<(&'static str, u32)>,
    step: u64,
    names: Option<&'a dyn NameSource>,
    flag: FiniteFlag,
    loss: Option<Tensor>,
    grad_norm: Option<Tensor>,
    last_norm: Option<f64>,
    /// The total grad norm when the CPU fast path computed it on the host.
    host_norm: Option<f64>,
    /// The `max_norm` this step clipped to (the attribute's, or `backward_step_clip_norm`'s).
    clipped_at: Option<f64>,
    grads_folded: bool,
    /// Step index of the previous update whose parameters check is folded into `flag`.
    pending_from: Option<u64>,
    /// Tensors bound by `let` in the step body, in order (the `forward` check).
    bindings: Vec<Binding>,
}

/// A tensor bound by `let` in the step body, kept for the slow path of the `forward` check.
struct Binding {
    name: &'static str,
    line: u32,
    kind: &'static str,
    value: Tensor,
}

impl<'a> StepGuard<'a> {
    /// Starts a step: takes the previous update's parameters check from `state`.
    pub fn begin(config: &'a Config, function: &'static str, state: &mut GuardState) -> Self {
        let step = state.step;
        state.step += 1;
        Self::from_parts(config, function, step, state.pending_params.take())
    }

    /// Starts step `step`, with the pending parameters check of an earlier step, if any.
    pub(crate) fn from_parts(
        config: &'a Config,
        function: &'static str,
        step: u64,
        pending: Option<(FiniteFlag, u64)>,
    ) -> Self {
        let mut flag = FiniteFlag::new();
        let pending_from = pending.map(|(f, s)| {
            flag.merge(f);
            s
        });
        StepGuard {
            config,
            function,
            location: None,
            step,
            names: None,
            flag,
            loss: None,
            grad_norm: None,
            last_norm: None,
            host_norm: None,
            clipped_at: None,
            grads_folded: false,
            pending_from,
            bindings: Vec::new(),
        }
    }

    /// Names parameters in error messages.
    pub fn with_names(mut self, names: &'a dyn NameSource) -> Self {
        self.names = Some(names);
        self
    }

    /// Sets the file and line shown in error messages.
    pub fn with_location(mut self, file: &'static str, line: u32) -> Self {
        self.location = Some((file, line));
        self
    }

    /// This step's index.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        self.config
    }

    /// Records a tensor bound by `let` in the step body (the `forward` check): its finiteness is
    /// folded into the step's flag (no host read) and, only if that flag fails, the first
    /// non-finite binding is named by variable, line and kind of expression.
    pub fn bind(&mut self, value: &Tensor, name: &'static str, line: u32, kind: &'static str) {
        if self.config.checks.forward && value.defined() && value.is_floating_point() {
            self.flag.fold(value);
            self.bindings.push(Binding {
                name,
                line,
                kind,
                value: value.detach(),
            });
        }
    }

    /// Records the loss (before backward). No host read.
    pub fn loss(&mut self, loss: &Tensor) {
        if self.config.checks.loss {
            self.flag.fold(loss);
            self.loss = Some(loss.detach());
        }
    }

    /// Clips (when `max_norm` is set) and checks the grads of `params`, then reads every check
    /// folded so far with one host read. Returns the total grad norm (a device tensor) when it
    /// was computed. On failure, finds the offending tensors and diagnoses the cause.
    pub fn before_update(&mut self, params: &[Tensor]) -> Result<Option<Tensor>, GuardError> {
        self.before_update_with(params, None, None)
    }

    /// [`StepGuard::before_update`] with a `max_norm` for this call and names given now.
    pub(crate) fn before_update_with(
        &mut self,
        params: &[Tensor],
        max_norm: Option<f64>,
        names: Option<&dyn NameSource>,
    ) -> Result<Option<Tensor>, GuardError> {
        let max_norm = max_norm.or(self.config.max_norm);
        self.clipped_at = max_norm;
        let want_norm = max_norm.is_some() || self.config.checks.grads;
        if want_norm {
            let grads = defined_grads(params);
            if let Some(total) = fused::total_norm(&grads, self.config.norm_type) {
                if let Some(m) = max_norm {
                    clip_host(&grads, total, m);
                }
                if self.config.checks.grads {
                    self.flag.fold_host(total.is_finite());
                    self.grads_folded = true;
                }
                self.host_norm = Some(total);
                self.last_norm = Some(total);
                self.grad_norm = Some(Tensor::from(total));
            } else if let Some(total) = total_norm(&grads, self.config.norm_type) {
                if let Some(m) = max_norm {
                    scale_grads(&grads, &total, m);
                }
                if self.config.checks.grads {
                    self.flag.fold(&total);
                    self.grads_folded = true;
                }
                self.grad_norm = Some(total);
            }
        }
        self.check_now(params, names)?;
        Ok(self.grad_norm.as_ref().map(Tensor::shallow_clone))
    }

    /// Folds the parameters check after the update (no host read); it is read at the next
    /// step's single read (see [`StepGuard::defer`]).
    pub fn after_update(&mut self, params: &[Tensor]) {
        if self.config.checks.params {
            self.flag.fold_all(params);
        }
    }

    /// Leaves the update's parameters check pending in `state` for the next step.
    pub fn defer(self, state: &mut GuardState) {
        state.pending_params = self.into_pending();
    }

    /// The folded but unread checks, tagged with this step's index.
    pub(crate) fn into_pending(self) -> Option<(FiniteFlag, u64)> {
        (!self.flag.is_empty()).then_some((self.flag, self.step))
    }

    /// The total grad norm read back with the step's flag (no extra read), if computed.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// Zeroes the grads of `params` (what `zero_grad` does), for a skipped step.
    pub fn zero_grads(params: &[Tensor]) {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// Reads the loss check now (one host read), for steps where no update follows.
    pub(crate) fn check_loss_now(
        &mut self,
        names: Option<&dyn NameSource>,
    ) -> Result<(), GuardError> {
        self.check_now(&[], names)
    }

    fn check_now(
        &mut self,
        params: &[Tensor],
        names: Option<&dyn NameSource>,
    ) -> Result<(), GuardError> {
        let finite = match (&self.grad_norm, self.flag.is_empty()) {
            (_, true) => true, // nothing checked: no read, not even for the norm
            (Some(n), false) if self.host_norm.is_none() && self.flag.has_device_part() => {
                let (ok, norm) = self.flag.read_with(n);
                self.last_norm = Some(norm);
                ok
            }
            _ => self.flag.read(),
        };
        if finite {
            return Ok(());
        }
        match self.investigate(params, names.or(self.names)) {
            Some(e) => Err(e),
            None => Ok(()), // a sum overflowed while every element is finite: a false alarm
        }
    }

    /// The slow path: only runs when the flag says something is non-finite.
    fn investigate(&self, params: &[Tensor], names: Option<&dyn NameSource>) -> Option<GuardError> {
        let names_src = names;
        let names = names.map(|n| n.names());
        let names = names.as_ref();
        let grad_norm = self.last_norm;
        let err = |check, tensors, diagnosis, step| GuardError {
            check,
            step,
            function: self.function,
            location: self.location,
            tensors,
            diagnosis,
            grad_norm,
            consecutive_skips: None,
        };
        let mut scan: Vec<Tensor> = params.iter().map(Tensor::shallow_clone).collect();
        if let Some(src) = names_src {
            let known: std::collections::HashSet<usize> =
                params.iter().map(|p| p.data_ptr() as usize).collect();
            scan.extend(
                src.extra_params()
                    .into_iter()
                    .filter(|p| !known.contains(&(p.data_ptr() as usize))),
            );
        }
        let params_bad = find_non_finite(&scan, Role::Param, names);
        if !params_bad.is_empty() {
            return Some(match self.pending_from {
                Some(s) => err(Check::Params, params_bad, Diagnosis::Update, s),
                None => err(
                    Check::Params,
                    params_bad,
                    Diagnosis::CorruptedBefore,
                    self.step,
                ),
            });
        }
        let first_bad_binding = self.bindings.iter().find_map(|b| {
            report_tensor(
                &format!("`{}` (line {}, {})", b.name, b.line, b.kind),
                &b.value,
            )
        });
        let bad_loss = self.loss.as_ref().and_then(|l| report_tensor("loss", l));
        if first_bad_binding.is_some() || bad_loss.is_some() {
            let diagnosis = match largest_param(params, names) {
                Some((param, max_abs)) if max_abs > DIVERGED_ABS => {
                    Diagnosis::Diverged { param, max_abs }
                }
                _ => Diagnosis::Forward {
                    protected: self.config.protect_div && self.config.protect_log,
                },
            };
            let (check, report) = match first_bad_binding {
                Some(r) => (Check::Forward, r),
                None => (Check::Loss, bad_loss.expect("one of the two")),
            };
            return Some(err(check, vec![report], diagnosis, self.step));
        }
        if self.grads_folded {
            let grads_bad = find_non_finite(params, Role::Grad, names);
            let overflow = grads_bad.is_empty();
            if !overflow || grad_norm.is_some_and(|n| !n.is_finite()) {
                let d = Diagnosis::ExplodingGradients {
                    max_norm: self.clipped_at,
                    norm_overflow: overflow,
                };
                return Some(err(Check::Grads, grads_bad, d, self.step));
            }
        }
        None
    }
}
