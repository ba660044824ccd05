//! The I/O layer: the only part of ringgate that touches sockets.
//!
//! [`run`] binds the listeners, picks the backend (`driver`, our io_uring driver, or `epoll`, for
//! hosts where io_uring is blocked; see [`IoChoice`]), starts one worker per core (`worker`), each a
//! loop over its backend and a slab of connection state machines (`conn`), then waits for
//! SIGTERM/SIGINT and drains. The state machines know nothing of the backend: both produce the same
//! completion-shaped events (`backend`).
//!
//! Must never: let a setup failure surface as a panic; every start-up error is a [`StartError`]
//! with a message that names the fix.

mod backend;
mod buffers;
mod clock;
mod conn;
mod context;
mod driver;
mod epoll;
mod outgoing;
mod process;
pub mod sockopt;
pub mod stamp;
pub mod tls;
mod token;
mod wake;
mod worker;

use std::cell::Cell;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::task::Waker;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::{Config, IoChoice};
use crate::gateway::address_limits::AddressLimits;
use crate::gateway::auth::{Authenticator, KeyError, RouteAuth};
use crate::gateway::cluster::{self, BrokerError, Link};
use crate::gateway::compression::Compressor;
use crate::gateway::proxy::ProxyPool;
use crate::gateway::pubsub::{Broker, BrokerSettings, Hub};
use crate::metrics::{WorkerStats, totals};
use crate::proto::handshake::{DEFAULT_MAX_HEADER_BYTES, StaticPolicy};
use crate::proto::message::Limits;
use crate::tls::TlsTerminator;
use crate::tls::certs::CertError;
use context::WorkerContext;
use worker::WorkerSetup;

pub use backend::{Backend, BackendCounters, Event, Received};
pub use buffers::process_after_tail;
pub use driver::{Setup, UringBackend};
pub use epoll::EpollBackend;
pub use outgoing::{Outgoing, staging_buffer};
pub use process::{block_shutdown_signals, wait_for_shutdown_signal, wait_for_signal};
pub use token::{Op, Side, Token};
pub use wake::WakeFd;

/// Why the gateway could not start.
#[derive(Debug)]
pub enum StartError {
    /// A listen address could not be bound.
    Bind(SocketAddr, io::Error),
    /// io_uring could not be set up in this environment.
    IoUringUnavailable(io::Error),
    /// A thread could not be started.
    Thread(io::Error),
    /// A JWT key file could not be used.
    Keys(KeyError),
    /// A TLS certificate or key could not be used.
    Tls(CertError),
    /// The cross-node broker could not be reached (and `--broker-optional` was not given).
    Broker(BrokerError),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind(addr, error) if error.kind() == io::ErrorKind::AddrInUse => write!(
                f,
                "cannot listen on {addr}: the address is in use by another process \
                 (stop it, or pick another --listen)"
            ),
            StartError::Bind(addr, error) => write!(f, "cannot listen on {addr}: {error}"),
            StartError::IoUringUnavailable(error) => {
                let cause = match error.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => {
                        "io_uring is forbidden here: either the sysctl kernel.io_uring_disabled is set \
                         (set it to 0: `sysctl -w kernel.io_uring_disabled=0`), or a seccomp profile \
                         blocks io_uring_setup (containers: Docker's default profile does; run with a \
                         profile that allows io_uring_setup, io_uring_enter and io_uring_register)"
                    }
                    Some(libc::ENOSYS) => {
                        "the kernel has no io_uring (it needs Linux 5.11 or later), or a seccomp \
                         profile hides it: upgrade the kernel or allow the io_uring_* syscalls"
                    }
                    Some(libc::ENOMEM) => {
                        "the kernel refused the ring's locked memory: raise RLIMIT_MEMLOCK \
                         (`ulimit -l`, or LimitMEMLOCK= in the systemd unit)"
                    }
                    _ => "io_uring setup failed",
                };
                write!(f, "cannot start: {cause} ({error})")
            }
            StartError::Thread(error) => write!(f, "cannot start a worker thread: {error}"),
            StartError::Keys(error) => write!(f, "cannot use a JWT key: {error}"),
            StartError::Tls(error) => write!(f, "cannot use a TLS certificate or key: {error}"),
            StartError::Broker(error) => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for StartError {}

