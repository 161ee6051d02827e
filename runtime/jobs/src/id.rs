//! Job ids: ULIDs (48 bits of milliseconds, 80 random bits, Crockford base32), so that ids
//! sort by submission time and the store's key order is the queue's.

/// Crockford's base32 alphabet.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new id for a job submitted at `now_ms` (milliseconds since the Unix epoch).
pub fn new_id(now_ms: u64) -> String {
    let random: u128 = rand::random::<u128>() & ((1u128 << 80) - 1);
    let value = (u128::from(now_ms & ((1 << 48) - 1)) << 80) | random;
    let mut out = [0u8; 26];
    for (i, slot) in out.iter_mut().enumerate() {
        let shift = 5 * (25 - i);
        *slot = ALPHABET[((value >> shift) & 31) as usize];
    }
    out.iter().map(|&b| b as char).collect()
}

/// Whether `text` has the shape of an id (26 characters of the alphabet).
pub fn is_id(text: &str) -> bool {
    text.len() == 26 && text.bytes().all(|b| ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_time_and_are_unique() {
        let a = new_id(1_000);
        let b = new_id(2_000);
        assert!(a < b);
        assert!(is_id(&a) && is_id(&b));
        assert_ne!(new_id(5), new_id(5));
        assert!(!is_id("../etc/passwd"));
    }
}
