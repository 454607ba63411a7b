//! A loss read at once: a function with `backward()` and no update (gradient accumulation).

use super::results::{Flags, StepResults};
use super::slot::Slot;
use super::{consensus, explain, judge, StepGuard};
use crate::error::GuardError;
use crate::sources::NameSource;

impl StepGuard<'_> {
    /// Reads the loss check now (one host read), for steps where no update follows.
    pub(crate) fn check_loss_now(
        &mut self,
        names: Option<&dyn NameSource>,
    ) -> Result<(), GuardError> {
        let mut obs = std::mem::take(&mut self.obs);
        let folded = self
            .take_folded(super::offer::count(&obs), None)
            .filter(|f| f.covers_loss_read())
            .map(|f| f.matrix);
        let is_folded = folded.is_some();
        let mut results = StepResults::default();
        results.flags[Slot::Forward] = std::mem::take(&mut obs.flag);
        let step = self.next_update();
        // With a process group, every rank's verdict before the read.
        if let Err(message) = self.agree_ranks(&mut results, folded, &obs, None, None) {
            return Err(self.device_error(message, step));
        }
        let (ok, ranks): (Flags<bool>, _) = match results.read() {
            Ok(read) => (read.ok, read.ranks),
            Err(message) => return Err(self.device_error(message, step)),
        };
        if judge::judge(&ok) == judge::Judgement::Pass {
            return Ok(());
        }
        let ranks = self
            .group()
            .and_then(|g| consensus::Ranks::new(&ranks, g.rank(), is_folded.then_some(&ok)));
        if let Some((check, diagnosis, on)) = ranks.as_ref().and_then(|r| r.elsewhere()) {
            let mut e = self.error(check, Vec::new(), diagnosis, step);
            e.ranks = on;
            return Err(e);
        }
        let seen = ranks.and_then(|r| r.first_failure()).map(|(_, on)| on);
        let names = names.or(self.known.names).map(|n| n.names());
        let subject = explain::Subject {
            origin: self.origin(),
            update: step,
            pending: None,
            params: &[],
            obs: &obs,
            names: names.as_ref(),
            protected: self.protected,
            max_norm: None,
            grad_norm: self.last.norm,
        };
        subject
            .explain(&ok, Vec::new, Vec::new)
            .map_or(Ok(()), |mut e| {
                e.ranks = seen.unwrap_or_default();
                Err(e)
            })
    }
}
