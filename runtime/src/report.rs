//! Slow-path attribution: which tensors hold NaN or Inf, by name.

use std::collections::HashMap;
use std::fmt;
use tch::{Kind, Tensor};

use crate::sync;

/// Names for parameter tensors, looked up by storage (a `VarStore`'s variables and the
/// optimizer's shallow clones of them share it).
#[derive(Debug, Default, Clone)]
pub struct Names {
    by_ptr: HashMap<usize, String>,
}

impl Names {
    /// Names of every variable of a `VarStore` (`"layer1.weight"`).
    pub fn from_var_store(vs: &tch::nn::VarStore) -> Self {
        Self::from_pairs(vs.variables())
    }

    /// Names from `(name, tensor)` pairs.
    pub fn from_pairs<S: Into<String>>(pairs: impl IntoIterator<Item = (S, Tensor)>) -> Self {
        let by_ptr = pairs
            .into_iter()
            .map(|(n, t)| (t.data_ptr() as usize, n.into()))
            .collect();
        Names { by_ptr }
    }

    /// Adds the names of another set.
    pub fn extend(&mut self, other: Names) {
        self.by_ptr.extend(other.by_ptr);
    }

    /// The name of `t`, if it is known.
    pub fn get(&self, t: &Tensor) -> Option<&str> {
        self.by_ptr
            .get(&(t.data_ptr() as usize))
            .map(String::as_str)
    }

    /// The name of `t`, or `param[index]` when it is not known.
    pub fn name_or_index(names: Option<&Names>, t: &Tensor, index: usize) -> String {
        names
            .and_then(|n| n.get(t))
            .map_or_else(|| format!("param[{index}]"), str::to_owned)
    }
}

/// One tensor found holding non-finite values.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorReport {
    /// `"layer1.weight"`, `"grad of layer1.weight"`, `"loss"`, or `"param[3]"` when unnamed.
    pub name: String,
    /// Number of NaN elements.
    pub nan: i64,
    /// Number of ±Inf elements.
    pub inf: i64,
    /// Number of elements.
    pub numel: i64,
    /// Shape.
    pub shape: Vec<i64>,
}

impl fmt::Display for TensorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} NaN, {} Inf of ", self.name, self.nan, self.inf)?;
        if self.shape.is_empty() {
            write!(f, "1 value (a scalar)")
        } else {
            write!(f, "{} values {:?}", self.numel, self.shape)
        }
    }
}

/// What a tensor is, for naming reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The parameter itself.
    Param,
    /// The parameter's gradient.
    Grad,
}

/// Finds the tensors among `params` (or their grads, for [`Role::Grad`]) that hold NaN or Inf.
///
/// This is the slow path: it reads per-tensor counts back to the host (one read for all of
/// them). Undefined tensors are skipped; reports keep the order of `params`.
#[doc(hidden)]
pub fn find_non_finite(params: &[Tensor], role: Role, names: Option<&Names>) -> Vec<TensorReport> {
    find_non_finite_at(params, 0..params.len(), role, names)
}

/// [`find_non_finite`] over the tensors at `indices` only (named by their index in `params`).
pub(crate) fn find_non_finite_at(
    params: &[Tensor],
    indices: impl IntoIterator<Item = usize>,
    role: Role,
    names: Option<&Names>,
) -> Vec<TensorReport> {
    let _guard = tch::no_grad_guard();
    let mut idx = Vec::new();
    let mut counts = Vec::new();
    let mut device = None;
    for i in indices {
        let p = &params[i];
        let t = match role {
            Role::Param => p.shallow_clone(),
            Role::Grad => p.grad(),
        };
        if !t.defined() || !crate::values::can_be_non_finite(&t) {
            continue;
        }
        let (numel, shape) = (t.numel() as i64, t.size());
        let t = crate::values::values_of(&t);
        idx.push((i, numel, shape));
        let d = *device.get_or_insert(t.device());
        counts.push(t.isnan().sum(Kind::Int64).to_device(d));
        counts.push(t.isinf().sum(Kind::Int64).to_device(d));
    }
    if counts.is_empty() {
        return Vec::new();
    }
    // A device error here (after the step's own read succeeded) leaves the names out.
    let Ok(counts) = sync::read_i64s(&Tensor::stack(&counts, 0)) else {
        return Vec::new();
    };
    idx.into_iter()
        .zip(counts.chunks(2))
        .filter(|(_, c)| c[0] + c[1] > 0)
        .map(|((i, numel, shape), c)| {
            let base = Names::name_or_index(names, &params[i], i);
            let name = match role {
                Role::Param => base,
                Role::Grad => format!("grad of {base}"),
            };
            TensorReport {
                name,
                nan: c[0],
                inf: c[1],
                numel,
                shape,
            }
        })
        .collect()
}

