//! Idempotency keys without an allocation of their own.
//!
//! A key is 32 lowercase hex digits: 128 bits drawn from the calling instance's RNG (so a
//! seeded layer makes the same keys). Only the *storage* is shared: the digits are
//! written into a per-thread slab of [`SLAB`] bytes and the header value is a
//! [`Bytes`](bytes::Bytes) slice of it, a refcount on the slab, which
//! [`HeaderValue::from_maybe_shared`] takes without copying. A slab is allocated once
//! per `SLAB / KEY_LEN` keys made on a thread (plus one promotion on its first key); a
//! full slab is let go by the thread and freed when its last key is dropped.
//!
//! Memory: a key kept alive (by a request in flight) keeps its slab alive, so at worst
//! `SLAB` bytes per key, and in the usual case (keys dropped roughly in the order they
//! were made) a few slabs per thread.

use std::cell::RefCell;

use bytes::{BufMut, BytesMut};
use http::HeaderValue;

/// Length of a key: 128 bits in hex.
pub(crate) const KEY_LEN: usize = 32;
/// Bytes per slab: 128 keys.
const SLAB: usize = 4096;

thread_local! {
    static SLAB_BUF: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Eight lowercase hex digits of four bytes, in memory order (each byte's high digit
/// first), as the little-endian bytes of a `u64`: the nibbles spread one per byte, then
/// `'0'` added to each and `'a' - '0' - 10` more to those above 9, all eight at once.
const fn hex8(v: u32) -> u64 {
    const LOW_NIBBLES: u64 = 0x0f0f_0f0f_0f0f_0f0f;
    let mut t = v as u64;
    t = (t | (t << 16)) & 0x0000_ffff_0000_ffff;
    t = (t | (t << 8)) & 0x00ff_00ff_00ff_00ff;
    // Byte 2i holds byte i of `v`: its high nibble there, its low one in byte 2i + 1.
    let n = ((t >> 4) | (t << 8)) & LOW_NIBBLES;
    let above_nine = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    n + 0x3030_3030_3030_3030 + above_nine * (b'a' - b'0' - 10) as u64
}

/// The 128 random bits of one call's key, kept by the call's future so that every
/// attempt sends the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key([u64; 2]);

impl Key {
    /// 128 bits from `rng`.
    pub(crate) fn draw(rng: &mut fastrand::Rng) -> Key {
        Key([rng.u64(..), rng.u64(..)])
    }

    fn digits(self) -> [u8; KEY_LEN] {
        let mut buf = [0u8; KEY_LEN];
        for (out, word) in buf.chunks_exact_mut(KEY_LEN / 2).zip(self.0) {
            let (lo, hi) = (hex8(word as u32), hex8((word >> 32) as u32));
            out[..8].copy_from_slice(&lo.to_le_bytes());
            out[8..].copy_from_slice(&hi.to_le_bytes());
        }
        buf
    }

    /// The header value: 32 lowercase hex digits, cut from this thread's slab.
    pub(crate) fn value(self) -> HeaderValue {
        let digits = self.digits();
        let shared = SLAB_BUF
            .try_with(|slab| {
                let mut slab = slab.try_borrow_mut().ok()?;
                if slab.capacity() - slab.len() < KEY_LEN {
                    *slab = BytesMut::with_capacity(SLAB);
                }
                slab.put_slice(&digits);
                Some(slab.split().freeze())
            })
            .ok()
            .flatten();
        let value = match shared {
            Some(bytes) => HeaderValue::from_maybe_shared(bytes),
            // Only while the thread's locals are being torn down: a key of its own.
            None => HeaderValue::from_bytes(&digits),
        };
        // Always valid: lowercase hex.
        value.unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_digits_at_once_are_each_byte_in_hex() {
        let table =
            |v: u32| -> String { v.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect() };
        let mut rng = fastrand::Rng::with_seed(3);
        let edges = [
            0,
            u32::MAX,
            0x0909_0909,
            0x0a0a_0a0a,
            0x9f9f_9f9f,
            0xa9a9_a9a9,
            0x1234_5678,
        ];
        for v in edges.into_iter().chain((0..10_000).map(|_| rng.u32(..))) {
            assert_eq!(
                String::from_utf8(hex8(v).to_le_bytes().to_vec()).unwrap(),
                table(v),
                "{v:#x}"
            );
        }
    }

    #[test]
    fn digits_are_the_bits_in_hex() {
        let k = Key([0x0123_4567_89ab_cdef, u64::MAX]);
        assert_eq!(
            k.value(),
            "efcdab8967452301ffffffffffffffff",
            "each word's bytes, least significant first"
        );
    }

    #[test]
    fn keys_are_hex_distinct_and_reproducible_from_a_seed() {
        let mut rng = fastrand::Rng::with_seed(7);
        let keys: Vec<HeaderValue> = (0..3 * SLAB / KEY_LEN)
            .map(|_| Key::draw(&mut rng).value())
            .collect();
        let mut seen = std::collections::HashSet::new();
        for k in &keys {
            assert_eq!(k.len(), KEY_LEN);
            assert!(k
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
            assert!(seen.insert(k.as_bytes().to_vec()), "repeated key {k:?}");
        }
        // Slab boundaries do not change the digits: the same seed, the same keys.
        let mut again = fastrand::Rng::with_seed(7);
        for k in &keys {
            assert_eq!(*k, Key::draw(&mut again).value());
        }
    }

    #[test]
    fn keys_made_on_one_thread_are_cut_from_one_slab() {
        // A fresh thread: its first key starts a slab, the next follows it.
        std::thread::spawn(|| {
            let mut rng = fastrand::Rng::with_seed(1);
            let a = Key::draw(&mut rng).value();
            let b = Key::draw(&mut rng).value();
            let gap = b.as_bytes().as_ptr() as usize - a.as_bytes().as_ptr() as usize;
            assert_eq!(gap, KEY_LEN, "consecutive keys share the slab");
            // A key outlives a full slab: the slab is freed with its last key.
            let kept = a.clone();
            for _ in 0..2 * SLAB / KEY_LEN {
                drop(Key::draw(&mut rng).value());
            }
            assert_eq!(kept, a);
        })
        .join()
        .unwrap();
    }
}
