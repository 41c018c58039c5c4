//! The shared-secret header check, in constant time.

use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Whether one of the request's values for the secret header equals the configured value.
/// The comparison does not stop at the first differing byte, so its timing tells an attacker
/// nothing about how much of a guess was right.
pub fn holds<'h>(secret: &Secret, mut values: impl Iterator<Item = &'h [u8]>) -> bool {
    values.any(|value| bool::from(value.ct_eq(&secret.value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderName;

    fn secret() -> Secret {
        Secret {
            header: HeaderName::from_static("x-actiongate-secret"),
            value: b"s3cr3t".to_vec(),
        }
    }

    #[test]
    fn exact_value_passes_anything_else_fails() {
        assert!(holds(&secret(), [&b"s3cr3t"[..]].into_iter()));
        assert!(!holds(&secret(), [&b"s3cr3"[..]].into_iter()));
        assert!(!holds(&secret(), [&b"s3cr3t "[..]].into_iter()));
        assert!(!holds(&secret(), [&b"S3CR3T"[..]].into_iter()));
        assert!(!holds(&secret(), std::iter::empty()));
    }
}
