//! Time spans as systemd and people write them (`30s`, `500ms`, `2min`), for every flag and
//! config key of the project, so that a value copied from a unit file means the same here.

use std::time::Duration;

/// Parses `30s`, `500ms`, `1.5s`, `2min`, `1h`, or bare seconds.
///
/// Exactly, in decimal (to the nanosecond; digits beyond are dropped): `0.29ms` is 290 µs, as
/// systemd reads it, not the 289.999... µs of a floating-point product.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let not_a_duration = || format!("{text:?} is not a duration (try 30s, 500ms or 2min)");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(not_a_duration());
    }
    let nanos_per_unit: u128 = match unit.trim() {
        "" | "s" | "sec" => 1_000_000_000,
        "ms" | "msec" => 1_000_000,
        "us" | "usec" => 1_000,
        "m" | "min" => 60_000_000_000,
        "h" | "hr" => 3_600_000_000_000,
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, min or h)")),
    };
    let out_of_range = || format!("{text:?} is out of range");
    // Whole units, then the fraction's digits while they still count (an hour has 13 decimal
    // digits of nanoseconds).
    let whole = whole.trim_start_matches('0');
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| out_of_range())? };
    let mut nanos = whole.checked_mul(nanos_per_unit).ok_or_else(out_of_range)?;
    let mut scale = nanos_per_unit;
    for digit in fraction.bytes().take(16) {
        scale /= 10;
        nanos += u128::from(digit - b'0') * scale;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| out_of_range())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// Writes a span the way systemd reads it (`100ms`, `30s`, `1500ms`, `250us`): exactly to the
/// microsecond, systemd's resolution (nanoseconds below it are dropped).
pub fn to_systemd(d: Duration) -> String {
    let us = d.as_micros();
    if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else if us % 1000 == 0 {
        format!("{}ms", us / 1000)
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("2min"), Ok(Duration::from_secs(120)));
        assert!(parse("soon").unwrap_err().contains("not a duration"));
        assert!(parse("5 parsecs").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn systemd_form_round_trips() {
        for s in ["100ms", "30s", "1500ms", "0s", "250us", "1000001us"] {
            assert_eq!(to_systemd(parse(s).unwrap()), s);
        }
    }

    #[test]
    fn decimals_are_exact() {
        // A floating-point product made 0.29ms 289.999...µs, and to_systemd made every span
        // below a millisecond 0s: WatchdogSec=0s is off for systemd.
        assert_eq!(parse("0.29ms"), Ok(Duration::from_micros(290)));
        assert_eq!(to_systemd(parse("0.29ms").unwrap()), "290us");
        assert_eq!(to_systemd(parse("500us").unwrap()), "500us");
        assert_eq!(parse("1.000000001s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse(".5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2."), Ok(Duration::from_secs(2)));
        assert_eq!(parse("0.5h"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("0000000000000000000000000000000000000001s"), Ok(Duration::from_secs(1)));
        for bad in [".", "", "1.2.3", "..5", "s"] {
            assert!(parse(bad).unwrap_err().contains("not a duration"), "{bad:?}");
        }
        for huge in ["18446744073709551616", "99999999999999999999999999999999999999999h", "5124095576030432h"] {
            assert!(parse(huge).unwrap_err().contains("out of range"), "{huge:?}");
        }
    }
}
