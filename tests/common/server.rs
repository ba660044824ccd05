//! A guard around one running `ringgate` process.
//!
//! [`Server::start`] runs the binary Cargo built for this test run on `127.0.0.1:0` with two workers
//! and the test's own flags, and waits (at most [`STARTUP_TIMEOUT`]) for the `ringgate listening on`
//! line on stdout, so that a server that fails to start fails the test instead of hanging it.
//! Dropping the guard kills the process (SIGKILL) and reaps it. Stdout and stderr are drained by
//! background threads so that a chatty server can never block on a full pipe; stderr is kept for
//! assertions and failure messages.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tungstenite::WebSocket;
use tungstenite::protocol::WebSocketConfig;

use super::wire::{self, IO_TIMEOUT};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ringgate");
/// How long the server gets to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `ringgate`, killed when dropped.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: Arc<Mutex<Vec<u8>>>,
    exited: Option<ExitStatus>,
}

impl Server {
    /// Starts `ringgate --listen 127.0.0.1:0 --workers 2 <flags>` (unless `flags` name the workers)
    /// and waits until it listens.
    pub fn start(flags: &[&str]) -> Server {
        Server::start_configured(flags, |_| {})
    }

    /// Like [`Server::start`], with the command adjusted first (environment, resource limits).
    pub fn start_configured(flags: &[&str], configure: impl FnOnce(&mut Command)) -> Server {
        let mut command = Command::new(BIN);
        command.args(["--listen", "127.0.0.1:0"]);
        if !flags.contains(&"--workers") {
            command.args(["--workers", "2"]);
        }
        command.args(flags);
        configure(&mut command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain_in_background(child.stderr.take().expect("piped stderr"));
        // From here on the guard owns the process: a failed start kills it on the way out.
        let mut server = Server { child, addr: SocketAddr::from(([0, 0, 0, 0], 0)), stderr, exited: None };

        let (lines_tx, lines_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    // Nobody listens any more: keep draining so the server never blocks on stdout.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("ringgate listening on ") {
                        server.addr = addr
                            .trim()
                            .parse()
                            .unwrap_or_else(|e| panic!("unparseable listening line {line:?}: {e}"));
                        return server;
                    }
                }
                Err(error) => panic!(
                    "ringgate {flags:?} did not print its listening line within {STARTUP_TIMEOUT:?} \
                     ({error}); exit status: {:?}; stderr:\n{}",
                    server.child.try_wait().ok().flatten(),
                    server.stderr()
                ),
            }
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety requirements; the pid is our own, unreaped child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed: {}", std::io::Error::last_os_error());
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's resident set size in KiB, from `/proc/<pid>/status`.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// A plain TCP connection to the server, with read and write timeouts set.
    pub fn connect(&self) -> TcpStream {
        wire::connect(self.addr)
    }

    /// A raw WebSocket client on `/echo`, upgraded.
    pub fn raw_client(&self) -> wire::Client {
        wire::Client::connect(self.addr, "/echo")
    }

    /// A `tungstenite` client on `path`, upgraded. Its socket has [`IO_TIMEOUT`] read and write
    /// timeouts, and it accepts messages up to 64 MiB.
    pub fn ws_client(&self, path: &str) -> WebSocket<TcpStream> {
        let stream = self.connect();
        let config =
            WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20));
        let url = format!("ws://{}{path}", self.addr);
        let (ws, response) = tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
            .unwrap_or_else(|e| panic!("WebSocket handshake with {url} failed: {e}"));
        assert_eq!(response.status().as_u16(), 101);
        ws
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies everything a pipe yields into a shared buffer, on a background thread.
fn drain_in_background(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buffer);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().expect("stderr lock").extend_from_slice(&chunk[..n]);
        }
    });
    buffer
}

/// Runs `ringgate <args>` (no default flags) to completion, for start-up failures. Returns its exit
/// status and stderr; fails the test if it is still running after `timeout`.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    let stderr = drain_in_background(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringgate {args:?} still running after {timeout:?}; it should have exited");
        }
        thread::sleep(Duration::from_millis(10));
    };
    // The pipe closes with the process; give the drain thread a moment to take the last bytes.
    let until = Instant::now() + IO_TIMEOUT;
    while Arc::strong_count(&stderr) > 1 && Instant::now() < until {
        thread::sleep(Duration::from_millis(5));
    }
    let text = String::from_utf8_lossy(&stderr.lock().expect("stderr lock")).into_owned();
    (status, text)
}