/// The backend the workers run on, decided once at start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// io_uring with at most these ring flags, and `--coalesce-wait`.
    Uring(Setup, Duration),
    /// The readiness fallback.
    Epoll,
}

/// What [`select_backend`] decided, and why it fell back when it did: the caller says so in its
/// own voice (the gateway logs it, the load generator prints it).
#[derive(Debug)]
pub struct Selection {
    /// The backend to run on.
    pub kind: BackendKind,
    /// Why `auto` fell back to epoll, when it did.
    pub fallback: Option<StartError>,
}

/// Picks the backend for `choice`. `auto` probes io_uring (a ring with a provided-buffer ring, on a
/// kernel with multishot receive) and falls back to epoll, naming the cause in
/// [`Selection::fallback`]. Shared with the bundled load generator, which runs its client
/// connections on the same two backends.
pub fn select_backend(choice: IoChoice, coalesce_wait: Duration) -> Result<Selection, StartError> {
    let setup = uring_setup_override();
    let uring = BackendKind::Uring(setup, coalesce_wait);
    match choice {
        IoChoice::Epoll => Ok(Selection { kind: BackendKind::Epoll, fallback: None }),
        IoChoice::Uring => probe_uring(setup)
            .map(|()| Selection { kind: uring, fallback: None })
            .map_err(StartError::IoUringUnavailable),
        IoChoice::Auto => match probe_uring(setup) {
            Ok(()) => Ok(Selection { kind: uring, fallback: None }),
            Err(error) => Ok(Selection {
                kind: BackendKind::Epoll,
                fallback: Some(StartError::IoUringUnavailable(error)),
            }),
        },
    }
}

/// [`select_backend`] for the gateway: a fallback is logged as a warning.
fn choose_backend(choice: IoChoice, coalesce_wait: Duration) -> Result<BackendKind, StartError> {
    let selection = select_backend(choice, coalesce_wait)?;
    if let Some(cause) = &selection.fallback {
        warn!("io_uring is not usable here, running on epoll: {cause}");
    }
    Ok(selection.kind)
}

/// The best ring flags to try, or fewer when `RINGGATE_URING_SETUP` asks (`defer`, `coop-single`,
/// `coop`, `plain`): for measuring what each flag is worth, and for working around a kernel bug.
fn uring_setup_override() -> Setup {
    match std::env::var("RINGGATE_URING_SETUP").as_deref() {
        Ok("coop-single") => Setup::CoopTaskrunSingleIssuer,
        Ok("coop") => Setup::CoopTaskrun,
        Ok("plain") => Setup::Plain,
        _ => Setup::DeferTaskrun,
    }
}

/// Whether a worker could run on io_uring: the kernel has multishot receive (6.0) and a ring with
/// a provided-buffer ring can be set up (seccomp, `io_uring_disabled` and RLIMIT_MEMLOCK say no
/// here, with the error that names them).
fn probe_uring(setup: Setup) -> io::Result<()> {
    if let Some((major, minor)) = kernel_version()
        && (major, minor) < (6, 0)
    {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("kernel {major}.{minor} has no multishot receive (Linux 6.0 or later needed)"),
        ));
    }
    let wake = WakeFd::new()?;
    UringBackend::new(setup, wake.fd()).map(drop)
}

