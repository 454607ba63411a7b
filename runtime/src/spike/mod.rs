//! Loss spikes: finite but destructive updates no NaN check sees. A rolling mean and variance
//! of the loss and of the total grad norm are kept on the device; a step whose loss (or, without
//! clipping, whose grad norm) lies more than `sigmas` standard deviations above them is a
//! spike, judged with the step's one read (no read of its own) and skipped like a non-finite
//! step. With `max_norm`, a grad-norm spike is left to clipping, which bounds its update: a deep
//! network's norm jumps now and then without harm, and skipping it would stall training.

mod stats;

pub(crate) use stats::{Judged, SpikeStats};

use crate::error::{ConfigError, Diagnosis};

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

    /// `sigmas` finite and > 0, `warmup` >= 1, `window` >= 2.
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
        if self.warmup < 1 {
            // The statistics start empty: the first update can only feed them.
            return Err(ConfigError::Spike {
                field: "spike_warmup",
                value: f64::from(self.warmup),
                want: "an integer >= 1 (the first update only feeds the statistics)",
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

    /// `sigmas` finite and > 0, `warmup` >= 1, `window` >= 2.
    ///
    /// # Errors
    /// The first invalid value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        Spike::new(self.sigmas, self.warmup, self.window)
            .validate()
            .map_err(|e| match e {
                ConfigError::Spike { field, value, want } => ConfigError::Spike {
                    field: match field {
                        "spike" => "clip_sigmas",
                        "spike_warmup" => "adaptive_clip.warmup",
                        "spike_window" => "adaptive_clip.window",
                        other => other,
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

/// The statistics' configuration: spike detection's, else adaptive clipping's (whose statistics
/// judge nothing: an infinite threshold).
pub(crate) fn stats_config(spike: Option<Spike>, adaptive: Option<AdaptiveClip>) -> Option<Spike> {
    spike.or(adaptive.map(|a| Spike::new(f64::INFINITY, a.warmup, a.window)))
}

/// [`Diagnosis::Spike`] from the z-scores `[loss, norm]` read (NaN: not measured).
pub(crate) fn diagnosis(z: [f64; 2], sigmas: f64) -> Diagnosis {
    let finite = |v: f64| v.is_finite().then_some(v);
    Diagnosis::Spike {
        loss_z: finite(z[0]),
        norm_z: finite(z[1]),
        sigmas,
    }
}
