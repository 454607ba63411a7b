//! The errors of `stepguard::dist`, made from c10d's exceptions.

use std::fmt;
use std::time::Duration;

use super::ffi::Kind;

/// Which ranks did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The ranks c10d (or Gloo) named in its error.
    Ranks(Vec<usize>),
    /// c10d named none: one or more of the ranks other than this one.
    OtherThan(usize),
}

/// An error of the process group.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum DistError {
    /// The launch environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...) is malformed.
    #[error("stepguard::dist: {0}")]
    Env(String),
    /// Other ranks did not arrive within the timeout, or their connection was lost (a peer
    /// exited or was killed), during `op`.
    #[error(
        "stepguard::dist: rank {rank} of {world_size}: {op}: no answer from {} {}: {detail}",
        missing_text(missing, *world_size),
        if *timed_out { format!("within {timeout:?} (timeout)") } else { "(connection lost)".into() }
    )]
    Unreachable {
        /// The operation that failed (`"rendezvous"`, `"all_reduce"`, `"broadcast"`, ...).
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// The number of processes.
        world_size: usize,
        /// The ranks that did not answer.
        missing: Missing,
        /// Whether the timeout ran out (else a connection was closed or refused).
        timed_out: bool,
        /// The group's timeout.
        timeout: Duration,
        /// c10d's message.
        detail: String,
    },
    /// A collective failed for another reason (an unsupported dtype or device, ...).
    #[error("stepguard::dist: rank {rank}: {op} failed: {detail}")]
    Failed {
        /// The operation that failed.
        op: &'static str,
        /// This process's rank.
        rank: usize,
        /// c10d's message, or stepguard's.
        detail: String,
    },
}

impl DistError {
    /// The ranks that did not answer (for [`DistError::Unreachable`]; empty otherwise). Where
    /// c10d named none, every rank but this one.
    pub fn missing_ranks(&self) -> Vec<usize> {
        match self {
            DistError::Unreachable {
                missing: Missing::Ranks(r),
                ..
            } => r.clone(),
            DistError::Unreachable {
                missing: Missing::OtherThan(me),
                world_size,
                ..
            } => (0..*world_size).filter(|r| r != me).collect(),
            _ => Vec::new(),
        }
    }
}

fn missing_text(missing: &Missing, world_size: usize) -> String {
    struct List<'a>(&'a [usize]);
    impl fmt::Display for List<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let s = if self.0.len() == 1 { "" } else { "s" };
            write!(f, "rank{s} ")?;
            for (i, r) in self.0.iter().enumerate() {
                write!(f, "{}{r}", if i == 0 { "" } else { ", " })?;
            }
            Ok(())
        }
    }
    match missing {
        Missing::Ranks(r) => List(r).to_string(),
        // With two processes, "the others" is one rank: name it.
        Missing::OtherThan(me) if world_size == 2 => List(&[usize::from(*me == 0)]).to_string(),
        Missing::OtherThan(me) => format!("rank(s) other than {me}"),
    }
}

/// Turns c10d's error (`kind`, `what()`) during `op` into a [`DistError`].
pub(crate) fn from_c10d(
    kind: Kind,
    text: String,
    op: &'static str,
    rank: usize,
    world_size: usize,
    timeout: Duration,
) -> DistError {
    let lower = text.to_lowercase();
    let timed_out = kind == Kind::Timeout
        || ["timed out", "timeout", "time out"]
            .iter()
            .any(|w| lower.contains(w));
    let lost = [
        "connection closed",
        "connection reset",
        "connection refused",
        "broken pipe",
        "socket",
        "peer",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if !(timed_out || lost || kind == Kind::Network || kind == Kind::Store) {
        return DistError::Failed {
            op,
            rank,
            detail: text,
        };
    }
    let named = ranks_named(&text, rank, world_size);
    DistError::Unreachable {
        op,
        rank,
        world_size,
        missing: if named.is_empty() {
            Missing::OtherThan(rank)
        } else {
            Missing::Ranks(named)
        },
        timed_out,
        timeout,
        detail: text,
    }
}

/// Turns an error of a tensor operation (flattening a bucket, copying it back) during `op` into
/// a [`DistError::Failed`]: libtorch's message without its C++ backtrace.
pub(crate) fn from_tch(e: tch::TchError, op: &'static str, rank: usize) -> DistError {
    let text = match e {
        tch::TchError::Torch(text) => text,
        other => other.to_string(),
    };
    let detail = match text.find("\nException raised from") {
        Some(at) => text[..at].to_string(),
        None => text,
    };
    DistError::Failed { op, rank, detail }
}

/// The ranks (other than `me`, below `world_size`) a message names: "rank 1", "Rank 1",
/// "ranks 1, 2", "rank: 3".
fn ranks_named(text: &str, me: usize, world_size: usize) -> Vec<usize> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    let mut rest = lower.as_str();
    while let Some(at) = rest.find("rank") {
        rest = &rest[at + 4..];
        let mut tail = rest.strip_prefix('s').unwrap_or(rest);
        loop {
            tail = tail.trim_start_matches([' ', ':', '=', ',', '[', '(']);
            let digits = tail.len() - tail.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            if digits == 0 {
                break;
            }
            if let Ok(r) = tail[..digits].parse::<usize>() {
                if r != me && r < world_size && !out.contains(&r) {
                    out.push(r);
                }
            }
            tail = &tail[digits..];
            if !tail.starts_with(',') {
                break;
            }
        }
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_named_in_messages() {
        assert_eq!(ranks_named("Rank 1 failed to pass", 0, 4), vec![1]);
        assert_eq!(ranks_named("ranks 1, 3 failed", 0, 4), vec![1, 3]);
        assert_eq!(ranks_named("[Rank 0] rank: 2 timed out", 0, 4), vec![2]);
        assert!(ranks_named("Connection closed by peer [127.0.0.1]:4242", 0, 2).is_empty());
        assert!(ranks_named("rank 9", 0, 4).is_empty());
    }

    #[test]
    fn a_tensor_error_keeps_libtorch_s_message_without_its_backtrace() {
        let e = tch::TchError::Torch(
            "reshape is not implemented for sparse tensors\nException raised from reshape at \
             TensorShape.cpp:1 (most recent call first):\nframe #0: ..."
                .into(),
        );
        let e = from_tch(e, "average_gradients", 1);
        assert_eq!(
            e.to_string(),
            "stepguard::dist: rank 1: average_gradients failed: reshape is not implemented for \
             sparse tensors"
        );
    }

    #[test]
    fn unreachable_names_the_other_rank() {
        let t = Duration::from_secs(5);
        let e = from_c10d(
            Kind::Other,
            "Connection closed by peer [127.0.0.1]:1".into(),
            "all_reduce",
            0,
            2,
            t,
        );
        assert_eq!(e.missing_ranks(), vec![1]);
        let text = e.to_string();
        assert!(
            text.contains("no answer from rank 1 (connection lost)"),
            "{text}"
        );
        let e = from_c10d(Kind::Timeout, "wait timeout".into(), "broadcast", 2, 4, t);
        assert_eq!(e.missing_ranks(), vec![0, 1, 3]);
        assert!(
            e.to_string()
                .contains("no answer from rank(s) other than 2 within 5s (timeout)"),
            "{e}"
        );
        let e = from_c10d(
            Kind::Other,
            "unsupported dtype".into(),
            "all_reduce",
            0,
            2,
            t,
        );
        assert!(matches!(e, DistError::Failed { .. }));
    }
}
