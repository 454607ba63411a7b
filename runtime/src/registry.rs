//! Every guarded step, registered at link time with `inventory`, with live statistics.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering::Relaxed};

use crate::config::{Checks, Config};
use crate::error::GuardError;
use crate::state::GuardState;

/// Whether finiteness checks are compiled in: false only in builds without
/// `debug_assertions` with the `strip-release` feature. Clipping and epsilon protection do not
/// depend on it. Generated code reads this constant, so stripped checks are removed by the
/// optimiser.
pub const CHECKS_ENABLED: bool = !cfg!(all(not(debug_assertions), feature = "strip-release"));

/// One function annotated with `#[guarded_step]`.
#[derive(Debug)]
pub struct Site {
    name: &'static str,
    module_path: &'static str,
    file: &'static str,
    line: u32,
    config: Config,
    effective: Config,
    pub(crate) calls: AtomicU64,
    pub(crate) clipped: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) overflow_skips: AtomicU64,
    pub(crate) spikes: AtomicU64,
    pub(crate) rollbacks: AtomicU64,
    pub(crate) failures: AtomicU64,
    last_norm_bits: AtomicU64,
    skip_announced: AtomicBool,
    rollback_announced: AtomicBool,
    /// The checks whose failure was replayed already (a bit per check).
    replayed: AtomicU16,
    /// The function's own state (per set of parameters), unless `state = ...` is given.
    state: GuardState,
}

impl Site {
    /// A site (generated code builds one per guarded function, in a `static`).
    #[doc(hidden)]
    pub const fn new(
        name: &'static str,
        module_path: &'static str,
        file: &'static str,
        line: u32,
        config: Config,
    ) -> Self {
        let mut effective = config;
        if !CHECKS_ENABLED {
            // Loss scaling is training math and stays; spike detection and rollback are checks.
            effective.checks = Checks::NONE;
            effective.spike = None;
            effective.rollback = None;
        }
        Site {
            name,
            module_path,
            file,
            line,
            config,
            effective,
            calls: AtomicU64::new(0),
            clipped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            overflow_skips: AtomicU64::new(0),
            spikes: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_norm_bits: AtomicU64::new(f64::NAN.to_bits()),
            skip_announced: AtomicBool::new(false),
            rollback_announced: AtomicBool::new(false),
            replayed: AtomicU16::new(0),
            state: GuardState::new(),
        }
    }

    /// Whether a failure of `check` is this function's first to be replayed (and marks it):
    /// a call is replayed on the first failure of each function and check, as its message is
    /// the one printed.
    pub(crate) fn first_replay(&self, check: crate::Check) -> bool {
        let bit = 1u16 << (check as u16 % 16);
        self.replayed.fetch_or(bit, Relaxed) & bit == 0
    }

    /// Counts a call that runs without a context (the checks stripped by `strip-release`).
    #[doc(hidden)]
    pub fn count_call(&self) {
        self.calls.fetch_add(1, Relaxed);
    }

