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

/// Writes a duration for people, to a tenth of a second under a minute: `850ms`, `2.4s`,
/// `6m48s`, `1h2m`, `3d4h`.
pub fn format_duration(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}.{}s", s, (ms % 1000) / 100),
        60_000..3_600_000 => format!("{}m{}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
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
    fn durations_are_written_for_people() {
        let ms = Duration::from_millis;
        assert_eq!(format_duration(ms(850)), "850ms");
        assert_eq!(format_duration(ms(2_460)), "2.4s");
        assert_eq!(format_duration(ms(408_000)), "6m48s");
        assert_eq!(format_duration(ms(3_720_000)), "1h2m");
        assert_eq!(format_duration(ms(273_600_000)), "3d4h");
    }

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
