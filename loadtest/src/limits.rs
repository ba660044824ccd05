//! Operating-system limits that decide whether `--conns` can work at all: the open-file limit and
//! the ephemeral port range. Checked before the first connection, so a run that cannot reach its
//! connection count fails at once with advice rather than part-way with a pile of errors.
//!
//! Must never: lower a limit, or guess silently when a limit cannot be read (it says so).

use std::fs;

use anyhow::{Result, bail};

/// File descriptors the process needs besides one per connection: stdio, io_uring rings and their
/// eventfds, epoll, output files, with room to spare.
pub const FD_OVERHEAD: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the resulting soft limit.
pub fn raise_nofile() -> Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!("cannot read the open-file limit: {}", std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Ok(limit.rlim_cur)
}

/// Checks that `conns` connections fit in the open-file limit `nofile`.
pub fn check_fds(conns: u32, nofile: u64) -> Result<()> {
    let needed = u64::from(conns) + FD_OVERHEAD;
    if needed > nofile {
        bail!(
            "--conns {conns} needs about {needed} file descriptors but the open-file limit is {nofile} \
             (already raised to the hard limit). Use fewer connections, or raise the hard limit \
             (`ulimit -Hn`, /etc/security/limits.conf, or LimitNOFILE= for a systemd unit)"
        );
    }
    Ok(())
}

/// The kernel's ephemeral port range, `(low, high)` inclusive.
pub fn ephemeral_ports() -> Result<(u16, u16)> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = fs::read_to_string(PATH).map_err(|e| anyhow::anyhow!("cannot read {PATH}: {e}"))?;
    parse_port_range(&text).ok_or_else(|| anyhow::anyhow!("cannot parse {PATH}: {text:?}"))
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let low = parts.next()?.ok()?;
    let high = parts.next()?.ok()?;
    (low <= high).then_some((low, high))
}

/// Checks that `conns` connections to one server address fit in the ephemeral ports of
/// `sources` source addresses (each source address can use each port once per destination).
pub fn check_ports(conns: u32, sources: usize, (low, high): (u16, u16)) -> Result<()> {
    let per_source = u64::from(high - low) + 1;
    let sources = sources.max(1) as u64;
    let needed_per_source = u64::from(conns).div_ceil(sources);
    if needed_per_source > per_source {
        let needed_sources = u64::from(conns).div_ceil(per_source);
        bail!(
            "--conns {conns} needs {needed_per_source} local ports per source address, but the \
             ephemeral port range {low}-{high} has {per_source}. Spread connections over more \
             source addresses, e.g. --source-ips 127.0.0.1-127.0.0.{needed_sources} (any 127.x \
             address works on loopback), or widen net.ipv4.ip_local_port_range"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parsing() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1 0"), None);
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn port_budget() {
        let range = (32768, 60999); // 28,232 ports
        assert!(check_ports(28_232, 1, range).is_ok());
        let error = check_ports(28_233, 1, range).unwrap_err().to_string();
        assert!(error.contains("127.0.0.2"), "{error}");
        assert!(check_ports(50_000, 2, range).is_ok());
    }

    #[test]
    fn fd_budget() {
        assert!(check_fds(10_000, 20_000).is_ok());
        let error = check_fds(20_000, 20_000).unwrap_err().to_string();
        assert!(error.contains("20064"), "{error}");
    }

    #[test]
    fn raising_never_lowers() {
        let before = raise_nofile().unwrap();
        assert!(raise_nofile().unwrap() >= before);
    }
}
