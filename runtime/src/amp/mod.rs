//! Mixed precision: dynamic loss scaling inside the guard ([`LossScale`], what
//! `loss_scale = "dynamic"` compiles to) and [`autocast`] for CPU (bf16) and CUDA (f16).
//!
//! The scaler is PyTorch's `torch.amp.GradScaler`, run by the guard: the loss is multiplied by
//! the scale before backward; before the update the grads are unscaled in one multi-tensor pass
//! (`_amp_foreach_non_finite_check_and_unscale_`, whose `found_inf` joins the step's one host
//! read), or, under `sync = "deferred"`, inside the fused optimizer's kernel (`grad_scale`);
//! at the end of the call the scale is updated on the device (`_amp_update_scale_`). An update
//! whose grads overflow at the current scale is skipped and counted as an overflow, not as a
//! failure; an overflow at `min_scale`, or a non-finite loss, is a failure as usual.

mod scaler;

pub(crate) use scaler::{DeferredScale, ScalePlan, Scaler, Unscaled};

use tch::{Device, Kind, TchError, Tensor};

use crate::error::{ConfigError, Diagnosis};
use crate::shim;

/// Dynamic loss scaling (`loss_scale = "dynamic"`), with GradScaler's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct LossScale {
    /// The scale of the first step (GradScaler: 2^16).
    pub init_scale: f64,
    /// Factor applied after `growth_interval` updates in a row without overflow (2).
    pub growth_factor: f64,
    /// Factor applied on an overflow (0.5).
    pub backoff_factor: f64,
    /// Updates without overflow before the scale grows (2000).
    pub growth_interval: u32,
    /// The scale never goes below this; an overflow at it is a failure, not a skip (1; not in
    /// GradScaler, which backs off forever, but in DeepSpeed's `min_loss_scale`).
    pub min_scale: f64,
}

impl LossScale {
    /// GradScaler's defaults: 2^16, 2, 0.5, 2000; `min_scale` 1.
    pub const DYNAMIC: LossScale = LossScale {
        init_scale: 65536.0,
        growth_factor: 2.0,
        backoff_factor: 0.5,
        growth_interval: 2000,
        min_scale: 1.0,
    };

    /// A scaler with these numbers (see [`LossScale::validate`]).
    pub const fn new(
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: u32,
        min_scale: f64,
    ) -> Self {
        LossScale {
            init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            min_scale,
        }
    }

    /// Checks every number: `init_scale` and `min_scale` finite and > 0 with `min_scale <=
    /// init_scale`, `growth_factor` finite and > 1, `backoff_factor` in (0, 1),
    /// `growth_interval` >= 1 (the attribute checks the same at compile time).
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value, want| Err(ConfigError::LossScale { field, value, want });
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.init_scale) {
            return bad("init_scale", self.init_scale, "a finite number > 0");
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return bad("growth_factor", self.growth_factor, "a finite number > 1");
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor", self.backoff_factor, "a number in (0, 1)");
        }
        if self.growth_interval == 0 {
            return bad("growth_interval", 0.0, "an integer >= 1");
        }
        if !finite_pos(self.min_scale) || self.min_scale > self.init_scale {
            return bad(
                "min_scale",
                self.min_scale,
                "a finite number in (0, init_scale]",
            );
        }
        Ok(())
    }
}

impl LossScale {
    /// What an overflow of the grads at `scale` means: an expected skip, the scale backing off
    /// ([`Diagnosis::Overflow`]), or, at `min_scale`, [`Diagnosis::ScaleExhausted`].
    pub(crate) fn after_overflow(&self, scale: f64) -> Diagnosis {
        if scale > self.min_scale {
            let next = (scale * self.backoff_factor).max(self.min_scale);
            Diagnosis::Overflow { scale, next }
        } else {
            Diagnosis::ScaleExhausted { scale }
        }
    }
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale::DYNAMIC
    }
}

/// Runs `f` with autocast on for `device`'s type in `kind` (`Kind::Half` or
/// `Kind::BFloat16`), as `with torch.autocast(device_type, dtype)`: matmuls and convolutions in
/// the lower precision, reductions and losses in f32. tch's own `tch::autocast` covers CUDA
/// with f16 only; this one also covers the CPU (bf16 there: f16 autocast on CPU is slow). The
/// previous autocast state is restored afterwards, also when `f` panics.
///
/// # Errors
/// A device other than CPU or CUDA, or a `kind` other than f16/bf16; `f` is then not run.
pub fn autocast<T>(device: Device, kind: Kind, f: impl FnOnce() -> T) -> Result<T, TchError> {
    let device_type = match device {
        Device::Cpu => 0,
        Device::Cuda(_) => 1,
        other => {
            return Err(TchError::Kind(format!(
                "stepguard::amp::autocast: CPU or CUDA only, got {other:?}"
            )))
        }
    };
    let bf16 = match kind {
        Kind::Half => false,
        Kind::BFloat16 => true,
        other => {
            return Err(TchError::Kind(format!(
                "stepguard::amp::autocast: Half or BFloat16, got {other:?}"
            )))
        }
    };
    struct Restore(i32, (bool, bool));
    impl Drop for Restore {
        fn drop(&mut self) {
            // Cannot fail for a device type that entered.
            let _ = shim::autocast_exit(self.0, self.1);
        }
    }
    let previous =
        shim::autocast_enter(device_type, bf16).map_err(|e| TchError::Torch(e.to_string()))?;
    let _restore = Restore(device_type, previous);
    if bf16 {
        BF16_AUTOCASTS.with(|n| n.set(n.get() + 1));
    }
    Ok(f())
}

thread_local! {
    /// bf16 [`autocast`] regions entered on this thread so far.
    static BF16_AUTOCASTS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// [`BF16_AUTOCASTS`] at the last scaled loss on this thread, and the functions that scaled
    /// a loss on it.
    static SCALED: std::cell::RefCell<(u64, std::collections::HashSet<&'static str>)> =
        std::cell::RefCell::new((0, std::collections::HashSet::new()));
}

/// Loss scaling is for f16, whose small gradients underflow; bf16 has the exponent range of
/// f32 and needs none. Says so once per function (a `tracing` WARN) when `function` scales a
/// bf16 loss, or a loss after a bf16 [`autocast`] region was entered on this thread since the
/// previous scaled loss (from the function's second scaled loss on, so that the forward of
/// another function before its first is not taken for its own). The scaling is left as it is.
pub(crate) fn note_bf16_loss_scale(loss: &Tensor, function: &'static str) {
    static NOTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let now = BF16_AUTOCASTS.with(std::cell::Cell::get);
    let after_bf16 = SCALED.with(|s| {
        let (last, functions) = &mut *s.borrow_mut();
        let previous = std::mem::replace(last, now);
        !functions.insert(function) && now > previous
    });
    if !(after_bf16 || loss.kind() == Kind::BFloat16) {
        return;
    }
    let mut noted = NOTED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if noted.contains(&function) {
        return;
    }
    noted.push(function);
    #[cfg(feature = "tracing")]
    tracing::warn!(
        function,
        "stepguard: `{function}` scales a loss computed in bf16; bf16 has the range of f32 and \
         needs no loss scaling (it is for f16): leave out `loss_scale`"
    );
}

/// Loss scaling's part of one guarded call: what the call's updates found, for the scale's
/// update when the call ends.
#[derive(Debug, Default)]
pub(crate) struct CallScaling {
    /// `found_inf` of this call's updates.
    pub updates: Vec<tch::Tensor>,
    /// A loss was scaled after this call's last update.
    pub scaled_after_update: bool,
}
