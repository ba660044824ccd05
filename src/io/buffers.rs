//! Keeping only what a read left unfinished.
//!
//! Received bytes are processed in the buffer the backend lends (handshake parsing and unmasking
//! borrow it), and only an unfinished tail is copied into the connection's own small buffer, which
//! is released as soon as it is empty: an idle connection holds no buffer.
//!
//! Must never: leak bytes of one read into another connection (every call starts from what this
//! connection kept), or keep an allocation for an empty tail.

/// Processes freshly read `data` in place, after whatever `tail` kept from earlier reads, and keeps
/// in `tail` only what `process` left unconsumed (it returns how much it used). `data` is copied
/// only when a tail was waiting; a tail that empties gives its allocation back, so an idle
/// connection holds no buffer.
pub fn process_after_tail(tail: &mut Vec<u8>, data: &mut [u8], process: impl FnOnce(&mut [u8]) -> usize) {
    if tail.is_empty() {
        let used = process(data);
        tail.extend_from_slice(&data[used..]);
    } else {
        tail.extend_from_slice(data);
        let used = process(tail);
        tail.drain(..used);
    }
    if tail.is_empty() && tail.capacity() > 0 {
        *tail = Vec::new();
    }
}

#[cfg(test)]
mod tests {
    use super::process_after_tail;

    #[test]
    fn only_the_unconsumed_rest_is_kept_and_an_empty_tail_holds_nothing() {
        let mut tail = Vec::new();
        // Nothing waiting: processed in place, the last 3 bytes kept.
        process_after_tail(&mut tail, &mut [1, 2, 3, 4, 5], |buf| {
            assert_eq!(buf, [1, 2, 3, 4, 5]);
            2
        });
        assert_eq!(tail, [3, 4, 5]);
        // A tail waiting: processed after it, everything used, allocation released.
        process_after_tail(&mut tail, &mut [6], |buf| {
            assert_eq!(buf, [3, 4, 5, 6]);
            4
        });
        assert!(tail.is_empty());
        assert_eq!(tail.capacity(), 0);
    }
}
