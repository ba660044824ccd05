//! Racing an io_uring op against a deadline without dropping the op.
//!
//! With tokio-uring, dropping an op future does not cancel the op: the kernel keeps the buffer and
//! the socket stays referenced until it completes. So a deadline must not simply drop the loser;
//! [`race`] hands the unfinished op back so the caller can wake it (shut the socket down) and
//! drive it to its end.
//!
//! Must never: poll a future after it completed, or drop the first future on the caller's behalf.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Which of two futures finished first; the loser is handed back to be driven to its end.
pub enum Either<A, B> {
    /// The first future's output.
    Left(A),
    /// The second finished first; here is the first, still pending.
    Right(B),
}

/// Polls `first` and `second` together. If `second` wins, `first` is returned unfinished so the
/// caller can wake its op (shutdown) and drive it to completion rather than dropping it.
pub async fn race<'a, A, B>(
    mut first: Pin<&'a mut A>,
    mut second: Pin<&mut B>,
) -> Either<A::Output, Pin<&'a mut A>>
where
    A: Future,
    B: Future,
{
    let won = std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = first.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if second.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await;
    match won {
        Some(out) => Either::Left(out),
        None => Either::Right(first),
    }
}
