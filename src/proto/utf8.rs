//! Incremental UTF-8 validation for text messages that arrive in pieces.
//!
//! RFC 6455 section 8.1 lets an endpoint fail a text message as soon as it sees bytes that can never
//! become valid UTF-8, and the Autobahn suite (6.4.x) checks that we do so before the rest of the
//! message arrives. A piece may end in the middle of a code point, so up to three bytes of an
//! unfinished character are carried to the next piece. The bulk of each piece goes through
//! `simdutf8`, which is at least as fast as `std::str::from_utf8`.
//!
//! Must never: accept a sequence `std::str::from_utf8` rejects, or hold more than 4 bytes.

/// The text is not valid UTF-8 and no continuation can make it so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Validates a text message piece by piece, keeping only an unfinished trailing code point.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Validator { pending: [0; 4], pending_len: 0 }
    }

    /// Validates the next piece of the message. Fails as soon as the bytes seen so far cannot be the
    /// start of valid UTF-8, even if the code point is not finished yet.
    pub fn feed(&mut self, mut piece: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            piece = self.finish_pending(piece)?;
            if self.pending_len > 0 {
                return Ok(()); // the piece was too short to finish the code point
            }
        }
        match simdutf8::compat::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(error) if error.error_len().is_none() => {
                // The piece ends inside a code point whose bytes so far are a valid prefix.
                let tail = &piece[error.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(InvalidUtf8),
        }
    }

    /// Ends the message: valid only if no code point is left unfinished. Resets for the next message.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.pending_len == 0;
        *self = Utf8Validator::new();
        if complete { Ok(()) } else { Err(InvalidUtf8) }
    }

    /// Forgets any state, for a connection that starts a new message after an error.
    pub fn reset(&mut self) {
        *self = Utf8Validator::new();
    }

    /// Moves bytes from the front of `piece` into the unfinished code point until it is complete
    /// (and validated) or `piece` runs out; returns the rest of `piece`.
    fn finish_pending<'p>(&mut self, piece: &'p [u8]) -> Result<&'p [u8], InvalidUtf8> {
        let needed = sequence_len(self.pending[0]);
        let have = self.pending_len as usize;
        let take = (needed - have).min(piece.len());
        self.pending[have..have + take].copy_from_slice(&piece[..take]);
        let filled = have + take;
        match simdutf8::compat::from_utf8(&self.pending[..filled]) {
            Ok(_) => self.pending_len = 0,
            Err(error) if error.error_len().is_none() => self.pending_len = filled as u8,
            Err(_) => return Err(InvalidUtf8),
        }
        Ok(&piece[take..])
    }
}

/// The length of the UTF-8 sequence a valid lead byte starts. Only called on bytes that `simdutf8`
/// reported as the start of an unfinished (so valid) sequence.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn validate_in_pieces(bytes: &[u8], piece_len: usize) -> Result<(), InvalidUtf8> {
        let mut validator = Utf8Validator::new();
        for piece in bytes.chunks(piece_len.max(1)) {
            validator.feed(piece)?;
        }
        validator.finish()
    }

    #[test]
    fn valid_text_split_anywhere_is_accepted() {
        let text = "Hello-µ@ßöäüàá-UTF-8!! κόσμε 𝄞 \u{10FFFF}";
        for piece_len in 1..=text.len() {
            assert_eq!(validate_in_pieces(text.as_bytes(), piece_len), Ok(()), "{piece_len}");
        }
    }

    #[test]
    fn unfinished_code_point_at_the_end_is_rejected() {
        assert_eq!(validate_in_pieces(&[b'a', 0xe2, 0x82], 1), Err(InvalidUtf8));
    }

    /// Autobahn 6.4.1's payload: the bytes up to 0xf4 0x90 can never be valid (beyond U+10FFFF), and
    /// the validator must say so before the rest arrives.
    #[test]
    fn fails_fast_on_an_impossible_prefix() {
        let mut validator = Utf8Validator::new();
        assert_eq!(validator.feed("κόσμε".as_bytes()), Ok(()));
        assert_eq!(validator.feed(&[0xf4]), Ok(()));
        assert_eq!(validator.feed(&[0x90]), Err(InvalidUtf8));
    }

    #[test]
    fn surrogates_and_overlongs_are_rejected() {
        for bad in [&[0xed, 0xa0, 0x80][..], &[0xc0, 0xaf], &[0xe0, 0x80, 0xaf], &[0xff]] {
            assert_eq!(validate_in_pieces(bad, 1), Err(InvalidUtf8), "{bad:x?}");
            assert_eq!(validate_in_pieces(bad, 4), Err(InvalidUtf8), "{bad:x?}");
        }
    }

    #[test]
    fn finish_resets_for_the_next_message() {
        let mut validator = Utf8Validator::new();
        validator.feed(&[0xe2]).expect("valid prefix");
        assert_eq!(validator.finish(), Err(InvalidUtf8));
        assert_eq!(validator.feed(b"ok"), Ok(()));
        assert_eq!(validator.finish(), Ok(()));
    }

    proptest! {
        /// Differential against std: any bytes, any split, same verdict as `std::str::from_utf8`.
        #[test]
        fn agrees_with_std_for_any_split(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            piece_len in 1usize..9,
        ) {
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_in_pieces(&bytes, piece_len).is_ok(), expected);
        }

        /// Mostly-valid text with one corrupted byte, split anywhere: same verdict as std.
        #[test]
        fn agrees_with_std_on_near_valid_text(
            text in "\\PC{0,40}",
            corrupt_at in any::<prop::sample::Index>(),
            corrupt_with in any::<u8>(),
            piece_len in 1usize..7,
        ) {
            let mut bytes = text.into_bytes();
            if !bytes.is_empty() {
                let at = corrupt_at.index(bytes.len());
                bytes[at] = corrupt_with;
            }
            let expected = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(validate_in_pieces(&bytes, piece_len).is_ok(), expected);
        }

        /// Fail fast: the validator has failed by the end of the shortest prefix that std already
        /// finds impossible (an error that no further bytes could fix).
        #[test]
        fn fails_no_later_than_the_first_impossible_prefix(
            bytes in proptest::collection::vec(any::<u8>(), 1..32),
        ) {
            let impossible_at = (1..=bytes.len()).find(|&end| {
                matches!(std::str::from_utf8(&bytes[..end]), Err(e) if e.error_len().is_some())
            });
            if let Some(end) = impossible_at {
                let mut validator = Utf8Validator::new();
                let failed = bytes[..end]
                    .iter()
                    .any(|byte| validator.feed(std::slice::from_ref(byte)).is_err());
                prop_assert!(failed, "accepted impossible prefix {:x?}", &bytes[..end]);
            }
        }
    }
}