    /// The function's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// `module_path!()` of the function.
    pub fn module_path(&self) -> &'static str {
        self.module_path
    }
    /// Source file.
    pub fn file(&self) -> &'static str {
        self.file
    }
    /// Source line of the function.
    pub fn line(&self) -> u32 {
        self.line
    }
    /// The configuration written in the attribute.
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The configuration in force (checks removed when stripped by `strip-release`).
    pub fn effective_config(&self) -> &Config {
        &self.effective
    }
    /// Live statistics.
    pub fn stats(&self) -> Stats {
        let n = f64::from_bits(self.last_norm_bits.load(Relaxed));
        Stats {
            calls: self.calls.load(Relaxed),
            clipped: self.clipped.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            overflow_skips: self.overflow_skips.load(Relaxed),
            spikes: self.spikes.load(Relaxed),
            rollbacks: self.rollbacks.load(Relaxed),
            failures: self.failures.load(Relaxed),
            last_grad_norm: (!n.is_nan()).then_some(n),
            loss_scale: self.state.loss_scale(),
        }
    }

    /// The function's own state (pending checks, skips), per set of parameters.
    pub fn state(&self) -> &GuardState {
        &self.state
    }

    /// Says on stderr, once per function, that a step was skipped: a skip must be visible
    /// without a `tracing` subscriber. Later skips are counted in [`report`].
    ///
    /// `update`: what was skipped was an update; else (a loss read at once, in a function with
    /// a backward and no update) the gradients of its backward, which were zeroed.
    pub(crate) fn announce_skip(&self, e: &GuardError, update: bool) {
        if !self.skip_announced.swap(true, Relaxed) {
            let what = if update {
                "the update was not applied"
            } else {
                "the gradients of its backward were zeroed (this function makes no update)"
            };
            eprintln!(
                "{e}\n  => skipped (on_nan = \"skip\"): {what}. Shown once for `{}`; every skip \
                 is counted in stepguard::report().",
                self.name
            );
        }
    }

    /// Says on stderr, once per function, that a rollback happened; later ones are counted in
    /// [`report`].
    pub(crate) fn announce_rollback(
        &self,
        e: &GuardError,
        update: u64,
        bytes: usize,
        optimizer: bool,
    ) {
        if !self.rollback_announced.swap(true, Relaxed) {
            eprintln!("{e}\n{}", self.rollback_line(update, bytes, optimizer));
        }
    }

    /// The policy line of the first rollback, with the configured `rollback = N`.
    fn rollback_line(&self, update: u64, bytes: usize, optimizer: bool) -> String {
        let every = self
            .effective_config()
            .rollback
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        format!(
            "  => rolled back (rollback = {every}): parameters{} and buffers restored to \
             their state before update {update} ({} kept on the device); training goes on. \
             Shown once for `{}`; every rollback is counted in stepguard::report().",
            if optimizer { ", optimizer state" } else { "" },
            human_bytes(bytes),
            self.name
        )
    }

    pub(crate) fn set_last_norm(&self, n: f64) {
        self.last_norm_bits.store(n.to_bits(), Relaxed);
    }
}

/// `1.5 MiB`, `12.0 KiB`, `512 B`.
fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Statistics of one guarded function since the program started.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Stats {
    /// Calls of the function.
    pub calls: u64,
    /// Optimizer steps whose gradients were scaled down by clipping.
    pub clipped: u64,
    /// Steps skipped because a check failed (`on_nan = "skip"`).
    pub skipped: u64,
    /// Updates skipped because their grads overflowed under dynamic loss scaling (expected;
    /// not failures, not in `skipped`).
    pub overflow_skips: u64,
    /// Skipped steps that were loss spikes (`spike = ...`; also counted in `skipped`).
    pub spikes: u64,
    /// Rollbacks to a snapshot (`rollback = N`).
    pub rollbacks: u64,
    /// Failed checks that panicked or returned an error.
    pub failures: u64,
    /// The last total gradient norm read back with a step's check.
    pub last_grad_norm: Option<f64>,
    /// The loss scale as last read with a step's check, under dynamic loss scaling (of the
    /// function's own state).
    pub loss_scale: Option<f64>,
}

#[doc(hidden)]
#[derive(Debug)]
pub struct Registration(pub &'static Site);

inventory::collect!(Registration);

/// Every `#[guarded_step]` function linked into the program (in no particular order).
pub fn registry() -> impl Iterator<Item = &'static Site> {
    inventory::iter::<Registration>.into_iter().map(|r| r.0)
}

