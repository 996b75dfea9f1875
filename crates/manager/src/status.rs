//! One status model for both supervisors, shown as a table or as JSON, so `sdcluster status`
//! looks the same under systemd and under `sdcluster run`.

use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

use sdcluster_protocol::metrics::{self, InstanceMetrics, MetricsTable};
use serde::{Deserialize, Serialize};

/// A cluster's state at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The app name.
    pub app: String,
    /// `systemd` or `sdcluster run`.
    pub supervisor: String,
    /// The listen addresses.
    pub listen: Vec<String>,
    /// One entry per configured instance.
    pub instances: Vec<InstanceStatus>,
}

/// One worker instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The instance name (`1`, `2`, ...), as in `APP@1.service`.
    pub instance: String,
    /// The worker's pid, when one runs.
    pub pid: Option<u32>,
    /// `starting`, `running`, `stopping`, `restarting` (waiting to be started again), `failed`
    /// or `stopped`; under systemd, `ActiveState/SubState`.
    pub state: String,
    /// Seconds since the current process started.
    pub uptime_secs: Option<f64>,
    /// Restarts after deaths since the cluster started (systemd's `NRestarts`).
    pub restarts: u32,
    /// Resident memory in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU time used, in seconds.
    pub cpu_secs: Option<f64>,
    /// The worker's last `STATUS=` line.
    pub status_text: String,
    /// Requests the current process answered, from the metrics table; `None` for a program
    /// that has no slot there (not the reference worker) or when no table is readable.
    #[serde(default)]
    pub requests: Option<u64>,
    /// Requests per second between two samples of [`InstanceStatus::requests`]; `None`
    /// from a single sample (`status --json`).
    #[serde(default)]
    pub request_rate: Option<f64>,
    /// Connections open now, from the metrics table.
    #[serde(default)]
    pub open_connections: Option<u64>,
    /// How the instance's previous process ended, if one did.
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// Why the instance stays down and is not restarted, when it failed that way
    /// (`exited 2 (bad input), not restarted`); `sdcluster restart --rolling` starts it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// `exited`, `killed` or `dumped` (core); or why the supervisor ended it: `watchdog`,
    /// `start-timeout`, `stop-timeout` (systemd's `Result=` for the other failures); `exec`
    /// when its program could not be executed, `resources` when its start could not be
    /// prepared (an environment file, a credential): [`LastExit::message`] says why.
    pub reason: String,
    /// The exit status, for `exited`.
    #[serde(default)]
    pub code: Option<i32>,
    /// The signal (`SIGKILL`), when a signal ended it.
    #[serde(default)]
    pub signal: Option<String>,
    /// For people, when the reason needs it: "cannot execute /usr/bin/nodee: No such file or
    /// directory".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl LastExit {
    /// From a `waitpid` result: exit status `code`, or the signal (with a core dump or not).
    pub fn from_wait(code: Option<i32>, signal: Option<&str>, core: bool) -> Self {
        match (code, signal) {
            (Some(code), _) => Self { reason: "exited".into(), code: Some(code), signal: None, message: None },
            (None, signal) => Self {
                reason: if core { "dumped" } else { "killed" }.into(),
                code: None,
                signal: signal.map(str::to_owned),
                message: None,
            },
        }
    }

    /// A process that never became its program (`code`: the exit status it then had).
    pub fn exec_failed(message: impl Into<String>, code: Option<i32>) -> Self {
        Self { reason: "exec".into(), code, signal: None, message: Some(message.into()) }
    }

    /// A start that failed before any process (systemd's `Result=resources`).
    pub fn start_failed(message: impl Into<String>) -> Self {
        Self { reason: "resources".into(), code: None, signal: None, message: Some(message.into()) }
    }

    /// Exited with [`EXIT_BAD_INPUT`](sdcluster_protocol::EXIT_BAD_INPUT): restarting won't help.
    pub fn is_bad_input(&self) -> bool {
        self.reason == "exited" && self.code == Some(i32::from(sdcluster_protocol::EXIT_BAD_INPUT))
    }

    /// What `status` says of an instance this exit left down, under either supervisor:
    /// "exited 2 (bad input), not restarted".
    pub fn not_restarted(&self) -> String {
        format!("{self}, not restarted")
    }

    /// The same end, ascribed to the supervisor's `reason` (`watchdog`, `start-timeout`).
    pub fn because(mut self, reason: Option<&str>) -> Self {
        if let Some(reason) = reason {
            self.reason = reason.to_owned();
        }
        self
    }
}

