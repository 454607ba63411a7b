//! A copy of a model's state (parameters, optimizer state, buffers) on its own device,
//! refreshed in place with device copies (no host read).

use tch::{TchError, Tensor};

/// The state of one good update.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// (live tensor, its saved copy).
    pairs: Vec<(Tensor, Tensor)>,
    /// The update (index per set of parameters) and the call it was taken before.
    pub update: u64,
    pub call: u64,
    /// How many optimizer-state tensors it holds (state created lazily changes the count).
    pub optimizer_tensors: usize,
}

impl Snapshot {
    /// Copies `sources` (what each live tensor must be restored to: the live tensor itself, or
    /// a copy taken earlier) into this snapshot: in place when the tensors are the same as last
    /// time, else into fresh memory. No host read.
    pub(crate) fn refresh(
        slot: &mut Option<Snapshot>,
        pairs: Vec<(Tensor, Tensor)>,
        update: u64,
        call: u64,
        optimizer_tensors: usize,
    ) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let same = |s: &&mut Snapshot| {
            s.pairs.len() == pairs.len()
                && s.pairs.iter().zip(&pairs).all(|((a, saved), (b, src))| {
                    a.data_ptr() == b.data_ptr() && saved.size() == src.size()
                })
        };
        if let Some(s) = slot.as_mut().filter(same) {
            for ((_, saved), (_, src)) in s.pairs.iter_mut().zip(&pairs) {
                saved.f_copy_(src)?;
            }
            s.update = update;
            s.call = call;
            return Ok(());
        }
        let mut copied = Vec::with_capacity(pairs.len());
        for (live, src) in pairs {
            let mut saved = src.f_zeros_like()?;
            saved.f_copy_(&src)?;
            copied.push((live, saved));
        }
        *slot = Some(Snapshot {
            pairs: copied,
            update,
            call,
            optimizer_tensors,
        });
        Ok(())
    }

    /// A snapshot read back from a checkpoint: (live tensor, its saved copy on the same
    /// device) pairs, in the order they were saved.
    pub(crate) fn resumed(
        pairs: Vec<(Tensor, Tensor)>,
        update: u64,
        call: u64,
        optimizer_tensors: usize,
    ) -> Snapshot {
        Snapshot {
            pairs,
            update,
            call,
            optimizer_tensors,
        }
    }

    /// (live tensor, its saved copy) pairs, for a checkpoint.
    pub(crate) fn pairs(&self) -> &[(Tensor, Tensor)] {
        &self.pairs
    }

    /// Writes the saved values back into the live tensors (device copies).
    pub(crate) fn restore(&self) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        for (live, saved) in &self.pairs {
            live.shallow_clone().f_copy_(saved)?;
        }
        Ok(())
    }

    /// Bytes held by the saved copies.
    pub(crate) fn bytes(&self) -> usize {
        self.pairs
            .iter()
            .map(|(_, s)| s.numel() * s.kind().elt_size_in_bytes())
            .sum()
    }
}
