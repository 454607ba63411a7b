//! The rendezvous ends within the group's timeout when the store does not answer: a listener
//! that accepts connections but never replies (a stopped or wedged rank 0), a port nobody
//! listens on (rank 0 never came), or a rank that never joins rank 0's store. Each rank times
//! its own `ProcessGroup::from_env` (see `rank_main`), so the bound does not include starting
//! the process.

use std::net::TcpListener;

use super::launch::{free_port, Ranks, Scratch};
use super::LIMIT;

const TIMEOUT_S: f64 = 3.0;
/// The bound: the timeout and a margin for a loaded machine (a correctness bound, not a
/// benchmark).
const BOUND_MS: u128 = 3_000 + 1_500;

/// Runs `rank` of 2 alone, the store at `127.0.0.1:port`; its error and how long it took.
fn alone(rank: usize, port: u16, what: &str) -> (u128, String) {
    let dir = Scratch::new(what);
    let mut ranks = Ranks::start_at("rendezvous", &[rank], 2, TIMEOUT_S, &dir.0, port);
    ranks.wait_all_ok(LIMIT.min(std::time::Duration::from_secs(30)));
    let text = std::fs::read_to_string(dir.0.join("error"))
        .unwrap_or_else(|e| panic!("{what}: no error written ({e})\n{}", ranks.logs()));
    let (ms, e) = text.split_once('\n').unwrap();
    eprintln!("{what}: after {ms} ms: {e}");
    (ms.parse().unwrap(), e.to_string())
}

fn assert_timely(what: &str, ms: u128, e: &str, missing: usize) {
    assert!(
        ms < BOUND_MS,
        "{what}: {ms} ms, past the bound {BOUND_MS} ms: {e}"
    );
    let no_answer = format!("no answer from rank {missing} within 3s (timeout)");
    assert!(
        e.contains("rendezvous") && e.contains(&no_answer),
        "{what}: {e}"
    );
}

#[test]
fn a_store_that_never_answers_ends_the_rendezvous_within_the_timeout() {
    // Accepts (the kernel completes the handshake) and never reads nor writes.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (ms, e) = alone(1, port, "silent");
    drop(silent);
    assert_timely("a silent store", ms, &e, 0);
}

#[test]
fn a_store_nobody_serves_ends_the_rendezvous_within_the_timeout() {
    let (ms, e) = alone(1, free_port(), "refused");
    assert_timely("a refused connection", ms, &e, 0);
    // Why: not a "timed out while trying to connect".
    assert!(
        e.contains("cannot connect to the store") && e.contains("refused"),
        "{e}"
    );
}

#[test]
fn a_rank_that_never_comes_ends_the_rendezvous_within_the_timeout_naming_it() {
    let (ms, e) = alone(0, free_port(), "alone");
    assert_timely("rank 0 alone", ms, &e, 1);
    assert!(e.contains("rank 1 did not join the store"), "{e}");
}
