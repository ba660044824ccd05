//! Integer socket options by number, for the few that socket2 does not name
//! (`IP_BIND_ADDRESS_NO_PORT`, `SO_TIMESTAMPNS`) or that are set on a bare descriptor
//! (`TCP_NODELAY` on an accepted socket): one checked `setsockopt` instead of one per caller.
//!
//! Must never: pass a value of another size than `c_int` (every option here is an int).

use std::io;
use std::os::fd::RawFd;

/// Sets the integer option `name` at `level` on `fd` to `value`.
pub fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from the pointer we pass, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