fn kernel_version() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Runs the gateway until it is told to stop, then drains. Returns once every connection has closed
/// or `--drain-timeout` has passed.
pub fn run(config: &Config) -> Result<(), StartError> {
    check_open_file_limit(config);
    let workers = config.worker_count();
    let kind = choose_backend(config.io, config.coalesce_wait)?;
    let (listeners, bound) = bind_listeners(config, workers)?;
    let auth = Arc::new(Authenticator::load(config.auth_settings()).map_err(StartError::Keys)?);
    let listener_tls = load_listener_tls(config)?;
    let wss_upstreams = config.proxy_routes.iter().flat_map(|r| &r.upstreams).any(|u| u.tls_name.is_some());
    let upstream_tls = if wss_upstreams {
        Some(crate::tls::upstream_client_config(&config.upstream_cas).map_err(StartError::Tls)?)
    } else {
        None
    };

    process::block_shutdown_signals().map_err(StartError::Thread)?;
    let drain = Arc::new(AtomicBool::new(false));
    let open_connections = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let stats: Arc<[Arc<WorkerStats>]> = (0..workers).map(|_| Arc::new(WorkerStats::default())).collect();
    let (hub, deliveries) = Hub::new(workers);
    let history = config.history_settings();
    if history.enabled() && config.broker.is_none() {
        hub.set_history(Arc::new(crate::gateway::history::History::new(history)));
    }
    let cluster = start_broker(config, &hub)?;
    let proxies = Arc::new(ProxyPool::new(&config.proxy_routes));
    let address_limits = AddressLimits::new(config.address_limit_settings()).map(Arc::new);
    let mut wakes = Vec::with_capacity(workers);
    for ((index, listeners), deliveries) in listeners.into_iter().enumerate().zip(deliveries) {
        let wake = WakeFd::new().map_err(StartError::Thread)?;
        hub.set_waker(index, Waker::from(Arc::clone(&wake)));
        wakes.push(Arc::clone(&wake));
        let shared = Shared {
            auth: Arc::clone(&auth),
            stats: Arc::clone(&stats),
            open_connections: Arc::clone(&open_connections),
            hub: Arc::clone(&hub),
            proxies: Arc::clone(&proxies),
            address_limits: address_limits.clone(),
            listener_tls: Arc::clone(&listener_tls),
            upstream_tls: upstream_tls.clone(),
            cluster: cluster.clone(),
        };
        let context = context_builder(config, index, shared);
        let setup = WorkerSetup { index, listeners, context, drain: Arc::clone(&drain), deliveries, wake };
        spawn_worker(kind, setup, ready_tx.clone(), done_tx.clone()).map_err(StartError::Thread)?;
    }
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(StartError::IoUringUnavailable(error)),
            Err(_) => return Err(StartError::Thread(io::Error::other("a worker died during start-up"))),
        }
    }
    for addr in &bound {
        // On stdout, one line per address, for operators and for scripts that start us on port 0.
        println!("ringgate listening on {addr}");
    }
    info!(workers, addresses = ?bound, io = ?kind, "serving");

    let signal = loop {
        let signal = process::wait_for_signal();
        if signal != libc::SIGHUP {
            break signal;
        }
        reload_keys(&auth);
        reload_certificates(&listener_tls);
    };
    info!(signal, drain_timeout = ?config.drain_timeout, "draining: closing every connection with 1001");
    drain.store(true, Ordering::Release);
    for wake in &wakes {
        wake.wake();
    }
    // A second signal exits at once (keys still reload meanwhile).
    std::thread::spawn(move || {
        let signal = loop {
            let signal = process::wait_for_signal();
            if signal != libc::SIGHUP {
                break signal;
            }
            reload_keys(&auth);
            reload_certificates(&listener_tls);
        };
        eprintln!("ringgate: second signal ({signal}), exiting without waiting for connections");
        std::process::exit(128 + signal);
    });

    let deadline = Instant::now() + config.drain_timeout;
    let mut finished = 0;
    while finished < workers {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(_) => finished += 1,
            Err(_) => {
                warn!(workers_still_draining = workers - finished, "drain timeout reached; exiting");
                break;
            }
        }
    }
    info!("stopped: {}", totals(&stats));
    Ok(())
}

/// Starts a worker thread on the chosen backend. It reports on `ready` whether its backend could
/// be set up, then serves until the process exits, reporting on `done` once it has drained.
fn spawn_worker(
    kind: BackendKind,
    setup: WorkerSetup,
    ready: mpsc::Sender<io::Result<()>>,
    done: mpsc::Sender<usize>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("ringgate-w{}", setup.index)).spawn(move || match kind {
        BackendKind::Uring(best, coalesce_wait) => {
            match UringBackend::with_coalesce_wait(best, setup.wake.fd(), coalesce_wait) {
                Ok(backend) => {
                    let features = backend.features();
                    if setup.index == 0 {
                        info!(
                            flags = features.setup.describe(),
                            receive_pool_bytes = features.pool_bytes,
                            "io_uring ready (multishot accept and receive, provided-buffer ring)"
                        );
                    }
                    let _ = ready.send(Ok(()));
                    worker::run(backend, setup, done);
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            }
        }
        BackendKind::Epoll => match EpollBackend::new(setup.wake.fd()) {
            Ok(backend) => {
                if setup.index == 0 {
                    info!("epoll ready");
                }
                let _ = ready.send(Ok(()));
                worker::run(backend, setup, done);
            }
            Err(error) => {
                let _ = ready.send(Err(error));
            }
        },
    })
}