/// Report for a single named tensor (the loss, a forward binding), or `None` if it is finite.
#[doc(hidden)]
pub fn report_tensor(name: &str, t: &Tensor) -> Option<TensorReport> {
    let _guard = tch::no_grad_guard();
    let t = crate::values::values_of(t);
    let c = Tensor::stack(&[t.isnan().sum(Kind::Int64), t.isinf().sum(Kind::Int64)], 0);
    let c = sync::read_i64s(&c).ok()?;
    (c[0] + c[1] > 0).then(|| TensorReport {
        name: name.to_owned(),
        nan: c[0],
        inf: c[1],
        numel: t.numel() as i64,
        shape: t.size(),
    })
}

/// The parameter with the largest absolute value, and that value (slow path, one read).
pub(crate) fn largest_param(params: &[Tensor], names: Option<&Names>) -> Option<(String, f64)> {
    let _guard = tch::no_grad_guard();
    let floats: Vec<(usize, &Tensor)> = params
        .iter()
        .enumerate()
        .filter(|(_, p)| p.defined() && crate::values::can_be_non_finite(p) && p.numel() > 0)
        .collect();
    let d = floats.first()?.1.device();
    let maxes: Vec<Tensor> = floats
        .iter()
        .map(|(_, p)| p.abs().max().to_kind(Kind::Double).to_device(d))
        .collect();
    let maxes = sync::read_f64s(&Tensor::stack(&maxes, 0)).ok()?;
    let (k, m) = maxes.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1))?;
    let (i, p) = floats[k];
    Some((Names::name_or_index(names, p, i), *m))
}

/// `6.7e26`, `1e20`, `0.5`, `-3`: short and readable.
pub(crate) fn number(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        let s = format!("{x:.1e}");
        return s.replace(".0e", "e");
    }
    // Four significant digits.
    let decimals = if a == 0.0 {
        0
    } else {
        (3 - a.log10().floor() as i32).clamp(0, 6) as usize
    };
    let s = format!("{x:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_are_short() {
        use super::number;
        assert_eq!(number(6.7e26), "6.7e26");
        assert_eq!(number(3e38), "3e38");
        assert_eq!(number(-1e20), "-1e20");
        assert_eq!(number(1e-5), "1e-5");
        assert_eq!(number(88.72), "88.72");
        assert_eq!(number(1686.047), "1686");
        assert_eq!(number(1000.0), "1000");
        assert_eq!(number(0.012345), "0.01235");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(-3.0), "-3");
        assert_eq!(number(0.0), "0");
    }

    use super::TensorReport;

    fn report(numel: i64, shape: Vec<i64>) -> String {
        let r = TensorReport {
            name: "loss".into(),
            nan: 1,
            inf: 0,
            numel,
            shape,
        };
        r.to_string()
    }

    #[test]
    fn a_scalar_is_called_one_and_a_tensor_shows_its_shape() {
        assert_eq!(
            report(1, vec![]),
            "loss: 1 NaN, 0 Inf of 1 value (a scalar)"
        );
        assert_eq!(
            report(6, vec![2, 3]),
            "loss: 1 NaN, 0 Inf of 6 values [2, 3]"
        );
    }
}
