//! Human-friendly durations (`250ms`, `5s`, `10m`, `24h`) and sizes (`65536`, `64KiB`, `1MiB`).

use std::time::Duration;

/// Parses a duration written as a whole number followed by `ms`, `s`, `m`, `h` or `d`.
///
/// The error text is the whole user-facing explanation, ready to follow a key path.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let hint = || format!("{text:?} is not a duration (try 250ms, 5s, 10m, 24h)");
    let value: u64 = digits.parse().map_err(|_| hint())?;
    let millis_per_unit: u64 = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => return Err(format!("{text:?} has no unit (try {value}s)")),
        _ => return Err(hint()),
    };
    value
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Parses a size: a plain number of bytes, or a number followed by `B`, `KiB`, `MiB`, `GiB`
/// (or the decimal `KB`, `MB`, `GB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let hint = || format!("{text:?} is not a size (try 65536, 64KiB, 1MiB)");
    let value: u64 = digits.parse().map_err(|_| hint())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(hint()),
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn duration_errors_suggest_the_right_spelling() {
        assert_eq!(
            parse_duration("5 sec").unwrap_err(),
            "\"5 sec\" is not a duration (try 250ms, 5s, 10m, 24h)"
        );
        assert_eq!(
            parse_duration("5").unwrap_err(),
            "\"5\" has no unit (try 5s)"
        );
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn sizes_in_bytes_and_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65_536));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("2KB"), Ok(2_000));
        assert!(parse_size("1 megabyte").is_err());
    }
}
