//! The rendezvous, bounded by the group's timeout as a whole.
//!
//! c10d bounds each of its stages, but a client's TCPStore can overshoot: it retries a refused
//! or timed-out connection after an exponential backoff that grows past the timeout, and it
//! waits for the store's first answer without any limit (a listener that accepts and never
//! replies holds it forever). So:
//! - a client first connects to the store itself, retrying every so often until the deadline,
//!   so that c10d's own connection succeeds at once (or the error says why it could not);
//! - the c10d side (`csrc/dist.cpp`) gives each later stage what is left of the timeout;
//! - the whole runs on a thread of its own, given up on at the deadline (with a short grace for
//!   c10d's own, more telling error). A thread given up on ends with c10d's call, and closes
//!   what it made; where the store never answers, it stays blocked in c10d.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::env::Launch;
use super::error::{self, DistError, Missing};
use super::ffi;

/// How long past the deadline to wait for c10d's own error before giving up on it: its stages
/// end at the deadline, their error a little after.
const GRACE: Duration = Duration::from_millis(500);

/// The first pause before connecting again to a store that is not up yet; doubled up to
/// [`RETRY_MAX`].
const RETRY: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Why the rendezvous thread failed.
enum Failure {
    /// No connection to the store before the deadline: the last error.
    Connect(std::io::Error),
    /// c10d's error.
    C10d(ffi::Error),
}

/// Joins the group of `launch`: returns within `launch.timeout` (plus at most [`GRACE`]).
pub(crate) fn join(launch: &Launch) -> Result<ffi::Group, DistError> {
    let (rank, size, timeout) = (launch.rank, launch.world_size, launch.timeout);
    let start = Instant::now();
    // `timeout` is at most `MAX_TIMEOUT` (31 years): no overflow.
    let deadline = start.checked_add(timeout).unwrap_or(start);
    let serve = rank == 0 && !launch.agent_store;
    let (host, port) = (launch.master_addr.clone(), launch.master_port);
    let attempt = launch.attempt;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stepguard-rendezvous".into())
        .spawn(move || {
            let joined = rendezvous(&host, port, rank, size, serve, attempt, deadline);
            // Refused once `join` gave up: the group is dropped here, which closes it.
            let _ = tx.send(joined);
        })
        .map_err(|e| DistError::Failed {
            op: "rendezvous",
            rank,
            detail: format!("cannot start the rendezvous thread: {e}"),
        })?;
    let store = format!("{}:{}", launch.master_addr, launch.master_port);
    let unreachable = |detail: String| DistError::Unreachable {
        op: "rendezvous",
        rank,
        world_size: size,
        // The store is rank 0's, unless torchrun's agent serves it.
        missing: if rank != 0 && !launch.agent_store {
            Missing::Ranks(vec![0])
        } else {
            Missing::OtherThan(rank)
        },
        timed_out: true,
        timeout,
        detail,
    };
    let wait = deadline.saturating_duration_since(Instant::now()) + GRACE;
    match rx.recv_timeout(wait) {
        Ok(Ok(group)) => Ok(group),
        Ok(Err(Failure::Connect(why))) => Err(unreachable(format!(
            "cannot connect to the store at {store}: {why}"
        ))),
        Ok(Err(Failure::C10d(e))) => Err(error::from_c10d(
            e.kind,
            e.text,
            "rendezvous",
            rank,
            size,
            timeout,
        )),
        Err(RecvTimeoutError::Timeout) => Err(unreachable(format!(
            "the store at {store} accepted the connection, but the rendezvous through it did \
             not complete"
        ))),
        Err(RecvTimeoutError::Disconnected) => Err(DistError::Failed {
            op: "rendezvous",
            rank,
            detail: "the rendezvous thread ended without a result".into(),
        }),
    }
}

/// The rendezvous thread's work: the store reached (unless this rank serves it), then c10d's
/// rendezvous with what is left of the timeout.
fn rendezvous(
    host: &str,
    port: u16,
    rank: usize,
    size: usize,
    serve: bool,
    attempt: u32,
    deadline: Instant,
) -> Result<ffi::Group, Failure> {
    if !serve {
        reach(host, port, deadline).map_err(Failure::Connect)?;
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let left_ms = i64::try_from(left.as_millis()).unwrap_or(i64::MAX).max(1);
    ffi::Group::new(host, port, rank, size, serve, attempt, left_ms).map_err(Failure::C10d)
}

/// Connects to `host:port` (and closes the connection at once), trying again after a pause
/// until `deadline`; the last error where no try succeeded.
fn reach(host: &str, port: u16, deadline: Instant) -> std::io::Result<()> {
    let mut pause = RETRY;
    let mut last = std::io::Error::new(std::io::ErrorKind::TimedOut, "no time left to connect");
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(last);
        }
        match (host, port).to_socket_addrs() {
            Ok(addrs) => {
                for addr in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match TcpStream::connect_timeout(&addr, left) {
                        Ok(_) => return Ok(()),
                        Err(e) => last = e,
                    }
                }
            }
            Err(e) => last = std::io::Error::new(e.kind(), format!("cannot resolve {host}: {e}")),
        }
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_connects_to_a_listener_and_else_gives_the_last_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(reach("127.0.0.1", port, soon).is_ok());
        drop(l);
        // Nobody listens there now: refused until the deadline.
        let e = reach(
            "127.0.0.1",
            port,
            Instant::now() + Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
    }
}
