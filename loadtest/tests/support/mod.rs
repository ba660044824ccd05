//! Test servers and a runner for the real `loadtest` binary.
//!
//! The servers are plain std threads with tungstenite (an independent WebSocket implementation,
//! so the client is not tested against its own protocol code), bound to 127.0.0.1 on an
//! ephemeral port. Each behaviour is what one test needs: echo, delay every echo, stall once,
//! corrupt some echoes, echo in batches, refuse some handshakes. Servers stop when dropped; the
//! runner can signal the binary as Ctrl-C would, and kills it if it overruns.

#![allow(dead_code)]

use std::io::ErrorKind;
use std::net::{IpAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub mod gateway;
pub mod pubsub;
pub mod redis;
pub mod tls;

use serde_json::Value;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::{Message, WebSocket};

/// What the test server does with each data message.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Echo at once.
    Echo,
    /// Sleep this long, then echo.
    Delay(Duration),
    /// Echo at once, except that the first message at or after `at` (from server start) on each
    /// connection waits until `at + stall`: every connection stalls together, once.
    StallOnce { at: Duration, stall: Duration },
    /// Flip one byte of every `n`th echo on each connection.
    CorruptEvery(u64),
    /// Echo at once, and send a Ping every 100 ms, counting the Pongs that come back.
    Pinging,
    /// Answer the handshake of every `n`th connection (the `n`th, `2n`th, ... accepted) with
    /// 503 Service Unavailable; echo on the others. The client sees exactly that many failed
    /// connections beside established ones.
    RejectEvery(u64),
    /// Hold each connection's echoes until `n` messages have come, then wait 20 ms for one more
    /// (a client with at most `n` in flight cannot send it: one that comes is an overrun) and echo
    /// them all together. A partial batch is echoed once no message has come for 50 ms, so a
    /// client with fewer in flight still gets its echoes, one batch per 50 ms. See
    /// [`TestServer::batches`].
    Batches(usize),
}

/// What [`Behaviour::Batches`] saw, all connections together.
#[derive(Debug, Default)]
pub struct BatchCounts {
    /// Batches echoed because they were full: the client had `n` messages in flight.
    pub full: AtomicU64,
    /// Messages that came while a full batch was held: the client had more than `n` in flight.
    pub overruns: AtomicU64,
}

