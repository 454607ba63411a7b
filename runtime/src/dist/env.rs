//! The standard environment of a distributed launch, as `torchrun` sets it.

use std::time::Duration;

use super::error::DistError;

/// Where this process stands in a distributed run and how to reach rank 0: the variables
/// `torchrun` (and `torch.distributed`'s `env://`) use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// `RANK`: this process's rank, `0..world_size`.
    pub rank: usize,
    /// `WORLD_SIZE`: the number of processes.
    pub world_size: usize,
    /// `LOCAL_RANK`: the rank on this machine (the GPU to use); `rank` when unset.
    pub local_rank: usize,
    /// `MASTER_ADDR`: the host of rank 0, which serves the rendezvous store.
    pub master_addr: String,
    /// `MASTER_PORT`: the store's port.
    pub master_port: u16,
    /// How long the rendezvous and every collective may wait for the other ranks
    /// (`STEPGUARD_DIST_TIMEOUT` seconds); at most [`MAX_TIMEOUT`], a longer one is cut to it.
    pub timeout: Duration,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`: torchrun's agent already serves the store at
    /// `MASTER_ADDR:MASTER_PORT`, so rank 0 joins it as a client instead of serving one.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: which start of the group this is (0 the first; torchrun's
    /// `--max-restarts` starts every rank again with 1, 2, ...). Each start rendezvous under
    /// keys of its own in the store, which torchrun's agent keeps across restarts.
    pub attempt: u32,
    /// `STEPGUARD_DIST_C10D=1`: a world of one process still goes through c10d (the store at
    /// `MASTER_ADDR:MASTER_PORT`, Gloo or NCCL), as with more ranks: to run one GPU through
    /// NCCL. Off by default: a world of one needs no launcher and does no collective.
    pub c10d: bool,
}

/// The timeout when neither the caller nor `STEPGUARD_DIST_TIMEOUT` sets one: 10 minutes
/// (PyTorch's own default for Gloo is 30).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The longest timeout: 10⁹ seconds (about 31 years), for "no timeout in practice". c10d
/// computes its deadlines in nanoseconds of a 64-bit clock, which a longer one would overflow;
/// `STEPGUARD_DIST_TIMEOUT` above it is an error, a longer [`Launch::timeout`] is cut to it.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(1_000_000_000);

/// `STEPGUARD_DIST_TIMEOUT`'s value as a timeout: a number of seconds in (0, [`MAX_TIMEOUT`]].
fn parse_timeout(v: &str) -> Option<Duration> {
    let s = v.trim().parse::<f64>().ok()?;
    // Negative, NaN, infinite or past `Duration::MAX`: an error, not a panic.
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero() && *d <= MAX_TIMEOUT)
}

impl Launch {
    /// A world of one process: no store, no network, every collective a no-op.
    pub fn single() -> Self {
        Launch {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            timeout: DEFAULT_TIMEOUT,
            agent_store: false,
            attempt: 0,
            c10d: false,
        }
    }

    /// Reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
    /// `TORCHELASTIC_USE_AGENT_STORE`, `TORCHELASTIC_RESTART_COUNT`, `STEPGUARD_DIST_TIMEOUT` (seconds) and
    /// `STEPGUARD_DIST_C10D` from the process environment. Without `WORLD_SIZE` (a plain
    /// `cargo run`), or with `WORLD_SIZE=1`, a world of one (through c10d only with
    /// `STEPGUARD_DIST_C10D=1`).
    pub fn from_env() -> Result<Self, DistError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`Launch::from_env`], with the variables read through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, DistError> {
        let number = |k: &str| -> Result<Option<usize>, DistError> {
            match var(k) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    DistError::Env(format!("{k}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let timeout = match var("STEPGUARD_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => parse_timeout(&v).ok_or_else(|| {
                DistError::Env(format!(
                    "STEPGUARD_DIST_TIMEOUT={v:?} is not a number of seconds greater than 0 and \
                     at most {} (about 31 years)",
                    MAX_TIMEOUT.as_secs()
                ))
            })?,
        };
        let world_size = number("WORLD_SIZE")?.unwrap_or(1);
        let rank = number("RANK")?.unwrap_or(0);
        if world_size == 0 {
            return Err(DistError::Env("WORLD_SIZE=0".into()));
        }
        if rank >= world_size {
            return Err(DistError::Env(format!(
                "RANK={rank} is not below WORLD_SIZE={world_size}"
            )));
        }
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        let c10d = var("STEPGUARD_DIST_C10D").is_some_and(|v| {
            let v = v.trim();
            v == "1" || v.eq_ignore_ascii_case("true")
        });
        if world_size == 1 && !c10d {
            return Ok(Launch {
                local_rank,
                timeout,
                ..Launch::single()
            });
        }
        let master_addr = var("MASTER_ADDR")
            .filter(|a| !a.trim().is_empty())
            .ok_or_else(|| DistError::Env(format!("WORLD_SIZE={world_size} but no MASTER_ADDR")))?;
        let port = number("MASTER_PORT")?
            .ok_or_else(|| DistError::Env(format!("WORLD_SIZE={world_size} but no MASTER_PORT")))?;
        let master_port = u16::try_from(port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| DistError::Env(format!("MASTER_PORT={port} is not a port")))?;
        Ok(Launch {
            rank,
            world_size,
            local_rank,
            master_addr: master_addr.trim().to_string(),
            master_port,
            timeout,
            agent_store: var("TORCHELASTIC_USE_AGENT_STORE")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1"),
            attempt: number("TORCHELASTIC_RESTART_COUNT")?
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
                .unwrap_or(0),
            c10d,
        })
    }

    /// The same launch with another timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Launch { timeout, ..self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch, DistError> {
        Launch::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_variables_is_a_world_of_one() {
        assert_eq!(launch(&[]).unwrap(), Launch::single());
        let one = launch(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap();
        assert_eq!(one.world_size, 1);
    }

    #[test]
    fn torchrun_variables() {
        let l = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29500"),
            ("STEPGUARD_DIST_TIMEOUT", "2.5"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap();
        assert!(l.agent_store);
        assert_eq!((l.rank, l.world_size, l.local_rank), (1, 2, 1));
        assert_eq!(
            (l.master_addr.as_str(), l.master_port),
            ("127.0.0.1", 29500)
        );
        assert_eq!(l.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn a_world_of_one_through_c10d_when_asked() {
        let one = [
            ("WORLD_SIZE", "1"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "7"),
        ];
        assert!(!launch(&one).unwrap().c10d);
        let l = launch(&[one[0], one[1], one[2], ("STEPGUARD_DIST_C10D", "1")]).unwrap();
        assert!(l.c10d);
        assert_eq!((l.world_size, l.master_port), (1, 7));
        // It needs the store's address, as with more ranks.
        assert!(launch(&[("STEPGUARD_DIST_C10D", "1")]).is_err());
    }

    #[test]
    fn a_timeout_out_of_range_is_an_error_naming_the_range() {
        for v in ["1e20", "1e300", "1e10", "inf", "NaN", "0", "-1", "soon"] {
            let e = launch(&[("STEPGUARD_DIST_TIMEOUT", v)]).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, DistError::Env(_)), "{v}: {e:?}");
            assert!(
                text.contains("STEPGUARD_DIST_TIMEOUT")
                    && text.contains("greater than 0")
                    && text.contains("at most 1000000000"),
                "{v}: {text}"
            );
        }
        // The bounds themselves: the largest timeout, and a tiny positive one.
        let max = launch(&[("STEPGUARD_DIST_TIMEOUT", "1e9")]).unwrap();
        assert_eq!(max.timeout, MAX_TIMEOUT);
        let tiny = launch(&[("STEPGUARD_DIST_TIMEOUT", "0.000001")]).unwrap();
        assert_eq!(tiny.timeout, Duration::from_micros(1));
    }

    #[test]
    fn bad_variables_are_errors() {
        let (a, p) = (("MASTER_ADDR", "h"), ("MASTER_PORT", "1"));
        for vars in [
            vec![("WORLD_SIZE", "2"), ("RANK", "2"), a, p],
            vec![("WORLD_SIZE", "two"), a, p],
            vec![("WORLD_SIZE", "0"), a, p],
            vec![("WORLD_SIZE", "2"), a, ("MASTER_PORT", "70000")],
            vec![("WORLD_SIZE", "2"), p],
            vec![("WORLD_SIZE", "2"), a],
            vec![("STEPGUARD_DIST_TIMEOUT", "-1")],
        ] {
            assert!(
                matches!(launch(&vars), Err(DistError::Env(_))),
                "{vars:?} accepted"
            );
        }
    }
}
