//! Differential: the fast unmask must give exactly the bytes of the RFC's byte loop, for any data,
//! key, key offset and alignment, and unmasking in two pieces must equal unmasking at once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::proto::mask::{apply_mask, apply_mask_naive};

fuzz_target!(|input: (u8, u8, [u8; 4], u16, Vec<u8>)| {
    let (offset, align, key, split, data) = input;
    let offset = usize::from(offset % 4);
    let align = usize::from(align % 8).min(data.len());
    let body = &data[align..];

    let mut fast = data.clone();
    let mut naive = data.clone();
    apply_mask(&mut fast[align..], key, offset);
    apply_mask_naive(&mut naive[align..], key, offset);
    assert_eq!(fast, naive);

    let split = usize::from(split) % (body.len() + 1);
    let mut pieces = body.to_vec();
    let (head, tail) = pieces.split_at_mut(split);
    apply_mask(head, key, offset);
    apply_mask(tail, key, offset + split);
    assert_eq!(&pieces[..], &fast[align..]);
});
