//! Loss spikes: finite but destructive updates no NaN check sees. A rolling mean and variance
//! of the loss and of the total grad norm are kept on the device; a step whose loss (or, without
//! clipping, whose grad norm) lies more than `sigmas` standard deviations above them is a
//! spike, judged with the step's one read (no read of its own) and skipped like a non-finite
//! step. With `max_norm`, a grad-norm spike is left to clipping, which bounds its update: a deep
//! network's norm jumps now and then without harm, and skipping it would stall training.

use tch::{Device, Kind, TchError, Tensor};

use crate::error::ConfigError;

/// Spike detection (`spike = 6`): the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Spike {
    /// A step is a spike when its loss or grad norm is this many standard deviations above
    /// the running mean.
    pub sigmas: f64,
    /// Updates observed before any step is judged.
    pub warmup: u32,
    /// The window of the running statistics: an exponential moving average with weight
    /// `2 / (window + 1)` (a cumulative mean over the first updates).
    pub window: u32,
}

impl Spike {
    /// Defaults: `sigmas` 6, `warmup` 20, `window` 100.
    pub const DEFAULT: Spike = Spike {
        sigmas: 6.0,
        warmup: 20,
        window: 100,
    };

    /// Spike detection with these numbers (see [`Spike::validate`]).
    pub const fn new(sigmas: f64, warmup: u32, window: u32) -> Self {
        Spike {
            sigmas,
            warmup,
            window,
        }
    }

    /// `sigmas` finite and > 0, `window` >= 2.
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.sigmas.is_finite() && self.sigmas > 0.0) {
            return Err(ConfigError::Spike {
                field: "spike",
                value: self.sigmas,
                want: "a finite number > 0",
            });
        }
        if self.window < 2 {
            return Err(ConfigError::Spike {
                field: "spike_window",
                value: f64::from(self.window),
                want: "an integer >= 2",
            });
        }
        Ok(())
    }
}

impl Default for Spike {
    fn default() -> Self {
        Spike::DEFAULT
    }
}

/// Adaptive clipping (`max_norm = "adaptive"`), as ZClip: the global grad norm is clipped to
/// `mean + sigmas * std` of its running statistics (the same statistics as spike detection, fed
/// the clipped norms), so the threshold follows the norm's own scale instead of a constant.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct AdaptiveClip {
    /// Standard deviations above the running mean where clipping starts (ZClip: 2.5).
    pub sigmas: f64,
    /// Updates observed before anything is clipped.
    pub warmup: u32,
    /// The window of the running statistics (ZClip's EMA weight 0.97 is a window of 65).
    pub window: u32,
}

impl AdaptiveClip {
    /// Defaults: `sigmas` 2.5, `warmup` 25, `window` 65 (ZClip's).
    pub const DEFAULT: AdaptiveClip = AdaptiveClip {
        sigmas: 2.5,
        warmup: 25,
        window: 65,
    };

    /// Adaptive clipping with these numbers (see [`AdaptiveClip::validate`]).
    pub const fn new(sigmas: f64, warmup: u32, window: u32) -> Self {
        AdaptiveClip {
            sigmas,
            warmup,
            window,
        }
    }

    /// `sigmas` finite and > 0, `window` >= 2.
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Spike::new(self.sigmas, self.warmup, self.window)
            .validate()
            .map_err(|e| match e {
                ConfigError::Spike { field, value, want } => ConfigError::Spike {
                    field: if field == "spike" {
                        "clip_sigmas"
                    } else {
                        field
                    },
                    value,
                    want,
                },
                other => other,
            })
    }
}

impl Default for AdaptiveClip {
    fn default() -> Self {
        AdaptiveClip::DEFAULT
    }
}

/// The smallest standard deviation a z-score divides by, relative to the mean: a series that
/// barely moves (a full-batch loss) would otherwise call a 1 % bump a spike.
const RELATIVE_FLOOR: f64 = 0.05;

/// Running statistics of one set of parameters: `[count, loss mean, loss var, norm mean, norm
/// var]`, f64, on the device of the grads.
#[derive(Debug)]
pub(crate) struct SpikeStats {
    stats: Tensor,
}

/// What [`SpikeStats::judge`] leaves for the step's read.
#[derive(Debug)]
pub(crate) struct Judged {
    /// `[loss z, norm z]` (NaN where there was no value, or during warm-up).
    pub z: Tensor,
    /// 0-dim f32: 1 when the step is a spike.
    pub spike: Tensor,
    /// `[loss, norm]` of the step (NaN where absent), folded in by [`SpikeStats::accept`].
    values: Tensor,
}

impl SpikeStats {
    pub(crate) fn new(device: Device) -> Self {
        SpikeStats {
            stats: Tensor::zeros([5], (Kind::Double, device)),
        }
    }

