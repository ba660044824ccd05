//! The real `ringgate` gateway as a test server, for what the tungstenite servers cannot do
//! (permessage-deflate).
//!
//! The binary: `RINGGATE_BIN` when set; otherwise the `ringgate` Cargo builds beside the
//! `loadtest` under test (same target directory and profile), built once per test process with
//! `cargo build -p ringgate --bin ringgate` (`cargo test -p loadtest` does not build another
//! package's binary; when it is fresh, as after `cargo test --workspace`, this is a no-op).
//!
//! Started as ringgate's own tests start it: `--listen 127.0.0.1:0`, waiting (at most
//! [`STARTUP_TIMEOUT`]) for its `ringgate listening on ADDR` line. `RINGGATE_IO` in the
//! environment picks its io backend. Killed (SIGKILL) and reaped when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

/// How long the gateway gets to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `ringgate`, killed when dropped.
pub struct Gateway {
    /// `ws://127.0.0.1:PORT`, no path.
    pub base: String,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Gateway {
    /// Starts `ringgate --listen 127.0.0.1:0 --workers 1 <flags>` and waits until it listens.
    pub fn start(flags: &[&str]) -> Gateway {
        let bin = binary();
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--workers", "1"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        // From here on the guard owns the process: a failed start kills it on the way out.
        let mut gateway = Gateway { base: String::new(), child, stderr };
        let (lines_tx, lines_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Once nobody listens, keep draining so the gateway never blocks on stdout.
                let _ = lines_tx.send(line);
            }
        });
        loop {
            match lines_rx.recv_timeout(STARTUP_TIMEOUT) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("ringgate listening on ") {
                        gateway.base = format!("ws://{}", addr.trim());
                        return gateway;
                    }
                }
                Err(error) => panic!(
                    "ringgate {flags:?} did not print its listening line within {STARTUP_TIMEOUT:?} \
                     ({error}); exit status: {:?}; stderr:\n{}",
                    gateway.child.try_wait().ok().flatten(),
                    gateway.stderr()
                ),
            }
        }
    }

    /// What the gateway has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The gateway binary: `RINGGATE_BIN`, or the one beside the `loadtest` under test, brought up to
/// date by Cargo once per process.
fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RINGGATE_BIN") {
            return PathBuf::from(bin);
        }
        let loadtest = Path::new(env!("CARGO_BIN_EXE_loadtest"));
        let profile_dir = loadtest.parent().expect("loadtest's directory");
        let target_dir = profile_dir.parent().expect("the target directory");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "-p", "ringgate", "--bin", "ringgate", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") | None => {}
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
        }
        let output = cargo.output().expect("run cargo to build ringgate");
        assert!(
            output.status.success(),
            "building ringgate for the test failed (set RINGGATE_BIN to use a built one):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir.join("ringgate")
    })
}

/// Copies everything a pipe yields into a shared buffer, on a background thread.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buffer);
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
        }
    });
    buffer
}
