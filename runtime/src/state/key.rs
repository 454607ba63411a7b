//! Which set of parameters a state belongs to: where its first non-empty tensor's elements live
//! and its length.

use std::sync::{Arc, Mutex};

use tch::nn::Variables;
use tch::Tensor;

/// Identity of a set of parameters: where its first non-empty tensor's data lives (else, when
/// every tensor is empty, its first tensor's identity), and its length. A zero-size tensor's
/// data address is 0 and identifies nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    id: Id,
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    Unknown,
    Data(usize),
    Tensor(usize),
}

impl Key {
    /// Parameters the step could not identify (no `VarStore` argument, no update yet).
    pub(crate) const UNKNOWN: Key = Key {
        id: Id::Unknown,
        len: 0,
    };

    /// The key of `params`.
    pub(crate) fn of(params: &[Tensor]) -> Key {
        Key::of_tensors(params.iter(), params.len())
    }

    /// The key of a `VarStore`'s trainable variables, without cloning them.
    pub(crate) fn of_vars(vars: &Arc<Mutex<Variables>>) -> Key {
        let v = vars.lock().unwrap_or_else(|e| e.into_inner());
        let tensors = v.trainable_variables.iter().map(|var| &var.tensor);
        Key::of_tensors(tensors, v.trainable_variables.len())
    }

    fn of_tensors<'t>(tensors: impl Iterator<Item = &'t Tensor>, len: usize) -> Key {
        let mut first = None;
        for t in tensors {
            let (tensor, data) = crate::shim::identity(t);
            if data != 0 {
                return Key {
                    id: Id::Data(data),
                    len,
                };
            }
            first.get_or_insert(tensor);
        }
        match first {
            Some(tensor) if tensor != 0 => Key {
                id: Id::Tensor(tensor),
                len,
            },
            _ => Key::UNKNOWN,
        }
    }
}
