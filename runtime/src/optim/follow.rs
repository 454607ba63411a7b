//! State and grads that follow their parameter: after `vs.double()`, `vs.set_device(..)` (any
//! change of a parameter's dtype or device since its state was created), the state is cast to
//! the parameter as PyTorch's `Optimizer.load_state_dict` casts it (moments and momentum buffers
//! to the parameter's dtype and device, the step counters kept f32 and moved to its device), and
//! a grad left in the old dtype or on the old device is converted as PyTorch's `Module.to`
//! converts `.grad`. A change of shape is not followed: it is an error.

use tch::{Kind, TchError, Tensor};

use super::State;

/// The tensors a parameter's dtype and device are compared with.
fn fits(t: &Tensor, p: &Tensor) -> bool {
    t.kind() == p.kind() && t.device() == p.device()
}

/// `t` on `p`'s device, of `kind`; `t` itself (shared) when it already is.
fn cast(t: &Tensor, p: &Tensor, kind: Kind) -> Result<Tensor, TchError> {
    if t.kind() == kind && t.device() == p.device() {
        return Ok(t.shallow_clone());
    }
    t.f_to_device(p.device())?.f_to_kind(kind)
}

/// An error unless every moment and buffer of `s` has `p`'s sizes (`name` names `p`).
pub(super) fn check_sizes(s: &State, p: &Tensor, name: &str) -> Result<(), TchError> {
    let named = [
        ("momentum buffer or first moment", Some(&s.first)),
        ("second moment", s.second.as_ref()),
        ("max second moment", s.max.as_ref()),
    ];
    for (what, t) in named {
        if let Some(t) = t.filter(|t| t.size() != p.size()) {
            return Err(TchError::Shape(format!(
                "stepguard::optim: the {what} of parameter {name} is {:?}, the parameter {:?} \
                 (a parameter resized after its first step: build a new optimizer, or load a \
                 state of its shape)",
                t.size(),
                p.size()
            )));
        }
    }
    Ok(())
}

/// `s` cast to `p`'s dtype and device, or `None` when it already is `p`'s.
pub(super) fn follow(s: &State, p: &Tensor) -> Result<Option<State>, TchError> {
    let moments = [Some(&s.first), s.second.as_ref(), s.max.as_ref()];
    let step_fits = s.step.as_ref().is_none_or(|t| t.device() == p.device());
    if step_fits && moments.into_iter().flatten().all(|t| fits(t, p)) {
        return Ok(None);
    }
    let moment = |t: &Tensor| cast(t, p, p.kind());
    Ok(Some(State {
        first: moment(&s.first)?,
        second: s.second.as_ref().map(moment).transpose()?,
        max: s.max.as_ref().map(moment).transpose()?,
        step: s
            .step
            .as_ref()
            .map(|t| cast(t, p, Kind::Float))
            .transpose()?,
    }))
}

/// Whether `p`'s grad (defined) is of another dtype or on another device than `p`.
pub(super) fn grad_strays(p: &Tensor) -> bool {
    !fits(&p.grad(), p)
}

/// Converts `p`'s grad, in place, to `p`'s dtype and device (the same grad tensor: backward
/// passes accumulate into it from then on in the parameter's dtype, on its device).
pub(super) fn align_grad(p: &Tensor) -> Result<(), TchError> {
    let mut g = p.grad();
    if g.defined() && !fits(&g, p) {
        let converted = g.f_to_device(p.device())?.f_to_kind(p.kind())?;
        g.f_set_data(&converted)?;
    }
    Ok(())
}
