//! In-place XOR (un)masking of WebSocket payloads (RFC 6455 section 5.3).
//!
//! Every byte a client sends is masked, so this loop touches every byte of inbound traffic: it is
//! one of the two or three hottest loops of the gateway. The fast path works a machine word (and,
//! where the CPU offers it, a 256-bit vector) at a time; [`apply_mask_naive`] is the byte loop of the
//! RFC, kept as the reference that tests and the fuzz target compare against.
//!
//! A payload may arrive across several reads, so both functions take the position in the payload at
//! which `buf` starts (`offset`): only `offset % 4` matters, and unmasking the pieces one by one with
//! their offsets gives the same bytes as unmasking the whole at once.
//!
//! Must never: allocate, or read or write outside `buf`.

/// The 4-byte masking key of a frame, as it appears on the wire.
pub type MaskKey = [u8; 4];

/// XORs `buf` with `key` in place, word at a time, as if `buf` started `offset` bytes into the
/// payload. Masking and unmasking are the same operation.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: MaskKey, offset: usize) {
    let key = rotate_key(key, offset);
    // Short payloads (most chat and echo traffic) are not worth the set-up of the wide paths.
    if buf.len() < 32 {
        xor_bytes(buf, key);
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked on the line above.
            unsafe { xor_words_avx2(buf, key) };
            return;
        }
    }
    xor_words(buf, key);
}

/// The byte-at-a-time loop exactly as RFC 6455 section 5.3 writes it: `j = i MOD 4`. Slow, obviously
/// right, and the reference the fast path is tested against.
pub fn apply_mask_naive(buf: &mut [u8], key: MaskKey, offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

/// The key as seen from a buffer that starts `offset` bytes into the payload.
#[inline]
fn rotate_key(key: MaskKey, offset: usize) -> MaskKey {
    let mut rotated = key;
    rotated.rotate_left(offset % 4);
    rotated
}

#[inline]
fn xor_bytes(buf: &mut [u8], key: MaskKey) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

/// The portable fast path: 8 bytes at a time through unaligned `u64` loads, which LLVM widens to the
/// baseline vector width. Whole chunks are a multiple of 4 long, so the key phase of the tail is
/// unchanged.
#[inline(always)]
fn xor_words(buf: &mut [u8], key: MaskKey) {
    let word_key = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ word_key).to_ne_bytes());
    }
    xor_bytes(chunks.into_remainder(), key);
}

/// The same loop compiled for AVX2, so that LLVM vectorises it 32 bytes at a time; picked at run
/// time because release builds target baseline x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_words_avx2(buf: &mut [u8], key: MaskKey) {
    xor_words(buf, key);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A differential test of the fast path against the RFC's loop: every length 0..=300, every key
    /// offset 0..=3 and every buffer alignment 0..=7.
    #[test]
    fn fast_path_matches_naive_loop_for_every_length_offset_and_alignment() {
        let key = [0x6d, 0xb6, 0xb2, 0x80];
        let backing: Vec<u8> = (0..400u32).map(|i| (i * 31 + 7) as u8).collect();
        for len in 0..=300 {
            for offset in 0..=3 {
                for align in 0..=7 {
                    let mut fast = backing.clone();
                    let mut naive = backing.clone();
                    apply_mask(&mut fast[align..align + len], key, offset);
                    apply_mask_naive(&mut naive[align..align + len], key, offset);
                    assert_eq!(fast, naive, "len {len} offset {offset} align {align}");
                }
            }
        }
    }

    #[test]
    fn portable_path_matches_naive_loop() {
        let key = [1, 2, 3, 4];
        for len in 0..100 {
            let original: Vec<u8> = (0..len as u8).collect();
            let mut words = original.clone();
            let mut naive = original.clone();
            xor_words(&mut words, key);
            apply_mask_naive(&mut naive, key, 0);
            assert_eq!(words, naive, "len {len}");
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_whole() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let original: Vec<u8> = (0..=255).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        for split in [1usize, 3, 5, 64, 131] {
            let mut pieces = original.clone();
            let mut at = 0;
            while at < pieces.len() {
                let end = (at + split).min(pieces.len());
                apply_mask(&mut pieces[at..end], key, at);
                at = end;
            }
            assert_eq!(pieces, whole, "split every {split} bytes");
        }
    }

    #[test]
    fn masking_twice_restores_the_payload() {
        let original = b"Hello, WebSocket world, this is longer than a word".to_vec();
        let mut buf = original.clone();
        apply_mask(&mut buf, [9, 8, 7, 6], 2);
        assert_ne!(buf, original);
        apply_mask(&mut buf, [9, 8, 7, 6], 2);
        assert_eq!(buf, original);
    }

    /// RFC 6455 section 5.7: "Hello" masked with 37 fa 21 3d.
    #[test]
    fn rfc_example_masked_hello() {
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }
}
