//! The grads of a list of parameters as handles that borrow the parameters' own: no handle
//! made and deleted per grad and per update.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;

use tch::Tensor;
use torch_sys::C_tensor;

use super::check;

extern "C" {
    fn sg_grad_refs(
        ts: *const *mut C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        count: *mut usize,
    ) -> *mut c_char;
}

use std::ffi::c_char;

/// The defined grads of some parameters, in order, for as long as the parameters are
/// borrowed (`'p`). Each handle is the `at::Tensor` that a parameter's autograd metadata
/// holds as its grad: it stays valid while the parameter lives, and shows the grad the
/// parameter has now. Nothing may store a different grad into a parameter while its borrowed
/// handle is used from another thread (as for any tensor written and read at once).
#[derive(Debug)]
pub(crate) struct Grads<'p> {
    handles: Vec<ManuallyDrop<Tensor>>,
    /// The handles are tch's own (a fallback), dropped with this.
    owned: bool,
    params: PhantomData<&'p Tensor>,
}

impl<'p> Grads<'p> {
    /// The defined grads of `params` (libtorch >= 2 leaves a zeroed grad undefined); one call
    /// into the shim per 32 parameters.
    pub(crate) fn of<T: Borrow<Tensor>>(params: &'p [T]) -> Grads<'p> {
        match borrowed(params) {
            Some(handles) => Grads {
                handles,
                owned: false,
                params: PhantomData,
            },
            None => Grads {
                handles: params
                    .iter()
                    .map(|p| p.borrow().grad())
                    .filter(Tensor::defined)
                    .map(ManuallyDrop::new)
                    .collect(),
                owned: true,
                params: PhantomData,
            },
        }
    }

    /// No grads.
    pub(crate) fn none() -> Grads<'p> {
        Grads {
            handles: Vec::new(),
            owned: false,
            params: PhantomData,
        }
    }
}

fn borrowed<T: Borrow<Tensor>>(ts: &[T]) -> Option<Vec<ManuallyDrop<Tensor>>> {
    const CHUNK: usize = 32;
    let mut ptrs = [std::ptr::null_mut::<C_tensor>(); CHUNK];
    let mut out = [std::ptr::null_mut::<C_tensor>(); CHUNK];
    let mut grads = Vec::with_capacity(ts.len());
    for chunk in ts.chunks(CHUNK) {
        for (p, t) in ptrs.iter_mut().zip(chunk) {
            *p = t.borrow().as_ptr() as *mut C_tensor;
        }
        let mut count = 0usize;
        // SAFETY: module preconditions; both lists hold `CHUNK >= n` elements and outlive the
        // call, which reads `n` pointers and writes at most `n` (none on an error).
        check(unsafe { sg_grad_refs(ptrs.as_ptr(), chunk.len(), out.as_mut_ptr(), &mut count) })
            .ok()?;
        // SAFETY: the first `count` elements of `out` point to the grads held by the autograd
        // metadata of parameters borrowed for `'p` (see `Grads`); wrapped in `ManuallyDrop`,
        // tch never deletes them.
        grads.extend(
            out[..count]
                .iter()
                .map(|&p| ManuallyDrop::new(unsafe { Tensor::from_ptr(p) })),
        );
    }
    Some(grads)
}

impl std::ops::Deref for Grads<'_> {
    type Target = [Tensor];

    fn deref(&self) -> &[Tensor] {
        // SAFETY: `ManuallyDrop<Tensor>` is `repr(transparent)` over `Tensor`.
        unsafe { &*(self.handles.as_slice() as *const [ManuallyDrop<Tensor>] as *const [Tensor]) }
    }
}

impl Drop for Grads<'_> {
    fn drop(&mut self) {
        if self.owned {
            for h in &mut self.handles {
                // SAFETY: an owned handle, dropped once, here.
                unsafe { ManuallyDrop::drop(h) }
            }
        }
    }
}