impl std::fmt::Display for LastExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(message) = &self.message {
            return f.write_str(message);
        }
        if self.is_bad_input() {
            return write!(f, "exited {} (bad input)", sdcluster_protocol::EXIT_BAD_INPUT);
        }
        match (self.reason.as_str(), self.code, &self.signal) {
            ("exited", Some(code), _) => write!(f, "exited {code}"),
            ("killed", _, Some(sig)) => write!(f, "killed by {sig}"),
            ("dumped", _, Some(sig)) => write!(f, "dumped {sig}"),
            (reason, _, _) => f.write_str(reason),
        }
    }
}

impl Counters {
    /// Every slot of `table` now (`None`: no table, no slots).
    pub fn of_table(table: Option<&MetricsTable>) -> Vec<Self> {
        let Some(table) = table else { return Vec::new() };
        table.snapshot(metrics::now_ms()).iter().map(Self::from).collect()
    }
}

impl From<&InstanceMetrics> for Counters {
    fn from(m: &InstanceMetrics) -> Self {
        Self {
            instance: m.instance.clone(),
            pid: m.pid,
            live: m.live,
            requests: m.requests,
            open_connections: m.open_connections,
        }
    }
}

/// One worker's slot of the metrics table, as far as the status view uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// The instance name.
    pub instance: String,
    /// The process that writes the slot.
    pub pid: u32,
    /// The process is alive.
    pub live: bool,
    /// Requests it answered.
    pub requests: u64,
    /// Connections it has open.
    pub open_connections: u64,
}

/// Resident memory and CPU time of a process, from /proc.
pub fn process_usage(pid: u32) -> (Option<u64>, Option<f64>) {
    let memory = std::fs::read_to_string(format!("/proc/{pid}/status")).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
        let rest = s.rsplit_once(") ")?.1;
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(ticks as f64 / hz)
    });
    (memory.map(|kb| kb * 1024), cpu)
}

impl ClusterStatus {
    /// Fills each instance's requests and open connections from the metrics table's slots
    /// (the live slot of the instance's current pid).
    pub fn fill_counters(&mut self, counters: &[Counters]) {
        for i in &mut self.instances {
            let Some(pid) = i.pid else { continue };
            if let Some(c) = counters.iter().find(|c| c.live && c.pid == pid && c.instance == i.instance) {
                i.requests = Some(c.requests);
                i.open_connections = Some(c.open_connections);
            }
        }
    }

