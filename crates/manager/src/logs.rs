//! `sdcluster logs APP`: every unit of an app from the journal, interleaved in time, each line
//! starting with the instance (`APP@2`) or unit (`APP.socket`) it came from.
//!
//! journalctl does the selection and the following (`-u` for every unit name
//! [`units::unit_names`] renders, `-o json`); this module turns each entry into one line:
//! `APP@2 Dec 02 12:39:16.123456 [PID] MESSAGE`. The instance comes from the entry's
//! `SDCLUSTER_INSTANCE=` field (the worker sends it with every line, see
//! [`sdcluster_protocol::env::INSTANCE`]), else from the unit the entry belongs to
//! (`_SYSTEMD_UNIT=` for the unit's own processes, `UNIT=` for systemd's messages about it).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use sdcluster_protocol::env;

use crate::units::unit_names;

/// The `-u` patterns for journalctl: every unit `render` may produce for `app`, templates as
/// globs over their instances (`APP@*.service`, `APP@*.socket`).
pub fn journal_units(app: &str) -> Vec<String> {
    unit_names(app).into_iter().map(|name| name.replace("@.", "@*.")).collect()
}

/// The journalctl command line for `app`.
pub fn journalctl(app: &str, follow: bool, lines: Option<u32>) -> Command {
    let mut cmd = Command::new("journalctl");
    for unit in journal_units(app) {
        cmd.arg("-u").arg(unit);
    }
    cmd.args(["-o", "json", "--no-pager"]);
    if follow {
        cmd.arg("-f");
    }
    if let Some(n) = lines {
        cmd.arg(format!("--lines={n}"));
    }
    cmd
}

/// Runs journalctl for `app` and prints its entries as lines, until journalctl ends (or
/// whoever reads our output goes away, which is a success too): whether journalctl
/// succeeded.
pub fn run(app: &str, follow: bool, lines: Option<u32>) -> std::io::Result<bool> {
    let mut child = journalctl(app, follow, lines).stdout(Stdio::piped()).spawn()?;
    let journal = BufReader::new(child.stdout.take().expect("piped stdout"));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in journal.lines() {
        let line = line?;
        let written = match format_entry(app, &line) {
            Some(text) => writeln!(out, "{text}"),
            None => Ok(()),
        };
        if written.and_then(|()| out.flush()).is_err() {
            // The reader (a pager, `head`) is gone: so is the point of reading on.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(true);
        }
    }
    Ok(child.wait()?.success())
}

/// One journal entry (a line of `journalctl -o json`) as a line of text, or `None` for a
/// line that isn't an entry.
pub fn format_entry(app: &str, json: &str) -> Option<String> {
    let entry: serde_json::Value = serde_json::from_str(json).ok()?;
    let field = |name: &str| -> Option<String> {
        match entry.get(name)? {
            serde_json::Value::String(s) => Some(s.clone()),
            // A field sent more than once: its first value.
            serde_json::Value::Array(values) => values.first().and_then(|v| v.as_str()).map(str::to_owned),
            _ => None,
        }
    };
    let label = label(app, field(env::INSTANCE).as_deref(), &[field("_SYSTEMD_UNIT"), field("UNIT")]);
    let time = field("__REALTIME_TIMESTAMP").and_then(|t| t.parse::<i64>().ok()).map(local_time).unwrap_or_default();
    // MESSAGE is an array of bytes when it isn't valid UTF-8.
    let message = match entry.get("MESSAGE") {
        Some(serde_json::Value::Array(bytes)) => {
            String::from_utf8_lossy(&bytes.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<_>>())
                .into_owned()
        }
        _ => field("MESSAGE").unwrap_or_default(),
    };
    let pid = field("_PID").map(|p| format!(" [{p}]")).unwrap_or_default();
    Some(format!("{label:<width$} {time}{pid} {message}", width = app.len() + 3))
}

/// `APP@INSTANCE` for a worker's line, else the app's unit among `units` without `.service`.
fn label(app: &str, instance: Option<&str>, units: &[Option<String>]) -> String {
    if let Some(instance) = instance {
        return format!("{app}@{instance}");
    }
    let ours =
        |unit: &&String| unit.strip_prefix(app).is_some_and(|rest| rest.starts_with('@') || rest.starts_with('.'));
    match units.iter().flatten().find(ours) {
        Some(unit) => unit.strip_suffix(".service").unwrap_or(unit).to_owned(),
        None => units.iter().flatten().next().cloned().unwrap_or_else(|| app.to_owned()),
    }
}

/// `Dec 02 12:39:16.123456` in local time, as journalctl's `short-precise` shows it.
fn local_time(micros: i64) -> String {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = micros.div_euclid(1_000_000) as libc::time_t;
    // SAFETY: `tm` is plain data (all zeroes is a valid value), and localtime_r only writes
    // into the `tm` we own, reading `secs`; both outlive the call.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return String::new();
        }
        tm
    };
    format!(
        "{} {:02} {:02}:{:02}:{:02}.{:06}",
        MONTHS[tm.tm_mon.clamp(0, 11) as usize],
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        micros.rem_euclid(1_000_000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_journalctl_for_every_unit_the_app_has() {
        assert_eq!(journal_units("web"), ["web.socket", "web.service", "web@*.socket", "web@*.service", "web.target"]);
        let cmd = journalctl("web", true, Some(5));
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert!(args.windows(2).any(|w| w == ["-u", "web@*.service"]), "{args:?}");
        assert!(args.contains(&"-f".to_owned()) && args.contains(&"--lines=5".to_owned()), "{args:?}");
    }

    #[test]
    fn every_line_starts_with_the_instance_or_unit() {
        let worker = r#"{"__REALTIME_TIMESTAMP":"1764678000123456","_PID":"42","_SYSTEMD_UNIT":"web@2.service","SDCLUSTER_INSTANCE":"2","MESSAGE":"serving 127.0.0.1:8080"}"#;
        let line = format_entry("web", worker).unwrap();
        assert!(line.starts_with("web@2  "), "{line}");
        assert!(line.ends_with(" [42] serving 127.0.0.1:8080"), "{line}");
        // A panic on stderr: no field, the unit says which instance.
        let stderr = r#"{"_SYSTEMD_UNIT":"web@3.service","MESSAGE":"thread 'main' panicked"}"#;
        assert!(format_entry("web", stderr).unwrap().starts_with("web@3 "));
        // systemd's own message about a unit.
        let systemd =
            r#"{"_SYSTEMD_UNIT":"init.scope","UNIT":"web.socket","_PID":"1","MESSAGE":"Listening on web.socket."}"#;
        assert!(format_entry("web", systemd).unwrap().starts_with("web.socket "));
        let twice = r#"{"SDCLUSTER_INSTANCE":["4","4"],"MESSAGE":[104,105]}"#;
        let line = format_entry("web", twice).unwrap();
        assert!(line.starts_with("web@4 ") && line.ends_with(" hi"), "{line}");
        assert_eq!(format_entry("web", "-- No entries --"), None);
    }
}