/// One guarded function, its configuration and statistics, as plain data (serialisable with
/// serde, e.g. to JSON for a logging pipeline).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteReport {
    /// The function's name.
    pub function: &'static str,
    /// Its module path.
    pub module_path: &'static str,
    /// Source file.
    pub file: &'static str,
    /// Source line.
    pub line: u32,
    /// Clipping threshold, if any.
    pub max_norm: Option<f64>,
    /// The norm type (`"2"`, `"inf"`, ...).
    pub norm_type: String,
    /// The checks in force (`"loss"`, `"grads"`, `"params"`, `"forward"`).
    pub checks: Vec<&'static str>,
    /// `"panic"`, `"error"` or `"skip"`.
    pub on_nan: &'static str,
    /// Live statistics.
    pub stats: Stats,
}

/// Every guarded function with its statistics, sorted by module and line.
pub fn report_data() -> Vec<SiteReport> {
    let mut sites: Vec<&Site> = registry().collect();
    sites.sort_by_key(|s| (s.module_path, s.line));
    sites
        .into_iter()
        .map(|s| {
            let c = s.effective_config();
            let checks = [
                ("loss", c.checks.loss),
                ("grads", c.checks.grads),
                ("params", c.checks.params),
                ("forward", c.checks.forward),
            ]
            .into_iter()
            .filter_map(|(n, on)| on.then_some(n))
            .collect();
            SiteReport {
                function: s.name,
                module_path: s.module_path,
                file: s.file,
                line: s.line,
                max_norm: c.max_norm,
                norm_type: c.norm_type.to_string(),
                checks,
                on_nan: match c.on_nan {
                    crate::config::OnNan::Panic => "panic",
                    crate::config::OnNan::Error => "error",
                    crate::config::OnNan::Skip => "skip",
                },
                stats: s.stats(),
            }
        })
        .collect()
}

/// The guarded functions and their statistics, as a plain-text table.
pub fn report() -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<32} {:>8} {:>8} {:>8} {:>8} {:>12}  config",
        "guarded step", "calls", "clipped", "skipped", "failed", "grad norm"
    );
    for r in report_data() {
        let st = r.stats;
        let norm = st
            .last_grad_norm
            .map_or_else(|| "-".to_string(), |n| format!("{n:.3e}"));
        let clip = r
            .max_norm
            .map_or_else(|| "no clip".to_string(), |m| format!("max_norm={m}"));
        let checks = if r.checks.is_empty() {
            "none".to_string()
        } else {
            r.checks.join(",")
        };
        let name = format!(
            "{}::{}",
            r.module_path.rsplit("::").next().unwrap_or(""),
            r.function
        );
        let _ = writeln!(
            out,
            "{name:<32} {:>8} {:>8} {:>8} {:>8} {norm:>12}  {clip}, checks={checks}, on_nan={} ({}:{})",
            st.calls, st.clipped, st.skipped, st.failures, r.on_nan, r.file, r.line
        );
        if st.spikes > 0 || st.rollbacks > 0 {
            let _ = writeln!(
                out,
                "{:<32} spikes skipped {}, rollbacks {}",
                "", st.spikes, st.rollbacks
            );
        }
        if st.loss_scale.is_some() || st.overflow_skips > 0 {
            let scale = st
                .loss_scale
                .map_or_else(|| "-".to_string(), |s| format!("{s}"));
            let _ = writeln!(
                out,
                "{:<32} loss scale {scale} (dynamic), overflow skips {}",
                "", st.overflow_skips
            );
        }
    }
    out
}

/// Reads every pending parameters check of every `#[guarded_step]` function (see
/// [`GuardState::flush`]); call it before saving a checkpoint and at the end of training.
///
/// # Errors
/// The first update found to have made parameters non-finite.
pub fn flush() -> Result<(), GuardError> {
    let mut first = None;
    for site in registry() {
        if let Err(e) = site.state().flush() {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::Site;
    use crate::config::Config;

    #[test]
    fn the_rollback_line_names_the_configured_interval() {
        static SITE: Site = Site::new("f", "m", "f.rs", 1, Config::DEFAULT.with_rollback(100));
        let line = SITE.rollback_line(7, 2048, true);
        assert!(line.contains("rolled back (rollback = 100)"), "{line}");
        assert!(line.contains("before update 7"), "{line}");
    }
}
