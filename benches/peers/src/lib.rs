//! What the peer echo servers share: their one flag, the open-file limit, the line that tells a
//! script where they listen, and the accept loop (each peer supplies only its connection handler).
//!
//! The peers (`peer-fastwebsockets`, `peer-tokio-tungstenite`) exist only so that
//! `scripts/compare.sh` can run ringgate beside other Rust WebSocket servers, on the same machine, in
//! the same session, under the same `loadtest` commands. Each is written the way its crate's own
//! documentation and examples write an echo server; they must never grow tuning that ringgate's
//! comparison would not also get. This crate is never published or shipped.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;

/// The usage text both binaries print for `--help` and on a bad command line.
fn usage(name: &str, default: &str) -> String {
    format!(
        "usage: {name} [--listen ADDR]\n\n\
         Echoes every WebSocket message (text stays text, binary stays binary) on any path.\n\
         --listen ADDR   address to bind (default {default}; port 0 picks a free port)\n\n\
         Prints `listening on ADDR` on stdout once bound."
    )
}

/// Reads `--listen ADDR` (or `--listen=ADDR`) from the command line, `default` without it.
///
/// On `--help` prints the usage and returns `Err(ExitCode::SUCCESS)`; on anything it does not
/// understand prints the usage to stderr and returns `Err(2)`, so `main` can return the code.
pub fn listen_addr(name: &str, default: &str) -> Result<SocketAddr, ExitCode> {
    parse_listen(std::env::args().skip(1), default).map_err(|error| match error {
        None => {
            println!("{}", usage(name, default));
            ExitCode::SUCCESS
        }
        Some(message) => {
            eprintln!("{name}: {message}\n\n{}", usage(name, default));
            ExitCode::from(2)
        }
    })
}

/// The parser behind [`listen_addr`]: `Err(None)` for `--help`, `Err(Some(why))` for a bad line.
fn parse_listen(args: impl IntoIterator<Item = String>, default: &str) -> Result<SocketAddr, Option<String>> {
    let mut listen = default.to_owned();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Err(None),
            "--listen" => listen = args.next().ok_or_else(|| Some("--listen needs an address".to_owned()))?,
            other => match other.strip_prefix("--listen=") {
                Some(value) => listen = value.to_owned(),
                None => return Err(Some(format!("unexpected argument {other:?}"))),
            },
        }
    }
    listen.parse().map_err(|e| Some(format!("--listen {listen:?}: {e} (expected IP:PORT)")))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as ringgate and `loadtest` do, so the
/// 10,000-connection cases compare servers and not shells' default limits. Failure is reported on
/// stderr and otherwise ignored: the run then shows the refused connections.
pub fn raise_nofile_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit we own; no other memory is touched.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        eprintln!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit only reads the rlimit we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            eprintln!("setrlimit(RLIMIT_NOFILE, {}): {}", limit.rlim_max, std::io::Error::last_os_error());
        }
    }
}

/// Prints `listening on ADDR` on stdout and flushes it: scripts and tests wait for this line (it
/// carries the real port when asked for port 0).
pub fn announce(addr: SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "listening on {addr}");
    let _ = stdout.flush();
}

/// Runs a peer: reads `--listen`, raises the open-file limit, binds, announces the address, then
/// accepts forever, spawning `serve(stream)` for each connection. Returns only on a start-up
/// failure (or `--help`), with the exit code for `main`.
pub async fn run<F, Fut>(name: &str, default: &str, serve: F) -> ExitCode
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = match listen_addr(name, default) {
        Ok(addr) => addr,
        Err(code) => return code,
    };
    raise_nofile_limit();
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("{name}: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    announce(listener.local_addr().unwrap_or(addr));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream));
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; the client sees the refusals.
                eprintln!("{name}: accept: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_listen;

    fn parse(args: &[&str]) -> Result<std::net::SocketAddr, Option<String>> {
        parse_listen(args.iter().map(|s| s.to_string()), "127.0.0.1:9002")
    }

    #[test]
    fn listen_flag_forms_and_default() {
        assert_eq!(parse(&[]).unwrap().to_string(), "127.0.0.1:9002");
        assert_eq!(parse(&["--listen", "127.0.0.1:0"]).unwrap().port(), 0);
        assert_eq!(parse(&["--listen=[::1]:7"]).unwrap().to_string(), "[::1]:7");
    }

    #[test]
    fn help_and_bad_lines() {
        assert_eq!(parse(&["--help"]), Err(None));
        assert!(matches!(parse(&["--listen"]), Err(Some(_))));
        assert!(matches!(parse(&["--listen", "localhost"]), Err(Some(_))));
        assert!(matches!(parse(&["--workers", "1"]), Err(Some(_))));
    }
}
