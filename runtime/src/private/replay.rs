//! A failed call replayed: the first run of a guarded call (the probe) stops at a failure a
//! replay can explain, with nothing applied, and the call runs once more with the ATen observer
//! armed ([`crate::replay`]); the second run's failure carries what the observer found, and the
//! policy acts on it then. `#[guarded_step]` passes its body as the closure of [`replay`].
//!
//! What the probe changed is undone before the replay: the update's state goes back to the
//! [`GuardState`](crate::GuardState) as it was, the grads are zeroed and the buffers restored
//! (as a skip does), the random generators restored to the call's start, and the registry
//! counts the call once.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

use crate::error::{Check, GuardError};
use crate::guard::StepGuard;
use crate::registry::Site;
use crate::replay::{Role, Traced, Watch};
use crate::shim::Generators;

/// How a run of a guarded call goes (what the body's `Ctx` is told).
#[derive(Debug)]
pub struct Replay(pub(crate) Mode);

#[derive(Debug)]
pub(crate) enum Mode {
    /// No replay: why (the body cannot run twice, `diagnose = "off"`, ...).
    Off(&'static str),
    /// The first run: a failure a replay can explain stops it.
    Probe,
    /// The second run, after the first stopped.
    Armed(Box<Stop>),
}

/// Why the first run stopped: its failure and where.
#[derive(Debug)]
pub(crate) struct Stop {
    /// The failure, as the first run found it.
    error: GuardError,
    /// Its verdict's place among the call's verdicts (0: the first).
    at: usize,
    /// Why the replay runs without the observer, when it does.
    unarmed: Option<String>,
}

impl Replay {
    /// A call whose body cannot run twice: its failures say `why` there was no replay.
    pub const fn off(why: &'static str) -> Replay {
        Replay(Mode::Off(why))
    }
}

/// Runs a guarded call: `body` once, and once more with the observer armed when its first run
/// stops at a failure a replay can explain (see `Run::verdict`).
pub fn replay<R>(site: &'static Site, mut body: impl FnMut(Replay) -> R) -> R {
    if cfg!(panic = "abort") {
        return body(Replay::off("built with `panic = \"abort\"`"));
    }
    if site.effective_config().diagnose == crate::Diagnose::Off {
        return body(Replay::off("`checks(diagnose = \"off\")`"));
    }
    if crate::replay::armed() {
        return body(Replay::off("another call was being replayed"));
    }
    let Ok(generators) = Generators::save() else {
        return body(Replay::off("the random generators could not be saved"));
    };
    let first = catch_unwind(AssertUnwindSafe(|| body(Replay(Mode::Probe))));
    match first {
        Ok(r) => r,
        Err(payload) => match payload.downcast::<Stop>() {
            Ok(mut stop) => {
                if let Err(e) = generators.restore() {
                    stop.unarmed =
                        Some(format!("the random generators could not be restored: {e}"));
                }
                body(Replay(Mode::Armed(stop)))
            }
            Err(other) => resume_unwind(other),
        },
    }
}

/// A call's part of a replay, kept by its `Ctx`.
#[derive(Debug)]
pub(crate) struct Run {
    mode: Mode,
    /// Verdicts seen so far in this run.
    verdicts: usize,
    /// An update of this run was applied (a replay would apply it twice).
    applied: bool,
    /// The replay's observer, while armed.
    watch: Option<Watch>,
    /// Why the replay runs without it.
    unarmed: Option<String>,
}

impl Run {
    /// A run of `guard`'s call that goes as `replay` says; a replay arms the observer now,
    /// with the parameters of `vars` and the tensor arguments `args` named, and counts the call
    /// as the first run's.
    pub(crate) fn start(
        replay: Replay,
        guard: &mut StepGuard<'_>,
        site: &Site,
        vars: &[Arc<Mutex<Variables>>],
        args: &[(&'static str, &Tensor)],
    ) -> Run {
        let mut run = Run {
            mode: replay.0,
            verdicts: 0,
            applied: false,
            watch: None,
            unarmed: None,
        };
        if let Mode::Armed(stop) = &mut run.mode {
            run.unarmed = stop.unarmed.take();
        }
        if guard.config().sync == crate::SyncMode::Deferred {
            run.mode = Mode::Off("`sync = \"deferred\"` reads a verdict after its batch is gone");
        } else if matches!(run.mode, Mode::Probe)
            && guard.rank().is_none()
            && crate::dist::ranks_alive()
        {
            run.mode = Mode::Off(
                "a data-parallel process without `group = ..`: the ranks do not agree on the \
                 failure, so a replay's collectives would not match theirs",
            );
        }
        match &run.mode {
            Mode::Probe => guard.save_buffers_always(vars),
            Mode::Armed(stop) => {
                guard.count_as_call(stop.error.call);
                site.calls
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                if stop.unarmed.is_none() {
                    let named = named_parameters(vars);
                    let refs: Vec<(String, &Tensor, Role)> = named
                        .iter()
                        .map(|(n, t)| (n.clone(), t, Role::Parameter))
                        .chain(
                            args.iter()
                                .map(|(n, t)| (n.to_string(), *t, Role::Argument)),
                        )
                        .collect();
                    match Watch::arm(&refs) {
                        Ok(w) => run.watch = Some(w),
                        Err(e) => run.unarmed = Some(format!("the ATen observer: {e}")),
                    }
                }
            }
            Mode::Off(_) => {}
        }
        run
    }

    /// No replay, and nothing said of it (a call not run through [`replay`]).
    pub(crate) fn off() -> Run {
        Run {
            mode: Mode::Off(""),
            verdicts: 0,
            applied: false,
            watch: None,
            unarmed: None,
        }
    }

    /// While a replay's observer is armed: the guard's own operators (its checks, the read)
    /// are kept out of the record until this is dropped.
    pub(crate) fn unrecorded(&self) -> Option<crate::shim::Unrecorded> {
        self.watch
            .as_ref()
            .map(|_| crate::shim::Unrecorded::start())
    }

    /// An update of this call was applied.
    pub(crate) fn applied(&mut self) {
        self.applied = true;
    }

    /// A verdict of this run, before the policy acts on it. The probe stops at a failure a
    /// replay can explain (nothing applied yet in the call, the first failure of this function
    /// and check): the update's state goes back as it was, the grads are zeroed and the
    /// buffers restored, and the call unwinds to [`replay`]. The replay's verdict at the same
    /// place ends the observer's watch and carries what it found; a verdict that passes there
    /// is the first run's failure, "not reproduced". Otherwise a failure says why there was no
    /// replay.
    pub(crate) fn verdict(
        &mut self,
        r: Result<(), GuardError>,
        guard: &mut StepGuard<'_>,
        params: &[Tensor],
        site: &Site,
    ) -> Result<(), GuardError> {
        let at = self.verdicts;
        self.verdicts += 1;
        match &mut self.mode {
            Mode::Off(why) => {
                let why = *why;
                r.map_err(|mut e| {
                    if explains(&e) && !why.is_empty() {
                        e.origin = Some(Traced::NotReplayed(why.to_string()));
                    }
                    e
                })
            }
            Mode::Probe => match r {
                Err(e) if explains(&e) && !self.applied && site.first_replay(e.check) => {
                    guard.abort_update();
                    StepGuard::zero_grads(params);
                    guard.restore_call_buffers();
                    resume_unwind(Box::new(Stop {
                        error: e,
                        at,
                        unarmed: None,
                    }))
                }
                Err(mut e) if explains(&e) => {
                    if self.applied {
                        e.origin = Some(Traced::NotReplayed(
                            "an earlier update of the call was applied".into(),
                        ));
                    }
                    Err(e)
                }
                r => r,
            },
            Mode::Armed(stop) => {
                if r.is_ok() && at < stop.at {
                    return r;
                }
                let watch = self.watch.take();
                let rank = guard.rank();
                let origin = match (watch.map(Watch::finish), &r) {
                    (None, _) => Traced::NotReplayed(
                        self.unarmed.take().unwrap_or_else(|| "no observer".into()),
                    ),
                    (Some(_), Ok(())) => Traced::NotReproduced,
                    (Some(Ok(Some(finding))), Err(_)) => Traced::Found {
                        finding: Box::new(finding),
                        rank,
                    },
                    (Some(Ok(None)), Err(_)) => Traced::Unseen,
                    (Some(Err(e)), Err(_)) => {
                        Traced::NotReplayed(format!("the ATen observer failed: {e}"))
                    }
                };
                let mut error = r.err().unwrap_or_else(|| stop.error.clone());
                error.origin = Some(origin);
                self.mode = Mode::Off("the call was replayed already");
                Err(error)
            }
        }
    }

    /// The end of the call: a replay whose body never came back to the failure (it took
    /// another path) reports the first run's failure, not reproduced.
    pub(crate) fn finish(&mut self) {
        if let Mode::Armed(stop) = &self.mode {
            let mut e = stop.error.clone();
            e.origin = Some(Traced::NotReproduced);
            crate::events::failed(&e);
            eprintln!("{e}\n  => the replay of this failed call ended without reaching it");
        }
        self.watch = None;
    }
}

/// Whether a replay can explain the failure: a NaN/Inf found in the loss, the forward pass or
/// the grads (not an overflow under loss scaling, which is expected).
fn explains(e: &GuardError) -> bool {
    matches!(e.check, Check::Loss | Check::Forward | Check::Grads) && !e.is_overflow()
}

/// The named variables of `vars` (parameters and buffers), by their `VarStore` names.
fn named_parameters(vars: &[Arc<Mutex<Variables>>]) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for v in vars {
        let v = v.lock().unwrap_or_else(|e| e.into_inner());
        out.extend(
            v.named_variables
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone())),
        );
    }
    out
}
