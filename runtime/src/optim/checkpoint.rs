//! Saving and restoring a fused optimizer's state.

use tch::{TchError, Tensor};

use super::{Algo, FusedOptimizer, State};

impl FusedOptimizer {
    /// The optimizer state (moments, buffers, step counters), named `"{index}.{kind}"`, for a
    /// checkpoint ([`FusedOptimizer::load_state`] restores it). Copies.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.state_views()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect()
    }

    /// [`FusedOptimizer::state`] without the copies: the live tensors (a checkpoint writes
    /// them out before the next step).
    pub(crate) fn state_views(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, s) in self.state.iter().enumerate() {
            let Some(s) = s else { continue };
            out.push((format!("{i}.first"), s.first.shallow_clone()));
            let named = [("second", &s.second), ("max", &s.max), ("step", &s.step)];
            for (k, t) in named {
                if let Some(t) = t {
                    out.push((format!("{i}.{k}"), t.shallow_clone()));
                }
            }
        }
        if matches!(self.algo, Algo::Sgd(_)) {
            let started = if self.sgd_started { 1.0 } else { 0.0 };
            out.push(("sgd_started".into(), Tensor::from(started)));
        }
        out
    }

    /// Writes [`FusedOptimizer::state`] to a file (tch's `save_multi` format).
    ///
    /// # Errors
    /// What libtorch reports.
    pub fn save<P: AsRef<std::path::Path>>(&self, path: P) -> Result<(), TchError> {
        let state = self.state();
        let named: Vec<(&str, &Tensor)> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::save_multi(&named, path)
    }

    /// Reads a file written by [`FusedOptimizer::save`].
    ///
    /// # Errors
    /// What libtorch reports, or an entry that is not this optimizer's.
    pub fn load<P: AsRef<std::path::Path>>(&mut self, path: P) -> Result<(), TchError> {
        let state = Tensor::load_multi(path)?;
        self.load_state(&state)
    }

    /// Restores a state saved by [`FusedOptimizer::state`]: a resumed run continues bitwise as
    /// the uninterrupted one.
    ///
    /// # Errors
    /// A name that is not this optimizer's, a moment or buffer whose dtype or shape is not its
    /// parameter's, or a step counter that is not one element. The state is then left as it was.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), TchError> {
        let trainable = self.trainable();
        let mut loaded: Vec<Option<State>> = (0..trainable.len()).map(|_| None).collect();
        let mut sgd_started = self.sgd_started;
        let bad = |n: &str| TchError::Kind(format!("stepguard::optim: unknown state entry {n}"));
        for (name, t) in state {
            if name == "sgd_started" {
                sgd_started = f64::try_from(t)? != 0.0;
                continue;
            }
            let (i, kind) = name.split_once('.').ok_or_else(|| bad(name))?;
            let i: usize = i.parse().map_err(|_| bad(name))?;
            let p = &trainable.get(i).ok_or_else(|| bad(name))?.0;
            let fits = match kind {
                "first" | "second" | "max" => t.kind() == p.kind() && t.size() == p.size(),
                "step" => t.numel() == 1,
                _ => return Err(bad(name)),
            };
            if !fits {
                return Err(TchError::Kind(format!(
                    "stepguard::optim: state entry {name} is {:?} {:?}, its parameter {:?} {:?}",
                    t.kind(),
                    t.size(),
                    p.kind(),
                    p.size()
                )));
            }
            let s = match &mut loaded[i] {
                Some(s) => s,
                slot => slot.insert(State {
                    first: p.f_zeros_like()?,
                    second: None,
                    max: None,
                    step: None,
                }),
            };
            let t = t.f_to_device(p.device())?;
            match kind {
                "first" => s.first = t,
                "second" => s.second = Some(t),
                "max" => s.max = Some(t),
                _ => s.step = Some(t),
            }
        }
        self.state = loaded;
        self.sgd_started = sgd_started;
        Ok(())
    }
}