    /// The z-scores of this step's loss and grad norm (0-dim tensors, any device) against the
    /// statistics, and whether it is a spike: the loss's z above `sigmas`, or the norm's when
    /// `norm_triggers` (no clipping, which would bound such an update anyway). No host read.
    pub(crate) fn judge(
        &self,
        loss: Option<&Tensor>,
        norm: Option<&Tensor>,
        cfg: &Spike,
        norm_triggers: bool,
    ) -> Result<Judged, TchError> {
        let _guard = tch::no_grad_guard();
        let device = self.stats.device();
        let value = |t: Option<&Tensor>| -> Result<Tensor, TchError> {
            match t {
                Some(t) => t
                    .f_detach()?
                    .f_to_kind(Kind::Double)?
                    .f_to_device(device)?
                    .f_reshape([1]),
                None => Tensor::f_full([1], f64::NAN, (Kind::Double, device)),
            }
        };
        let values = Tensor::f_cat(&[value(loss)?, value(norm)?], 0)?;
        let mean = self.stats.f_index_select(0, &index(&[1, 3], device)?)?;
        let var = self.stats.f_index_select(0, &index(&[2, 4], device)?)?;
        let floor = mean.f_abs()?.f_mul_scalar(RELATIVE_FLOOR)?;
        let std = var.f_sqrt()?.f_maximum(&floor)?.f_clamp_min(1e-12)?;
        let warm = self.stats.f_get(0)?.f_ge(f64::from(cfg.warmup))?;
        let z = values.f_sub(&mean)?.f_div(&std)?;
        let z = z.f_where_scalarother(&warm, f64::NAN)?;
        // NaN compares false: a missing value or warm-up is never a spike.
        let over = z.f_gt(cfg.sigmas)?;
        let over = if norm_triggers {
            over
        } else {
            over.f_narrow(0, 0, 1)?
        };
        let spike = over.f_any()?.f_to_kind(Kind::Float)?;
        Ok(Judged { z, spike, values })
    }

    /// The adaptive clipping threshold, `norm mean + sigmas * std` (0-dim f64 on the
    /// statistics' device; +inf before `warmup` updates). No host read.
    pub(crate) fn threshold(&self, sigmas: f64, warmup: u32) -> Result<Tensor, TchError> {
        let _guard = tch::no_grad_guard();
        let (mean, var) = (self.stats.f_get(3)?, self.stats.f_get(4)?);
        let floor = mean.f_abs()?.f_mul_scalar(RELATIVE_FLOOR)?;
        let std = var.f_sqrt()?.f_maximum(&floor)?;
        let thr = mean.f_add(&std.f_mul_scalar(sigmas)?)?;
        let warm = self.stats.f_get(0)?.f_ge(f64::from(warmup))?;
        thr.f_where_scalarother(&warm, f64::INFINITY)
    }

    /// Folds an accepted step's values into the statistics (where `keep`, a 0-dim tensor, is
    /// non-zero: on the device, for a verdict the host does not know yet). No host read.
    pub(crate) fn accept(
        &mut self,
        j: &Judged,
        keep: Option<&Tensor>,
        cfg: &Spike,
    ) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let device = self.stats.device();
        let s = &self.stats;
        let count = s.f_get(0)?;
        // Cumulative mean first, then an exponential average over `window`.
        let alpha = count
            .f_add_scalar(1.0)?
            .f_reciprocal()?
            .f_clamp_min(2.0 / (f64::from(cfg.window) + 1.0))?;
        let mut next = Vec::with_capacity(5);
        next.push(count.f_add_scalar(1.0)?.f_reshape([1])?);
        for (k, m, v) in [(0i64, 1i64, 2i64), (1, 3, 4)] {
            let x = j.values.f_get(k)?;
            let (mean, var) = (s.f_get(m)?, s.f_get(v)?);
            let delta = x.f_sub(&mean)?;
            let new_mean = mean.f_add(&delta.f_mul(&alpha)?)?;
            let new_var = var
                .f_add(&delta.f_square()?.f_mul(&alpha)?)?
                .f_mul(&alpha.f_neg()?.f_add_scalar(1.0)?)?;
            // A missing or non-finite value leaves its statistics as they were.
            let ok = x.f_isfinite()?;
            next.push(new_mean.f_where_self(&ok, &mean)?.f_reshape([1])?);
            next.push(new_var.f_where_self(&ok, &var)?.f_reshape([1])?);
        }
        let mut next = Tensor::f_cat(&next, 0)?;
        if let Some(keep) = keep {
            let keep = keep.f_to_device(device)?.f_ne(0.0)?;
            next = next.f_where_self(&keep, s)?;
        }
        self.stats.f_copy_(&next)
    }
}

fn index(i: &[i64], device: Device) -> Result<Tensor, TchError> {
    Tensor::f_from_slice(i)?.f_to_device(device)
}
