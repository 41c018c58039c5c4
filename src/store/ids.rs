//! Hash sets and maps keyed by the store's own ids (event sequence numbers, delivery ids).
//!
//! The ids are made by the gateway, never by a sender, so they need no SipHash against
//! collision floods: a splitmix64 finish is a few instructions where SipHash was ~2 % of the
//! dispatcher's CPU (#16). Delivery ids are `seq << 8 | upstream`, so the mix must spread
//! high bits into the low ones that pick a bucket; splitmix64 does.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub type IdHash = BuildHasherDefault<IdHasher>;
pub type IdSet = HashSet<u64, IdHash>;
pub type IdMap<V> = HashMap<u64, V, IdHash>;

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed with it; this keeps any other key correct, if slower.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn delivery_ids_of_one_upstream_spread_over_the_low_bits() {
        // Ids of upstream 0 share their low 8 bits; a table of 1,024 buckets uses the low
        // 10 bits of the hash, which must still take many values.
        let low: IdSet = (0..4096u64)
            .map(|seq| IdHash::default().hash_one(seq << 8) & 1023)
            .collect();
        assert!(low.len() > 900, "{} buckets of 1024 used", low.len());
    }
}
