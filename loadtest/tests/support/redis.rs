//! A `redis-server` of the test's own, for the cross-node tests: on a free loopback port, in a
//! temporary directory, with no persistence; killed (SIGKILL) and its directory removed when the
//! guard drops.
//!
//! The binary comes from the repository's `scripts/install-brokers.sh redis` (which installs
//! Debian's package when it is missing), as ringgate's own broker tests get it; when that fails the
//! test fails, saying why. It is skipped only when the environment says so
//! (`RINGGATE_SKIP_BROKER_TESTS=1`, see [`skipped`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long the server gets to answer `PING` after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether broker tests are to be skipped (`RINGGATE_SKIP_BROKER_TESTS=1`); says so on stderr.
pub fn skipped() -> bool {
    let skip = std::env::var("RINGGATE_SKIP_BROKER_TESTS").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("RINGGATE_SKIP_BROKER_TESTS=1: broker test skipped");
    }
    skip
}

/// A running `redis-server`, killed when dropped.
pub struct Redis {
    /// `redis://127.0.0.1:PORT`, for ringgate's `--broker`.
    pub url: String,
    dir: PathBuf,
    child: Child,
}

impl Redis {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    pub fn start() -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let dir = std::env::temp_dir().join(format!("loadtest-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let log = std::fs::File::create(dir.join("server.log")).expect("redis log");
        let child = Command::new(binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server");
        let mut redis = Redis { url: format!("redis://127.0.0.1:{port}"), dir, child };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + READY_TIMEOUT;
        while !answers(addr) {
            if let Ok(Some(status)) = redis.child.try_wait() {
                panic!("redis-server exited with {status}: {}", redis.log());
            }
            assert!(Instant::now() < deadline, "redis-server did not answer within {READY_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the server answers `PING` with `+PONG`.
fn answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut answer = [0u8; 16];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read(&mut answer).is_ok_and(|n| answer[..n].starts_with(b"+PONG"))
}

/// The `redis-server` binary, from `scripts/install-brokers.sh redis`.
fn binary() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-brokers.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg("redis")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed ({}): {stdout}{}\n(set RINGGATE_SKIP_BROKER_TESTS=1 to skip the broker tests)",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("REDIS="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{} printed no REDIS= line: {stdout}", script.display()))
}
