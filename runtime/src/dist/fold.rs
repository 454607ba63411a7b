//! The guard's verdicts carried by the last gradient bucket: consensus without a collective of
//! its own.
//!
//! A guard with consensus offers, on its thread, its rank's share of the verdict matrix (a
//! [`Verdicts`]). [`DataParallel::average_gradients`](super::DataParallel::average_gradients)
//! on the same group appends that share to its last f32 or f64 bucket, so the all-reduce that
//! sums those gradients also sums every rank's verdicts, and hands the reduced matrix back. The
//! guard decides whether the matrix covers its update (see `guard/consensus.rs`); when it does
//! not, it reduces its verdicts with a collective of its own.
//!
//! Whether a share is folded depends only on the program (a guard with this group alive on
//! the thread, the buckets' dtypes), never on the data, so every rank folds alike and the
//! buffers of the collective have the same length everywhere.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::ProcessGroup;

/// A guard's side of the fold.
pub(crate) trait Verdicts {
    /// This rank's share: a 1-D tensor of `kind` on `device`, zero but in this rank's row, of
    /// the same length on every rank. Infallible: whatever this rank met, it must take part.
    /// `params`: the parameters whose grads the bucket's collective averages.
    fn share(
        &self,
        device: Device,
        kind: Kind,
        rank: usize,
        world: usize,
        params: &[Tensor],
    ) -> Tensor;

    /// The share summed over the ranks (1-D, of the bucket's dtype), and the parameters whose gradients the
    /// same collective averaged (their data pointers, sorted).
    fn agreed(&self, reduced: Tensor, covered: Arc<[usize]>);
}

struct Offer {
    token: u64,
    group: usize,
    verdicts: Rc<dyn Verdicts>,
}

thread_local! {
    static OFFERS: RefCell<Vec<Offer>> = const { RefCell::new(Vec::new()) };
    static NEXT: Cell<u64> = const { Cell::new(0) };
}

/// An offer in force; withdrawn when dropped.
#[derive(Debug)]
pub(crate) struct Offered(u64);

impl Drop for Offered {
    fn drop(&mut self) {
        // `try_with`: nothing to withdraw once the thread's locals are gone.
        let _ = OFFERS.try_with(|o| o.borrow_mut().retain(|e| e.token != self.0));
    }
}

/// Offers `verdicts` to the gradient averaging of `group` on this thread, until the returned
/// value is dropped (`None` for a world of one: nothing to agree on).
pub(crate) fn offer(group: &ProcessGroup, verdicts: Rc<dyn Verdicts>) -> Option<Offered> {
    let id = group.id()?;
    let token = NEXT.with(|n| {
        let t = n.get();
        n.set(t + 1);
        t
    });
    OFFERS.with(|o| {
        o.borrow_mut().push(Offer {
            token,
            group: id,
            verdicts,
        })
    });
    Some(Offered(token))
}

/// The innermost offer for `group` on this thread.
pub(crate) fn taker(group: &ProcessGroup) -> Option<Rc<dyn Verdicts>> {
    let id = group.id()?;
    OFFERS.with(|o| {
        o.borrow()
            .iter()
            .rev()
            .find(|e| e.group == id)
            .map(|e| Rc::clone(&e.verdicts))
    })
}

/// Whether a bucket of `kind` can carry the verdicts: 0/1 flags and a loss, summed exactly
/// enough (f32: a loss to 24 bits, as it was computed).
pub(crate) fn carries(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double)
}