/// Raises the open-file limit and warns when it, not `--max-conns`, bounds the connection count.
fn check_open_file_limit(config: &Config) {
    match process::raise_open_file_limit() {
        Ok(limit) => {
            // Listeners, the rings, logging and slack need a few descriptors beyond connections.
            let reserve = 64 + 2 * config.worker_count() as u64 * config.listen.len() as u64;
            let usable = limit.saturating_sub(reserve);
            if usable < config.max_conns as u64 {
                warn!(
                    open_file_limit = limit,
                    max_conns = config.max_conns,
                    "the open-file limit allows only about {usable} connections, fewer than --max-conns; \
                     raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd) to reach --max-conns"
                );
            }
        }
        Err(error) => warn!(%error, "could not raise the open-file limit"),
    }
}

/// Binds one listener per worker per address. Port 0 is resolved by the first bind and reused, so
/// that all workers share one port.
fn bind_listeners(
    config: &Config,
    workers: usize,
) -> Result<(Vec<Vec<std::net::TcpListener>>, Vec<SocketAddr>), StartError> {
    let mut per_worker: Vec<Vec<std::net::TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for &requested in &config.listen {
        let mut addr = requested;
        for listeners in per_worker.iter_mut() {
            let listener = bind_one(addr, config.backlog).map_err(|e| StartError::Bind(requested, e))?;
            addr = listener.local_addr().map_err(|e| StartError::Bind(requested, e))?;
            listeners.push(listener);
        }
        bound.push(addr);
    }
    Ok((per_worker, bound))
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// SIGHUP: reads the JWT key files again; a bad file keeps the keys in force.
fn reload_keys(auth: &Authenticator) {
    if !auth.enabled() {
        info!("SIGHUP: no JWT keys are configured, nothing to reload");
        return;
    }
    match auth.reload() {
        Ok(keys) => info!(keys, "SIGHUP: JWT keys reloaded"),
        Err(error) => warn!(%error, "SIGHUP: keeping the JWT keys in force"),
    }
}

/// Each listener's TLS (`None`: plain), in `--listen` order; says in the log which listeners
/// are TLS and whether the kernel could take the record layer.
fn load_listener_tls(config: &Config) -> Result<Arc<[Option<Arc<TlsTerminator>>]>, StartError> {
    let mut all = Vec::new();
    for (addr, pairs) in config.listeners() {
        if pairs.is_empty() {
            all.push(None);
            continue;
        }
        let terminator = TlsTerminator::load(pairs).map_err(StartError::Tls)?;
        info!(%addr, "TLS listener (TLS 1.2 and 1.3, ALPN http/1.1)");
        all.push(Some(Arc::new(terminator)));
    }
    if all.iter().any(Option::is_some) {
        if crate::tls::kernel_tls_available() {
            info!("kernel TLS (the tls ULP) is available, but this version keeps the record layer in rustls");
        } else {
            info!("kernel TLS is not available here (no tls ULP): the record layer runs in rustls");
        }
    }
    Ok(all.into())
}

/// SIGHUP: reads every TLS listener's certificates and keys again; a bad file keeps the ones in
/// force (and the log says which file).
fn reload_certificates(listener_tls: &[Option<Arc<TlsTerminator>>]) {
    for terminator in listener_tls.iter().flatten() {
        match terminator.reload() {
            Ok(certificates) => info!(certificates, "SIGHUP: TLS certificates reloaded"),
            Err(error) => warn!(%error, "SIGHUP: keeping the TLS certificates in force"),
        }
    }
}

/// Connects the node to its `--broker`, if one is configured: the hub hears of presence changes
/// and local publishes from here on, and the broker thread runs until the process exits.
fn start_broker(config: &Config, hub: &Arc<Hub>) -> Result<Option<Arc<Link>>, StartError> {
    let Some(url) = &config.broker else { return Ok(None) };
    let (link, outgoing) = Link::new(url.clone());
    if url.is_tls() {
        // redis-rs builds its TLS configuration with the process's default provider: aws-lc-rs,
        // as everywhere else in the gateway (an error only says one is installed already).
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    if let Some(path) = &config.broker_ca {
        let reason =
            |reason: String| CertError { path: path.clone(), reason: format!("--broker-ca: {reason}") };
        link.set_ca(read_ca(path).map_err(|error| StartError::Tls(reason(error)))?);
    }
    let history = config.history_settings();
    if history.enabled() {
        // Only Redis takes a history (the configuration refuses it with NATS).
        link.set_history(history);
    }
    hub.set_cluster(Arc::clone(&link));
    cluster::start(Arc::clone(&link), outgoing, Arc::clone(hub), config.broker_optional)
        .map_err(StartError::Broker)?;
    Ok(Some(link))
}

/// Reads `--broker-ca`: a PEM file with at least one certificate that parses.
fn read_ca(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|error| error.to_string())?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| error.to_string())?;
    if certificates.is_empty() {
        return Err("no CERTIFICATE block in the file".into());
    }
    Ok(pem)
}