    /// Sets each instance's request rate from an earlier sample `elapsed` before (the same
    /// process, its count not gone back).
    pub fn add_rates(&mut self, before: &ClusterStatus, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            return;
        }
        for i in &mut self.instances {
            let earlier = before.instances.iter().find(|b| b.instance == i.instance && b.pid == i.pid);
            if let (Some(now), Some(then)) = (i.requests, earlier.and_then(|b| b.requests)) {
                i.request_rate = now.checked_sub(then).map(|d| d as f64 / secs);
            }
        }
    }

    /// Whether any instance has figures from the metrics table.
    pub fn has_counters(&self) -> bool {
        self.instances.iter().any(|i| i.requests.is_some())
    }

    /// A table in the spirit of `systemctl list-units` and `pm2 ls`, at any width.
    pub fn table(&self) -> String {
        self.table_lines(None).join("\n") + "\n"
    }

    /// The table's lines, none longer than `width` columns when given: the `STATUS` column
    /// (the last, free text) is cut to fit, with `…`.
    pub fn table_lines(&self, width: Option<usize>) -> Vec<String> {
        let title = format!(
            "{} ({}), listening on {}",
            self.app,
            self.supervisor,
            if self.listen.is_empty() { "-".to_owned() } else { self.listen.join(", ") }
        );
        let header = [
            "INSTANCE",
            "PID",
            "STATE",
            "UPTIME",
            "RESTARTS",
            "MEMORY",
            "CPU",
            "REQS",
            "REQ/S",
            "CONNS",
            "LAST EXIT",
            "STATUS",
        ];
        let dash = || "-".to_owned();
        let rows: Vec<[String; 12]> = self
            .instances
            .iter()
            .map(|i| {
                [
                    i.instance.clone(),
                    i.pid.map_or_else(dash, |p| p.to_string()),
                    i.state.clone(),
                    i.uptime_secs.map_or_else(dash, |s| human_duration(Duration::from_secs_f64(s))),
                    i.restarts.to_string(),
                    i.memory_bytes.map_or_else(dash, human_bytes),
                    i.cpu_secs.map_or_else(dash, human_cpu),
                    i.requests.map_or_else(dash, human_count),
                    i.request_rate.map_or_else(dash, human_rate),
                    i.open_connections.map_or_else(dash, human_count),
                    i.last_exit.as_ref().map_or_else(dash, ToString::to_string),
                    i.failed.as_ref().map_or_else(|| i.status_text.clone(), |why| format!("failed: {why}")),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // STATUS (free text, often what the other columns say) only where it has room.
        let before_status: usize = widths[..widths.len() - 1].iter().map(|w| w + 2).sum();
        let columns = match width {
            Some(w) if w < before_status + MIN_STATUS_WIDTH => header.len() - 1,
            _ => header.len(),
        };
        let line = |cells: &[&str]| {
            let cells = &cells[..columns];
            let mut l = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
                }
            }
            let l = l.trim_end().to_owned();
            match width {
                Some(w) => fit(&l, w),
                None => l,
            }
        };
        let mut out = vec![width.map_or(title.clone(), |w| fit(&title, w)), line(&header)];
        out.extend(rows.iter().map(|row| line(&row.each_ref().map(String::as_str))));
        out
    }
}

/// Below this many columns left for it, the table has no `STATUS` column.
const MIN_STATUS_WIDTH: usize = 12;

/// CPU time: `1.50s`, `12.3s`, `2m3s`.
fn human_cpu(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 100.0 {
        format!("{s:.1}s")
    } else {
        human_duration(Duration::from_secs_f64(s))
    }
}

/// `line` cut to `width` characters, ending in `…` when cut.
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `999`, `12.3k`, `4.5M`, `1.2G`.
pub fn human_count(n: u64) -> String {
    if n < 1000 {
        return n.to_string();
    }
    let mut value = n as f64;
    for unit in ["k", "M", "G", "T"] {
        value /= 1000.0;
        // Rounded to one decimal, 999.95k reads 1.0M, not 1000.0k.
        if value < 999.95 || unit == "T" {
            return format!("{value:.1}{unit}");
        }
    }
    unreachable!("T is the last unit")
}

/// `0/s`, `1.2/s`, `345/s`, `12.3k/s`.
pub fn human_rate(r: f64) -> String {
    if r < 0.05 {
        "0/s".into()
    } else if r < 100.0 {
        format!("{r:.1}/s")
    } else if r < 1000.0 {
        format!("{r:.0}/s")
    } else {
        format!("{}/s", human_count(r as u64))
    }
}

/// Set by SIGINT, SIGTERM and SIGHUP while [`watch`] runs.
static STOP_WATCHING: AtomicBool = AtomicBool::new(false);

extern "C" fn stop_watching(_: libc::c_int) {
    STOP_WATCHING.store(true, Ordering::SeqCst);
}

