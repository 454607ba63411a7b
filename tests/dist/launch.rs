//! Runs this test binary as the ranks of a world on localhost: each child runs only the
//! `rank_main` test, with its role and the standard environment (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT) set. Children are always killed and reaped (`Drop`), and waited
//! for with a deadline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The variable that makes `rank_main` run a role.
pub const ROLE: &str = "STEPGUARD_DIST_TEST_ROLE";
/// The directory the ranks write their results to.
pub const OUT: &str = "STEPGUARD_DIST_TEST_OUT";

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(role: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "stepguard-dist-{role}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port nobody listens on now (the OS's choice; the ranks bind it right after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The ranks of one world (possibly fewer than `world_size` of them started).
pub struct Ranks {
    children: Vec<(usize, Child)>,
    dir: PathBuf,
}

impl Ranks {
    /// Starts `ranks` (of a world of `world_size`) in role `role`, the group's timeout
    /// `timeout_s` seconds. A world of one started here goes through c10d
    /// (`STEPGUARD_DIST_C10D=1`).
    pub fn start(
        role: &str,
        ranks: &[usize],
        world_size: usize,
        timeout_s: f64,
        dir: &Path,
    ) -> Self {
        Self::start_at(role, ranks, world_size, timeout_s, dir, free_port())
    }

    /// As [`Ranks::start`], the store at `127.0.0.1:port`.
    pub fn start_at(
        role: &str,
        ranks: &[usize],
        world_size: usize,
        timeout_s: f64,
        dir: &Path,
        port: u16,
    ) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut started = Ranks {
            children: Vec::new(),
            dir: dir.to_path_buf(),
        };
        for &rank in ranks {
            let log = |s: &str| std::fs::File::create(dir.join(format!("rank{rank}.{s}"))).unwrap();
            let child = Command::new(&exe)
                .args(["--exact", "rank_main", "--nocapture", "--test-threads=1"])
                .env(ROLE, role)
                .env(OUT, dir)
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world_size.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("STEPGUARD_DIST_TIMEOUT", timeout_s.to_string())
                .env(
                    "STEPGUARD_DIST_C10D",
                    if world_size == 1 { "1" } else { "0" },
                )
                .env("OMP_NUM_THREADS", "1")
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .stdin(Stdio::null())
                .stdout(log("stdout"))
                .stderr(log("stderr"))
                .spawn()
                .unwrap();
            started.children.push((rank, child));
        }
        started
    }

    /// Waits for `rank` to exit, at most `limit` (then kills every rank and panics).
    pub fn wait(&mut self, rank: usize, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let i = self.children.iter().position(|(r, _)| *r == rank).unwrap();
        loop {
            if let Some(status) = self.children[i].1.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill_all();
                panic!("rank {rank} still running after {limit:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every rank to exit successfully within `limit`.
    pub fn wait_all_ok(&mut self, limit: Duration) {
        let start = Instant::now();
        let ranks: Vec<usize> = self.children.iter().map(|(r, _)| *r).collect();
        for r in ranks {
            let status = self.wait(r, limit.saturating_sub(start.elapsed()));
            if !status.success() {
                self.kill_all();
                panic!("rank {r} failed: {status}\n{}", self.logs());
            }
        }
    }

    /// What every rank printed.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (r, _) in &self.children {
            for s in ["stdout", "stderr"] {
                let text = std::fs::read_to_string(self.dir.join(format!("rank{r}.{s}")));
                out += &format!("--- rank {r} {s}:\n{}\n", text.unwrap_or_default());
            }
        }
        out
    }

    /// Kills and reaps every rank still running.
    pub fn kill_all(&mut self) {
        for (_, c) in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        self.kill_all();
    }
}
