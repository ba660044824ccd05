//! Setting up a worker's io_uring with the flags that suit one thread per ring, stepping down on
//! older kernels.
//!
//! - `SINGLE_ISSUER` (6.0): only this thread submits, so the kernel skips the locking for others.
//! - `DEFER_TASKRUN` (6.1): completion work runs when we enter the ring to reap, not as an
//!   interrupting task-work on whatever we were doing; one enter per loop turn does all of it.
//! - `TASKRUN_FLAG` (5.19): the kernel tells us (in the SQ flags) when such work is waiting, so a
//!   turn with nothing to submit still enters only when it must.
//! - `COOP_TASKRUN` (5.19): the step down from `DEFER_TASKRUN`: no interrupting IPIs, but work runs
//!   on any entry.
//!
//! Must never: hide which configuration it got (the worker logs [`Setup::describe`]).

use std::io;

use io_uring::IoUring;

/// Submission queue entries: a burst of sends and re-armed receives per loop turn.
pub const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries: multishot receives complete many times per submission; beyond this
/// the kernel keeps completions in its overflow list (counted in `/metrics`).
pub const CQ_ENTRIES: u32 = 16384;

/// The flag sets tried, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// SINGLE_ISSUER + DEFER_TASKRUN + TASKRUN_FLAG.
    DeferTaskrun,
    /// SINGLE_ISSUER + COOP_TASKRUN + TASKRUN_FLAG.
    CoopTaskrunSingleIssuer,
    /// COOP_TASKRUN only.
    CoopTaskrun,
    /// No optional flags.
    Plain,
}

impl Setup {
    /// Every configuration, best first.
    pub const ALL: [Setup; 4] =
        [Setup::DeferTaskrun, Setup::CoopTaskrunSingleIssuer, Setup::CoopTaskrun, Setup::Plain];

    /// The flags, as the log names them.
    pub fn describe(self) -> &'static str {
        match self {
            Setup::DeferTaskrun => "SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG",
            Setup::CoopTaskrunSingleIssuer => "SINGLE_ISSUER|COOP_TASKRUN|TASKRUN_FLAG",
            Setup::CoopTaskrun => "COOP_TASKRUN",
            Setup::Plain => "no optional flags",
        }
    }

    fn build(self) -> io::Result<IoUring> {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES).setup_clamp();
        match self {
            Setup::DeferTaskrun => {
                builder.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
            }
            Setup::CoopTaskrunSingleIssuer => {
                builder.setup_single_issuer().setup_coop_taskrun().setup_taskrun_flag();
            }
            Setup::CoopTaskrun => {
                builder.setup_coop_taskrun();
            }
            Setup::Plain => {}
        }
        builder.build(SQ_ENTRIES)
    }
}

/// Builds a ring on the calling thread (with SINGLE_ISSUER it is the only thread that may use it),
/// with the best configuration this kernel accepts, at most `best` (for measuring one feature at
/// a time). EINVAL means a flag is unknown here and the next set is tried; any other error (EPERM
/// from seccomp or `io_uring_disabled`, ENOSYS, ENOMEM) is final and returned.
pub fn build_ring(best: Setup) -> io::Result<(IoUring, Setup)> {
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for setup in Setup::ALL.into_iter().skip_while(|s| *s != best) {
        match setup.build() {
            Ok(ring) => return Ok((ring, setup)),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => last = error,
            Err(error) => return Err(error),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_steps_go_from_best_to_plain_and_each_names_its_flags() {
        assert_eq!(Setup::ALL[0], Setup::DeferTaskrun);
        assert_eq!(Setup::ALL[3], Setup::Plain);
        assert!(Setup::DeferTaskrun.describe().contains("DEFER_TASKRUN"));
    }

    #[test]
    fn asking_for_less_never_gives_more() {
        // Where io_uring is blocked (a sandbox), there is nothing to check.
        if let Ok((_, got)) = build_ring(Setup::CoopTaskrun) {
            assert!(matches!(got, Setup::CoopTaskrun | Setup::Plain));
        }
    }
}
