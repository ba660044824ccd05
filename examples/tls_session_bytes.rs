//! How many heap bytes an established TLS session keeps, counted by the allocator, apart from
//! what the handshake allocated and freed: `cargo run --release --example tls_session_bytes`.
//!
//! Drives N server sessions (rustls' unbuffered API, the gateway's configuration: aws-lc-rs, TLS
//! 1.3, an ECDSA P-256 certificate) through full handshakes with in-memory rustls clients, keeps
//! the servers, drops the clients, and reports live bytes and allocations per kept session. The
//! gateway's RSS per idle TLS connection is this plus what the allocator cannot give back.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::ConnectionState;

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_BLOCKS: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: a block this allocator handed out, with its layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as for `realloc` itself.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    let sessions: usize = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
    let tickets: usize = std::env::args().nth(2).and_then(|n| n.parse().ok()).unwrap_or(2);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("certificate");
    server_config.alpn_protocols = vec![b"http/1.1".to_vec()];
    server_config.send_tls13_tickets = tickets;
    let server_config = Arc::new(server_config);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der().to_vec())).expect("root");
    let client_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );

    let mut kept = Vec::with_capacity(sessions);
    let rss_before = rss_kib();
    let before = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_BLOCKS.load(Ordering::Relaxed));
    for _ in 0..sessions {
        let mut server = UnbufferedServerConnection::new(Arc::clone(&server_config)).expect("server");
        let name = ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::clone(&client_config), name).expect("client");
        for _ in 0..10 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).expect("client writes");
            }
            let to_client = serve(&mut server, &mut to_server);
            if !to_client.is_empty() {
                client.read_tls(&mut &to_client[..]).expect("client reads");
                client.process_new_packets().expect("client handshake");
            }
            if !client.is_handshaking() && !client.wants_write() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "the handshake did not finish");
        drop(client);
        kept.push(server);
    }
    kept.shrink_to_fit();
    let after = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_BLOCKS.load(Ordering::Relaxed));
    let rss_held = rss_kib();
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let rss_trimmed = rss_kib();
    println!(
        "RSS per session: {} B, {} B after malloc_trim (Rust's heap and aws-lc's C heap together)",
        (rss_held - rss_before) * 1024 / sessions as i64,
        (rss_trimmed - rss_before) * 1024 / sessions as i64
    );
    let vec_bytes = (kept.capacity() * std::mem::size_of::<UnbufferedServerConnection>()) as isize;
    println!(
        "{sessions} sessions, {tickets} TLS 1.3 tickets each: {} heap bytes and {} blocks per session \
         (size_of UnbufferedServerConnection = {} B, included)",
        (after.0 - before.0) / sessions as isize,
        (after.1 - before.1) / sessions as isize,
        vec_bytes / sessions as isize,
    );
}

fn rss_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Runs what the client sent through the server session; returns what the server has to send.
fn serve(server: &mut UnbufferedServerConnection, incoming: &mut [u8]) -> Vec<u8> {
    let mut outgoing = vec![0u8; 16 * 1024];
    let mut written = 0;
    let mut at = 0;
    loop {
        let status = server.process_tls_records(&mut incoming[at..]);
        at += status.discard;
        match status.state.expect("server state") {
            ConnectionState::EncodeTlsData(mut encode) => {
                written += encode.encode(&mut outgoing[written..]).expect("room");
            }
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            _ => break,
        }
    }
    outgoing.truncate(written);
    outgoing
}
