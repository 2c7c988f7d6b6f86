//! How dedup keys map to Redis keys.

use sha2::{Digest, Sha256};

/// Key material longer than this many bytes is hashed.
pub const MAX_RAW_KEY_LEN: usize = 100;

/// The Redis key that stores the dedup state of `key`, under `prefix`.
///
/// Keys are bytes. Short printable keys are kept readable: `prefix + "k:" + key`. A key longer than
/// [`MAX_RAW_KEY_LEN`] bytes, or with any byte outside printable ASCII (space to `~`), is
/// replaced by the lower-case hex SHA-256 of its bytes: `prefix + "h:" + hex`. SHA-256 is fixed
/// by standard, so the mapping is the same in every process and every version of this crate; the
/// `k:`/`h:` namespaces keep a raw key from ever colliding with a hashed one.
pub fn redis_key(prefix: &str, key: &[u8]) -> String {
    let printable = key.iter().all(|b| (0x20..=0x7e).contains(b));
    if printable
        && key.len() <= MAX_RAW_KEY_LEN
        && let Ok(text) = std::str::from_utf8(key)
    {
        // Printable ASCII is UTF-8 as it is: copied whole, not char by char.
        let mut out = String::with_capacity(prefix.len() + 2 + key.len());
        out.push_str(prefix);
        out.push_str("k:");
        out.push_str(text);
        return out;
    }
    let digest = Sha256::digest(key);
    let mut out = String::with_capacity(prefix.len() + 2 + 64);
    out.push_str(prefix);
    out.push_str("h:");
    for byte in digest {
        out.push(hex_digit(byte >> 4));
        out.push(hex_digit(byte & 0x0f));
    }
    out
}

fn hex_digit(nibble: u8) -> char {
    match nibble {
        0..=9 => char::from(b'0' + nibble),
        _ => char::from(b'a' + (nibble - 10)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_keys_stay_readable() {
        assert_eq!(redis_key("p:", b"order-42"), "p:k:order-42");
        assert_eq!(redis_key("p:", b"with space"), "p:k:with space");
    }

    #[test]
    fn long_or_binary_keys_are_hashed_stably() {
        // SHA-256("abc"), the FIPS 180-2 test vector, pins the mapping across versions: a key
        // that must be hashed maps to prefix + "h:" + this hex.
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let mut hex = String::new();
        for b in Sha256::digest(b"abc") {
            hex.push(hex_digit(b >> 4));
            hex.push(hex_digit(b & 0x0f));
        }
        assert_eq!(hex, abc);

        let long = "a".repeat(MAX_RAW_KEY_LEN + 1);
        let hashed = redis_key("p:", long.as_bytes());
        assert!(hashed.starts_with("p:h:"));
        assert_eq!(hashed.len(), "p:h:".len() + 64);
        assert_eq!(hashed, redis_key("p:", long.as_bytes()), "deterministic");
        assert!(redis_key("p:", b"ab\nc").starts_with("p:h:"));
        assert!(redis_key("p:", "é".as_bytes()).starts_with("p:h:"));
        // Distinct binary keys that a lossy UTF-8 conversion would merge stay distinct.
        assert_ne!(redis_key("p:", &[0xff]), redis_key("p:", &[0xfe]));
        assert_eq!(
            redis_key("p:", "a".repeat(MAX_RAW_KEY_LEN).as_bytes()),
            format!("p:k:{}", "a".repeat(MAX_RAW_KEY_LEN))
        );
    }
}
