//! The running statistics of the loss and the grad norm, on the device, and the judgement of
//! one update against them (no host read).

use tch::{Device, Kind, TchError, Tensor};

use super::{AdaptiveClip, Spike};

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

    /// The running statistics (5 f64 values), for a checkpoint.
    pub(crate) fn values(&self) -> &Tensor {
        &self.stats
    }

    /// Statistics that continue from [`SpikeStats::values`], on `device`.
    pub(crate) fn resumed(values: &Tensor, device: Device) -> Result<Self, tch::TchError> {
        if values.size() != [5] {
            return Err(tch::TchError::Shape(format!(
                "spike statistics of shape {:?}, expected [5]",
                values.size()
            )));
        }
        Ok(SpikeStats {
            stats: values.f_to_kind(Kind::Double)?.f_to_device(device)?,
        })
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

    /// One update: the adaptive threshold (`adaptive`, unless clipping to a constant) from the
    /// statistics before it, and the judgement of its mean `loss` and its `total` grad norm
    /// (before clipping, divided by `scale` when the grads still carry the loss scale; capped
    /// at the threshold, as ZClip feeds its statistics). No host read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn judge_update(
        &self,
        cfg: &Spike,
        adaptive: Option<AdaptiveClip>,
        loss: Option<&Tensor>,
        total: Option<&Tensor>,
        scale: Option<&Tensor>,
        clipping: bool,
    ) -> Result<(Option<Tensor>, Judged), TchError> {
        let threshold = match adaptive {
            Some(a) if !clipping => Some(self.threshold(a.sigmas, a.warmup)?),
            _ => None,
        };
        let norm = match total {
            None => None,
            Some(t) => {
                let mut n = t.f_to_kind(Kind::Double)?;
                if let Some(s) = scale {
                    n = n.f_div(&s.f_to_device(n.device())?)?;
                }
                if let Some(t) = &threshold {
                    n = n.f_minimum(&t.f_to_device(n.device())?)?;
                }
                Some(n)
            }
        };
        let clipping = clipping || threshold.is_some();
        let judged = self.judge(loss, norm.as_ref(), cfg, !clipping)?;
        Ok((threshold, judged))
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