/// What all workers share, handed to each worker's context.
struct Shared {
    auth: Arc<Authenticator>,
    stats: Arc<[Arc<WorkerStats>]>,
    open_connections: Arc<AtomicUsize>,
    hub: Arc<Hub>,
    proxies: Arc<ProxyPool>,
    address_limits: Option<Arc<AddressLimits>>,
    listener_tls: Arc<[Option<Arc<TlsTerminator>>]>,
    upstream_tls: Option<Arc<rustls::ClientConfig>>,
    cluster: Option<Arc<Link>>,
}

fn context_builder(
    config: &Config,
    worker: usize,
    shared: Shared,
) -> Box<dyn FnOnce(&'static str) -> WorkerContext + Send> {
    let limits = Limits { max_message_size: config.max_message_size, max_frame_size: config.frame_limit() };
    let policy = StaticPolicy { allowed_origins: config.allowed_origins.clone(), subprotocols: Vec::new() };
    let publish_key = config.publish_key.clone();
    let max_backpressure = config.max_backpressure;
    let handshake_timeout = config.handshake_timeout;
    let idle_timeout = config.idle_timeout.max(Duration::from_millis(2));
    let router = config.router();
    let start_time_seconds =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let slow_consumer = config.slow_consumer;
    let pubsub_echo = config.pubsub_echo;
    let compression = config.compression_settings();
    let route_auth = RouteAuth {
        echo: config.auth_mode(config.echo_auth),
        pubsub: config.auth_mode(config.pubsub_auth),
        proxies: config.proxy_routes.iter().map(|r| config.auth_mode(r.auth.or(config.proxy_auth))).collect(),
    };
    let refused_publish = config.refused_publish;
    let subject_header: Arc<str> = Arc::from(config.upstream_subject_header.as_str());
    let upstream_timeout = config.upstream_timeout;
    let max_conns = config.max_conns;
    let rates = config.message_rates();
    Box::new(move |io_backend| {
        let stats = Arc::clone(&shared.stats[worker]);
        let compressor = Rc::new(Compressor::new(compression, Arc::clone(&stats)));
        let settings = BrokerSettings {
            policy: slow_consumer,
            max_backpressure,
            echo_to_publisher: pubsub_echo,
            stats: Arc::clone(&stats),
        };
        let broker = Broker::new(worker, shared.hub, settings, Rc::clone(&compressor));
        WorkerContext {
            limits,
            max_backpressure,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            handshake_timeout,
            idle_timeout,
            policy,
            publish_key,
            router,
            stats,
            open_connections: shared.open_connections,
            max_conns,
            broker: Rc::new(broker),
            compressor,
            all_stats: shared.stats,
            start_time_seconds,
            io_backend,
            keepalive_connections: Cell::new(0),
            draining: Cell::new(false),
            proxies: shared.proxies,
            upstream_timeout,
            auth: shared.auth,
            route_auth,
            refused_publish,
            subject_header,
            rates,
            address_limits: shared.address_limits,
            listener_tls: shared.listener_tls,
            upstream_tls: shared.upstream_tls,
            cluster: shared.cluster,
        }
    })
}