/// `sdcluster status --watch`: the table again every `interval`, with request rates from
/// the previous refresh, until Ctrl-C. On a terminal each frame overwrites the previous one
/// in place (cursor home, each line cleared to its end, the rest of the screen cleared after
/// the last line: no flicker, no scrolling), cut to the terminal's width; elsewhere one table
/// per interval, separated by a blank line. `fetch` asks the supervisor; its error is shown
/// in the frame and the next refresh tries again.
pub fn watch(
    title: &str,
    interval: Duration,
    mut fetch: impl FnMut() -> Result<ClusterStatus, String>,
) -> io::Result<()> {
    let handler = SigAction::new(SigHandler::Handler(stop_watching), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &handler) }.map_err(io::Error::from)?;
    }
    // SAFETY: isatty has no preconditions.
    let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
    let mut out = io::stdout().lock();
    if tty {
        // Hide the cursor and clear the screen once; frames then only overwrite.
        out.write_all(b"\x1b[?25l\x1b[H\x1b[2J")?;
    }
    let mut previous: Option<(ClusterStatus, Instant)> = None;
    let mut first = true;
    let result = (|| -> io::Result<()> {
        while !STOP_WATCHING.load(Ordering::SeqCst) {
            let taken = Instant::now();
            let mut lines = vec![format!("{title}, every {}: {}", human_interval(interval), local_time())];
            match fetch() {
                Ok(mut status) => {
                    if let Some((before, at)) = &previous {
                        status.add_rates(before, taken - *at);
                    }
                    lines.extend(status.table_lines(terminal_width()));
                    previous = Some((status, taken));
                }
                Err(e) => lines.push(format!("cannot get the status: {e}")),
            }
            let mut frame = String::new();
            if tty {
                frame.push_str("\x1b[H");
                for line in &lines {
                    let _ = writeln!(frame, "{line}\x1b[K");
                }
                frame.push_str("\x1b[J");
            } else {
                if !first {
                    frame.push('\n');
                }
                for line in &lines {
                    let _ = writeln!(frame, "{line}");
                }
            }
            first = false;
            out.write_all(frame.as_bytes())?;
            out.flush()?;
            let next = taken + interval;
            while !STOP_WATCHING.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= next {
                    break;
                }
                std::thread::sleep((next - now).min(Duration::from_millis(50)));
            }
        }
        Ok(())
    })();
    if tty {
        // Show the cursor again, below the last frame.
        out.write_all(b"\x1b[?25h")?;
        out.flush()?;
    }
    result
}

/// The terminal's width in columns, when stdout is one.
pub fn terminal_width() -> Option<usize> {
    // SAFETY: isatty has no preconditions.
    if unsafe { libc::isatty(libc::STDOUT_FILENO) } != 1 {
        return None;
    }
    // SAFETY: a zeroed winsize is valid; TIOCGWINSZ writes into it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ on stdout with a pointer to a winsize.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(size.ws_col as usize)
}

/// `HH:MM:SS` in local time.
fn local_time() -> String {
    // SAFETY: time(NULL) has no preconditions; localtime_r writes the zeroed tm.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return "-".into();
        }
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