/// A WebSocket server on 127.0.0.1 that runs until dropped.
pub struct TestServer {
    /// `ws://127.0.0.1:PORT/echo`.
    pub url: String,
    /// Pongs received, all connections together.
    pub pongs: Arc<AtomicU64>,
    /// The address of every accepted connection's peer.
    pub peers: Arc<Mutex<Vec<IpAddr>>>,
    /// [`Behaviour::Batches`]: full batches and overruns.
    pub batches: Arc<BatchCounts>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server with `behaviour` on an ephemeral port.
    pub fn start(behaviour: Behaviour) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("ws://{}/echo", listener.local_addr().expect("local addr"));
        listener.set_nonblocking(true).expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let pongs = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let batches = Arc::new(BatchCounts::default());
        let started = Instant::now();
        let acceptor = {
            let (stop, pongs, peers) = (Arc::clone(&stop), Arc::clone(&pongs), Arc::clone(&peers));
            let batches = Arc::clone(&batches);
            thread::spawn(move || {
                let mut accepted = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            peers.lock().unwrap_or_else(|e| e.into_inner()).push(peer.ip());
                            accepted += 1;
                            if let Behaviour::RejectEvery(n) = behaviour {
                                if accepted % n == 0 {
                                    thread::spawn(move || reject(stream));
                                    continue;
                                }
                            }
                            let (pongs, batches) = (Arc::clone(&pongs), Arc::clone(&batches));
                            thread::spawn(move || serve(stream, behaviour, started, &pongs, &batches));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        TestServer { url, pongs, peers, batches, stop, acceptor: Some(acceptor) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Bounds every connection thread even if a client never closes.
const IDLE_LIMIT: Duration = Duration::from_secs(30);

fn serve(
    stream: TcpStream,
    behaviour: Behaviour,
    started: Instant,
    pongs: &AtomicU64,
    batches: &BatchCounts,
) {
    const PING_EVERY: Duration = Duration::from_millis(100);
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tungstenite::accept(stream) else { return };
    if let Behaviour::Batches(n) = behaviour {
        return serve_batches(ws, n, batches);
    }
    let read_timeout = match behaviour {
        Behaviour::Pinging => PING_EVERY,
        _ => IDLE_LIMIT,
    };
    let _ = ws.get_ref().set_read_timeout(Some(read_timeout));
    let mut count = 0u64;
    let mut stalled = false;
    let mut last_ping = Instant::now();
    let mut last_heard = Instant::now();
    loop {
        if matches!(behaviour, Behaviour::Pinging) && last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            if ws.send(Message::Ping(b"are you there"[..].into())).is_err() {
                return;
            }
        }
        let message = match ws.read() {
            Ok(message) => message,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                    && last_heard.elapsed() < IDLE_LIMIT =>
            {
                continue;
            }
            Err(_) => return,
        };
        last_heard = Instant::now();
        let mut data = match message {
            Message::Binary(data) => data.to_vec(),
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Pong(payload) => {
                if payload.as_ref() == b"are you there" {
                    pongs.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            _ => continue,
        };
        count += 1;
        match behaviour {
            Behaviour::Echo | Behaviour::Pinging | Behaviour::Batches(_) | Behaviour::RejectEvery(_) => {}
            Behaviour::Delay(delay) => thread::sleep(delay),
            Behaviour::StallOnce { at, stall } => {
                let now = started.elapsed();
                if !stalled && now >= at {
                    stalled = true;
                    thread::sleep((at + stall).saturating_sub(now));
                }
            }
            Behaviour::CorruptEvery(n) => {
                if count % n == 0 {
                    if let Some(last) = data.last_mut() {
                        *last ^= 0xff;
                    }
                }
            }
        }
        if ws.send(Message::Binary(data.into())).is_err() {
            return;
        }
    }
}

/// [`Behaviour::RejectEvery`]: reads the upgrade request and answers 503.
#[allow(clippy::result_large_err, reason = "tungstenite's callback returns its error response by value")]
fn reject(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IDLE_LIMIT));
    let _ = tungstenite::accept_hdr(stream, |_: &Request, _: Response| {
        let mut refusal = ErrorResponse::new(Some("busy".to_string()));
        *refusal.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        Err(refusal)
    });
}

/// [`Behaviour::Batches`] on one connection.
fn serve_batches(mut ws: WebSocket<TcpStream>, n: usize, counts: &BatchCounts) {
    const FLUSH_AFTER: Duration = Duration::from_millis(50);
    const OVERRUN_WAIT: Duration = Duration::from_millis(20);
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut last_heard = Instant::now();
    loop {
        let wait = if held.len() >= n { OVERRUN_WAIT } else { FLUSH_AFTER };
        let _ = ws.get_ref().set_read_timeout(Some(wait));
        match ws.read() {
            Ok(Message::Binary(data)) => {
                if held.len() >= n {
                    counts.overruns.fetch_add(1, Ordering::Relaxed);
                }
                held.push(data.to_vec());
                last_heard = Instant::now();
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                if held.len() >= n {
                    counts.full.fetch_add(1, Ordering::Relaxed);
                }
                for data in held.drain(..) {
                    if ws.write(Message::Binary(data.into())).is_err() {
                        return;
                    }
                }
                if ws.flush().is_err() || last_heard.elapsed() > IDLE_LIMIT {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

/// A finished `loadtest` run.
pub struct Run {
    /// Exit status, stdout and stderr.
    pub output: Output,
    /// How long the binary ran.
    pub elapsed: Duration,
    /// The `--json` report, if it was written.
    pub json: Option<Value>,
    /// The directory holding the output files.
    pub dir: PathBuf,
}

impl Run {
    /// The JSON report; panics with the run's stderr if there is none.
    pub fn json(&self) -> &Value {
        self.json.as_ref().unwrap_or_else(|| panic!("no JSON report; stderr:\n{}", self.stderr()))
    }

    /// stderr as text.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// stdout as text.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// A number from the report by JSON pointer, e.g. `/latency_us/p50`.
    pub fn num(&self, pointer: &str) -> f64 {
        self.json()
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("{pointer} missing from {:#}", self.json()))
    }
}

/// Runs the real `loadtest` binary with `args` plus `--json`, killing it after `limit`.
pub fn run_loadtest(name: &str, args: &[&str], limit: Duration) -> Run {
    run_loadtest_signalled(name, args, limit, &[])
}

/// [`run_loadtest`], sending each `(after, signal)` of `signals` to the binary `after` it started
/// (in order), as an operator's Ctrl-C would.
pub fn run_loadtest_signalled(
    name: &str,
    args: &[&str],
    limit: Duration,
    signals: &[(Duration, i32)],
) -> Run {
    let dir = std::env::temp_dir().join(format!("loadtest-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start loadtest");
    let started = Instant::now();
    let mut signals = signals.iter().peekable();
    loop {
        if let Some(&(_, signal)) = signals.next_if(|(after, _)| started.elapsed() >= *after) {
            let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
            // SAFETY: kill has no memory effects; the pid is our child's, which has not been reaped.
            assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "sending signal {signal}");
        }
        match child.try_wait().expect("wait for loadtest") {
            Some(_) => break,
            None if started.elapsed() > limit => {
                let _ = child.kill();
                let output = child.wait_with_output().expect("collect output");
                panic!(
                    "loadtest ran longer than {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    }
    let elapsed = started.elapsed();
    let output = child.wait_with_output().expect("collect output");
    let json = std::fs::read_to_string(&json_path)
        .ok()
        .map(|text| serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}")));
    Run { output, elapsed, json, dir }
}

/// Asserts that a percentile object has every key and never decreases.
pub fn assert_percentiles(run: &Run, key: &str) {
    let values: Vec<f64> = ["p50", "p90", "p99", "p999", "p9999", "max"]
        .iter()
        .map(|p| run.num(&format!("/{key}/{p}")))
        .collect();
    assert!(values.windows(2).all(|w| w[0] <= w[1]), "{key} percentiles decrease: {values:?}");
}
