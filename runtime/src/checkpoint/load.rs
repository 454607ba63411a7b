//! Loading named tensors into a `VarStore`: every variable checked first, then all copied.

use std::collections::hash_map::{Entry, HashMap};

use tch::nn::VarStore;
use tch::Tensor;

use super::error::CheckpointError;

/// The variables of `vs` under their names, sorted by name (what [`load_into`] expects back).
pub fn var_store_tensors(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Copies `tensors` into the variables of `vs` of the same names, on each variable's device.
///
/// Every variable must have a tensor of its exact name, shape and dtype, and every tensor a
/// variable; otherwise the error lists every difference ([`CheckpointError::Mismatch`]) and
/// no variable is changed. The tensors are moved to the variables' devices before the first
/// variable is written.
pub fn load_into(vs: &VarStore, tensors: Vec<(String, Tensor)>) -> Result<(), CheckpointError> {
    prepare(vs, tensors)?.apply()
}

/// Tensors checked against a `VarStore` and moved to its variables' devices: what
/// [`load_into`] copies, once everything else a resume loads is checked too.
pub(crate) struct Prepared(Vec<(Tensor, Tensor)>);

impl Prepared {
    /// Copies every tensor into its variable.
    pub(crate) fn apply(self) -> Result<(), CheckpointError> {
        tch::no_grad(|| {
            for (mut var, tensor) in self.0 {
                var.f_copy_(&tensor)?;
            }
            Ok(())
        })
    }
}

/// [`load_into`]'s checks and moves, nothing written.
pub(crate) fn prepare(
    vs: &VarStore,
    tensors: Vec<(String, Tensor)>,
) -> Result<Prepared, CheckpointError> {
    let mut problems = Vec::new();
    let mut given: HashMap<String, Tensor> = HashMap::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        match given.entry(name) {
            Entry::Occupied(e) => problems.push(format!("{}: given twice", e.key())),
            Entry::Vacant(e) => {
                e.insert(tensor);
            }
        }
    }
    let vars = var_store_tensors(vs);
    let mut pairs = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let Some(tensor) = given.remove(&name) else {
            problems.push(format!(
                "missing: {name} (shape {:?}, dtype {:?})",
                var.size(),
                var.f_kind()?
            ));
            continue;
        };
        let (want, got) = (var.size(), tensor.size());
        if want != got {
            problems.push(format!(
                "{name}: shape {got:?} in the checkpoint, {want:?} in the VarStore"
            ));
        }
        let (want, got) = (var.f_kind()?, tensor.f_kind()?);
        if want != got {
            problems.push(format!(
                "{name}: dtype {got:?} in the checkpoint, {want:?} in the VarStore"
            ));
        }
        pairs.push((var, tensor));
    }
    let mut unexpected: Vec<String> = given.into_keys().collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|n| format!("unexpected: {n}")));
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch(problems));
    }
    // Every fallible move to a device before the first write.
    let pairs = pairs
        .into_iter()
        .map(|(var, tensor)| {
            let tensor = tensor.f_to_device(var.device())?;
            Ok((var, tensor))
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    Ok(Prepared(pairs))
}
