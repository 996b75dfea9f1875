//! Time spans as systemd and people write them (`30s`, `500ms`, `2min`), for every flag and
//! config key of the project, so that a value copied from a unit file means the same here.

use std::time::Duration;

/// Parses `30s`, `500ms`, `1.5s`, `2min`, `1h`, or bare seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (try 30s, 500ms or 2min)"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" | "msec" => 1e-3,
        "us" | "usec" => 1e-6,
        "m" | "min" => 60.0,
        "h" | "hr" => 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?} (use ms, s, min or h)")),
    };
    Duration::try_from_secs_f64(number * scale).map_err(|_| format!("{text:?} is out of range"))
}

/// Writes a span the way systemd reads it, exactly (`100ms`, `30s`, `1500ms`).
pub fn to_systemd(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
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
        for s in ["100ms", "30s", "1500ms", "0s"] {
            assert_eq!(to_systemd(parse(s).unwrap()), s);
        }
    }
}
