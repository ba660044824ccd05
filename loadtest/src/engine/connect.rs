//! Opening one connection: a TCP socket (optionally bound to a source address), the connect, and
//! the WebSocket opening handshake through `ringgate::proto::handshake::ClientHandshake`.
//!
//! The socket is made with socket2 so it can be bound before connecting (`--source-ips`, with
//! IP_BIND_ADDRESS_NO_PORT so the port is chosen at connect time per destination). The connect is
//! started non-blocking, then the socket is switched back to blocking mode and handed to
//! tokio-uring: io_uring never blocks the thread, and on a blocking-mode socket its first write
//! (the upgrade request) waits in the kernel for the connect to finish instead of failing with
//! EAGAIN. One write op thus covers the connect and the request.
//!
//! Must never: leave a timed-out attempt's op running against an open socket (the socket is shut
//! down and the op driven to its end), or report a failure without a reason an operator can act on.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::pin::pin;

use ringgate::proto::handshake::{ClientHandshake, ClientHandshakeError, ServerResponse};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio_uring::net::TcpStream;

use super::sockops::{recv_more, send_all};
use crate::clock;
use crate::engine::race::{Either, race};
use crate::engine::wire::READ_BUFFER;
use crate::target::Target;

/// A connection that completed its handshake, with any bytes that arrived after the 101.
pub struct Established {
    /// The socket, owned by tokio-uring.
    pub stream: TcpStream,
    /// Bytes after the response's header section (already WebSocket frames).
    pub leftover: Vec<u8>,
}

/// Connects to `target` (from `source` if given) and performs the handshake before `deadline`
/// (run clock). On failure returns a short reason for the report.
pub async fn open(target: &Target, source: Option<Ipv4Addr>, deadline: u64) -> Result<Established, String> {
    let stream = start_connect(target.addr, source).map_err(|e| io_reason(&e))?;
    let result = {
        let handshake = pin!(handshake(&stream, target));
        let timeout = pin!(tokio::time::sleep_until(clock::tokio_instant(deadline)));
        match race(handshake, timeout).await {
            Either::Left(result) => result,
            Either::Right(handshake) => {
                // Wake the pending op so that it, and the buffer it holds, finish now.
                let _ = stream.shutdown(Shutdown::Both);
                let _ = handshake.await;
                Err("timed_out".to_string())
            }
        }
    };
    result.map(|leftover| Established { stream, leftover })
}

/// Creates the socket, binds it if asked, and starts a non-blocking connect.
fn start_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads an int from the pointer we pass, with its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        socket.bind(&SockAddr::from(SocketAddrV4::new(ip, 0)))?;
    }
    socket.set_nonblocking(true)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(TcpStream::from_std(socket.into()))
}

/// Sends the upgrade request and reads until the response is complete and valid.
async fn handshake(stream: &TcpStream, target: &Target) -> Result<Vec<u8>, String> {
    let nonce = fastrand::u128(..).to_ne_bytes();
    let client = ClientHandshake::new(nonce);
    let mut request = Vec::with_capacity(256);
    client.write_request(&mut request, &target.host, &target.path, &[]);
    let (result, _) = send_all(stream, request).await;
    result.map_err(|e| io_reason(&e))?;

    let mut buf = Vec::with_capacity(READ_BUFFER);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(READ_BUFFER);
        }
        let (result, back) = recv_more(stream, buf).await;
        buf = back;
        match result {
            Ok(0) => return Err("closed_during_handshake".into()),
            Ok(_) => {}
            Err(e) => return Err(io_reason(&e)),
        }
        match client.parse_response(&buf, &[]) {
            Ok(ServerResponse::Partial) => continue,
            Ok(ServerResponse::Upgraded { len, .. }) => {
                buf.drain(..len);
                return Ok(buf);
            }
            Err(error) => return Err(handshake_reason(error)),
        }
    }
}

fn handshake_reason(error: ClientHandshakeError) -> String {
    match error {
        ClientHandshakeError::Rejected(status) => format!("http_{status}"),
        ClientHandshakeError::Malformed => "malformed_response".into(),
        ClientHandshakeError::NotUpgraded => "not_upgraded".into(),
        ClientHandshakeError::BadAcceptKey => "bad_accept_key".into(),
        ClientHandshakeError::UnexpectedSubprotocol => "unexpected_subprotocol".into(),
    }
}

/// A short, stable name for a socket error.
pub fn io_reason(error: &io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ETIMEDOUT) => "timed_out",
        Some(libc::EADDRNOTAVAIL) => "no_free_port",
        Some(libc::EADDRINUSE) => "address_in_use",
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset",
        Some(libc::ENETUNREACH) | Some(libc::EHOSTUNREACH) => "unreachable",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out_of_file_descriptors",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "out_of_memory",
        Some(code) => return format!("errno_{code}"),
        None => return format!("{:?}", error.kind()).to_lowercase(),
    };
    name.to_string()
}