fn human_interval(d: Duration) -> String {
    if d.subsec_millis() == 0 { format!("{}s", d.as_secs()) } else { format!("{}ms", d.as_millis()) }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

fn human_bytes(b: u64) -> String {
    let (value, unit) = match b {
        0..1024 => return format!("{b}B"),
        1024..1_048_576 => (b as f64 / 1024.0, "K"),
        1_048_576..1_073_741_824 => (b as f64 / 1_048_576.0, "M"),
        _ => (b as f64 / 1_073_741_824.0, "G"),
    };
    // Three digits at most: 3.0M, 12.5M, 123M.
    if value < 99.95 { format!("{value:.1}{unit}") } else { format!("{value:.0}{unit}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(name: &str, pid: Option<u32>, state: &str) -> InstanceStatus {
        InstanceStatus {
            instance: name.into(),
            pid,
            state: state.into(),
            uptime_secs: pid.map(|_| 3725.0),
            restarts: 0,
            memory_bytes: pid.map(|_| 3 * 1024 * 1024),
            cpu_secs: pid.map(|_| 1.5),
            status_text: String::new(),
            requests: None,
            request_rate: None,
            open_connections: None,
            last_exit: None,
            failed: None,
        }
    }

    fn cluster(instances: Vec<InstanceStatus>) -> ClusterStatus {
        ClusterStatus {
            app: "web".into(),
            supervisor: "sdcluster run".into(),
            listen: vec!["127.0.0.1:8080".into(), "[::1]:8080".into()],
            instances,
        }
    }

    #[test]
    fn table_lines_up() {
        let mut one = instance("1", Some(4242), "running");
        one.restarts = 2;
        one.status_text = "serving 127.0.0.1:8080: 10 requests, 1 open connections".into();
        one.requests = Some(12_345);
        one.request_rate = Some(1.23);
        one.open_connections = Some(3);
        one.last_exit = Some(LastExit::from_wait(None, Some("SIGKILL"), false));
        let mut two = instance("2", None, "restarting");
        two.restarts = 11;
        two.last_exit = Some(LastExit::from_wait(Some(1), None, false));
        let status = cluster(vec![one, two]);
        assert_eq!(
            status.table(),
            "web (sdcluster run), listening on 127.0.0.1:8080, [::1]:8080\n\
             INSTANCE  PID   STATE       UPTIME  RESTARTS  MEMORY  CPU    REQS   REQ/S  CONNS  LAST EXIT          STATUS\n\
             1         4242  running     1h2m    2         3.0M    1.50s  12.3k  1.2/s  3      killed by SIGKILL  serving 127.0.0.1:8080: 10 requests, 1 open connections\n\
             2         -     restarting  -       11        -       -      -      -      -      exited 1\n"
        );
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<ClusterStatus>(&json).unwrap(), status);
    }

    #[test]
    fn json_of_an_older_sdcluster_still_reads() {
        let old = r#"{"app":"a","supervisor":"systemd","listen":[],"instances":[{"instance":"1","pid":7,
            "state":"active/running","uptime_secs":1.0,"restarts":0,"memory_bytes":null,"cpu_secs":null,
            "status_text":""}]}"#;
        let status: ClusterStatus = serde_json::from_str(old).unwrap();
        assert_eq!(status.instances[0].requests, None);
        assert_eq!(status.instances[0].last_exit, None);
    }

    #[test]
    fn four_instances_fit_in_100_columns() {
        let instances = (1..=4)
            .map(|k| {
                let mut i = instance(&k.to_string(), Some(4_194_000 + k), "running");
                i.restarts = 12;
                i.memory_bytes = Some(123 * 1024 * 1024);
                i.cpu_secs = Some(123.45);
                i.requests = Some(999_999);
                i.request_rate = Some(12_345.0);
                i.open_connections = Some(999);
                i.last_exit = Some(LastExit::from_wait(None, Some("SIGKILL"), false));
                i.status_text = "serving 127.0.0.1:8080: 999999 requests, 999 open connections".into();
                i
            })
            .collect();
        let lines = cluster(instances).table_lines(Some(100));
        assert_eq!(lines.len(), 6);
        for line in &lines {
            assert!(line.chars().count() <= 100, "{} columns: {line}", line.chars().count());
        }
        // Every figure is there; only the free text of STATUS makes room.
        let table = lines.join("\n");
        assert!(
            lines[2].contains("1.0M") && lines[2].contains("12.3k/s") && lines[2].ends_with("killed by SIGKILL"),
            "{table}"
        );
        assert!(lines[1].ends_with("LAST EXIT"), "{table}");
        // With room, STATUS is there, cut to the width.
        let mut wide = cluster(vec![instance("1", Some(1), "running")]);
        wide.instances[0].status_text = "x".repeat(200);
        let lines = wide.table_lines(Some(120));
        assert!(
            lines[1].ends_with("STATUS") && lines[2].ends_with('…') && lines[2].chars().count() == 120,
            "{lines:?}"
        );
    }

    #[test]
    fn counters_and_rates_follow_the_current_process() {
        let mut before = cluster(vec![instance("1", Some(10), "running"), instance("2", Some(20), "running")]);
        let slot = |instance: &str, pid, requests| Counters {
            instance: instance.into(),
            pid,
            live: true,
            requests,
            open_connections: 2,
        };
        before.fill_counters(&[slot("1", 10, 100), slot("2", 20, 50), slot("2", 19, 7)]);
        assert_eq!(before.instances[1].requests, Some(50), "the slot of the current pid");
        let mut after = before.clone();
        after.instances[1].pid = Some(21);
        after.fill_counters(&[slot("1", 10, 150), slot("2", 21, 3)]);
        after.add_rates(&before, Duration::from_millis(500));
        assert_eq!(after.instances[0].request_rate, Some(100.0));
        assert_eq!(after.instances[1].request_rate, None, "a new process: no rate yet");
        assert_eq!(after.instances[0].open_connections, Some(2));
        // No slot (not the reference worker): no figures.
        let mut other = cluster(vec![instance("1", Some(10), "running")]);
        other.fill_counters(&[]);
        assert!(!other.has_counters());
    }

    #[test]
    fn a_failed_instance_says_why_it_is_not_restarted() {
        let bad = LastExit::from_wait(Some(2), None, false);
        assert!(bad.is_bad_input() && !LastExit::from_wait(Some(1), None, false).is_bad_input());
        assert_eq!(bad.to_string(), "exited 2 (bad input)");
        assert_eq!(bad.not_restarted(), "exited 2 (bad input), not restarted");
        let mut one = instance("1", None, "failed");
        one.status_text = "serving".into();
        one.last_exit = Some(bad.clone());
        one.failed = Some(bad.not_restarted());
        let exec = LastExit::exec_failed("cannot execute /usr/bin/nodee: No such file or directory", Some(127));
        let mut two = instance("2", None, "restarting");
        two.last_exit = Some(exec.clone());
        let status = cluster(vec![one, two]);
        let table = status.table();
        let rows: Vec<&str> = table.lines().skip(2).collect();
        assert!(rows[0].contains(" failed ") && rows[0].contains(" exited 2 (bad input) "), "{table}");
        assert!(rows[0].ends_with(" failed: exited 2 (bad input), not restarted"), "{table}");
        assert!(rows[1].ends_with("cannot execute /usr/bin/nodee: No such file or directory"), "{table}");
        // JSON: the new fields are there, and absent where they say nothing.
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains("\"failed\":\"exited 2 (bad input), not restarted\""), "{json}");
        assert!(
            json.contains("\"reason\":\"exec\",\"code\":127,\"signal\":null,\"message\":\"cannot execute"),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ClusterStatus>(&json).unwrap(), status);
        let plain = serde_json::to_string(&cluster(vec![instance("1", Some(1), "running")])).unwrap();
        assert!(!plain.contains("failed") && !plain.contains("message"), "{plain}");
    }

    #[test]
    fn exits_read_as_people_say_them() {
        let killed = LastExit::from_wait(None, Some("SIGKILL"), false);
        assert_eq!(killed.to_string(), "killed by SIGKILL");
        assert_eq!(LastExit::from_wait(Some(1), None, false).to_string(), "exited 1");
        assert_eq!(LastExit::from_wait(None, Some("SIGSEGV"), true).to_string(), "dumped SIGSEGV");
        let watchdog = LastExit::from_wait(None, Some("SIGABRT"), true).because(Some("watchdog"));
        assert_eq!((watchdog.to_string(), watchdog.signal.as_deref()), ("watchdog".into(), Some("SIGABRT")));
        assert_eq!(killed.clone().because(None), killed);
    }

    #[test]
    fn units_are_short() {
        assert_eq!(
            [0, 999, 1000, 12_345, 999_999, 4_500_000, 1_200_000_000].map(human_count),
            ["0", "999", "1.0k", "12.3k", "1.0M", "4.5M", "1.2G"]
        );
        assert_eq!([0.0, 1.23, 345.4, 12_345.0].map(human_rate), ["0/s", "1.2/s", "345/s", "12.3k/s"]);
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abc", 4), "abc");
    }

    #[test]
    fn own_process_usage_is_readable() {
        let (mem, cpu) = process_usage(std::process::id());
        assert!(mem.unwrap() > 0);
        assert!(cpu.unwrap() >= 0.0);
    }
}
