//! Byte tests eight bytes at a time in a `u64` ("SIMD within a register"), for the short
//! inputs of the hot path (a host, a path, a header value, a JSON key), where a call into
//! a vectorised search costs more than the whole input.
//!
//! The one trick: `zero_bytes(v)` sets the top bit of each zero byte of `v`. A borrow from
//! a zero byte can also set the top bit of a byte above it, never of one below, so the
//! lowest flag is always a true one, and "no flag" means "no zero byte".

/// Every byte set to 1: times a byte, that byte in every lane of a word.
pub(crate) const LANES: u64 = u64::from_ne_bytes([1; 8]);
/// The top bit of every byte.
pub(crate) const TOPS: u64 = LANES << 7;

/// `b` in every byte of a word.
#[inline(always)]
pub(crate) const fn splat(b: u8) -> u64 {
    LANES * b as u64
}

/// The top bit of each zero byte of `v` (exact up to the lowest one; see the module docs).
#[inline(always)]
pub(crate) const fn zero_bytes(v: u64) -> u64 {
    v.wrapping_sub(LANES) & !v & TOPS
}

/// Whether `hay` holds the byte `a` or the byte `b` (pass the same byte twice for one).
/// An input of eight bytes or more is read a word at a time, its last word ending at its
/// end (overlapping the one before: reading a byte twice does no harm to a yes-or-no).
#[inline]
pub(crate) fn contains2(hay: &[u8], a: u8, b: u8) -> bool {
    let word = |at: usize| {
        let mut w = [0; 8];
        w.copy_from_slice(&hay[at..at + 8]);
        let v = u64::from_le_bytes(w);
        zero_bytes(v ^ splat(a)) | zero_bytes(v ^ splat(b))
    };
    let Some(last) = hay.len().checked_sub(8) else {
        return hay.iter().any(|&c| c == a || c == b);
    };
    // Flags OR-ed over the words: any flag stands for a true hit in its word.
    let mut flags = 0u64;
    let mut at = 0;
    while at < last {
        flags |= word(at);
        at += 8;
    }
    flags | word(last) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The word test agrees with a byte loop, at every length and offset.
        #[test]
        fn contains2_agrees_with_a_byte_loop(hay in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::prelude::Just(b':'),
                proptest::prelude::Just(b'@'),
                proptest::prelude::Just(0u8),
                proptest::prelude::Just(0x80u8),
                proptest::prelude::Just(0xffu8),
                0x20u8..0x7f,
            ],
            0..40,
        )) {
            let want = hay.iter().any(|&c| c == b':' || c == b'@');
            proptest::prop_assert_eq!(contains2(&hay, b':', b'@'), want);
            proptest::prop_assert_eq!(contains2(&hay, b':', b':'), hay.contains(&b':'));
        }
    }
}
