//! A `VarStore`'s buffers, saved at the start of a call and restored when its update is
//! skipped (or rolled back).

use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

use crate::error::TorchError;

/// A `VarStore`'s non-trainable variables (BatchNorm running statistics, counters) and their
/// values at the start of the call, restored when the call's update is skipped.
#[derive(Debug)]
pub(crate) struct Buffers {
    saved: Vec<(Tensor, Tensor)>,
}

impl Buffers {
    /// # Errors
    /// What libtorch raises copying a buffer (out of memory).
    pub(crate) fn snapshot(vars: &Arc<Mutex<Variables>>) -> Result<Self, TorchError> {
        let v = vars.lock().unwrap_or_else(|e| e.into_inner());
        if v.named_variables.len() <= v.trainable_variables.len() {
            // Every variable is trainable: no buffers (the common case, at no cost).
            return Ok(Buffers { saved: Vec::new() });
        }
        let trainable: std::collections::HashSet<usize> = v
            .trainable_variables
            .iter()
            .map(|t| t.tensor.data_ptr() as usize)
            .collect();
        let _guard = tch::no_grad_guard();
        let saved = v
            .named_variables
            .values()
            .filter(|t| t.defined() && !trainable.contains(&(t.data_ptr() as usize)))
            .map(|t| Ok((t.shallow_clone(), t.f_detach_copy()?)))
            .collect::<Result<_, TorchError>>()?;
        Ok(Buffers { saved })
    }

    /// Writes the saved values back.
    pub(crate) fn restore(&self) -> Result<(), TorchError> {
        let _guard = tch::no_grad_guard();
        for (live, saved) in &self.saved {
            live.shallow_clone().f_copy_(saved)?;
        }
        Ok(())
    }

    /// (live buffer, its value at the start of the call) pairs, for a snapshot.
    pub(crate) fn at_start(&self) -> impl Iterator<Item = (Tensor, Tensor)> + '_ {
        self.saved
            .iter()
            .map(|(live, saved)| (live.shallow_clone(), saved.shallow_clone()))
    }

    /// Restores the saved values where `found_inf` (0-dim) is set, on the device.
    pub(crate) fn restore_if(&self, found_inf: &Tensor) -> Result<(), TorchError> {
        let _guard = tch::no_grad_guard();
        for (live, saved) in &self.saved {
            let skip = found_inf.f_to_device(live.device())?.f_gt(0.0)?;
            let value = saved.f_where_self(&skip, live)?;
            live.shallow_clone().f_copy_(&value)?;
        }
        Ok(())
    }
}
