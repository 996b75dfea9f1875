//! One status model for both supervisors, shown as a table or as JSON, so `sdcluster status`
//! looks the same under systemd and under `sdcluster run`.

use std::fmt::Write;
use std::time::Duration;

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
    /// A table in the spirit of `systemctl list-units` and `pm2 ls`.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} ({}), listening on {}\n",
            self.app,
            self.supervisor,
            if self.listen.is_empty() { "-".to_owned() } else { self.listen.join(", ") }
        );
        let header = ["INSTANCE", "PID", "STATE", "UPTIME", "RESTARTS", "MEMORY", "CPU", "STATUS"];
        let rows: Vec<[String; 8]> = self
            .instances
            .iter()
            .map(|i| {
                [
                    i.instance.clone(),
                    i.pid.map_or("-".into(), |p| p.to_string()),
                    i.state.clone(),
                    i.uptime_secs.map_or("-".into(), |s| human_duration(Duration::from_secs_f64(s))),
                    i.restarts.to_string(),
                    i.memory_bytes.map_or("-".into(), human_bytes),
                    i.cpu_secs.map_or("-".into(), |s| format!("{s:.2}s")),
                    i.status_text.clone(),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut line = |cells: &[&str]| {
            let mut l = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(cell);
                } else {
                    let _ = write!(l, "{cell:<w$}  ", w = widths[i]);
                }
            }
            out.push_str(l.trim_end());
            out.push('\n');
        };
        line(&header);
        for row in &rows {
            line(&row.each_ref().map(String::as_str));
        }
        out
    }
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
    match b {
        0..1024 => format!("{b}B"),
        1024..1_048_576 => format!("{:.1}K", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1}M", b as f64 / 1_048_576.0),
        _ => format!("{:.1}G", b as f64 / 1_073_741_824.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up() {
        let status = ClusterStatus {
            app: "web".into(),
            supervisor: "sdcluster run".into(),
            listen: vec!["127.0.0.1:8080".into()],
            instances: vec![
                InstanceStatus {
                    instance: "1".into(),
                    pid: Some(4242),
                    state: "running".into(),
                    uptime_secs: Some(3725.0),
                    restarts: 2,
                    memory_bytes: Some(3 * 1024 * 1024),
                    cpu_secs: Some(1.5),
                    status_text: "serving 127.0.0.1:8080: 10 requests, 1 open connections".into(),
                },
                InstanceStatus {
                    instance: "2".into(),
                    pid: None,
                    state: "restarting".into(),
                    uptime_secs: None,
                    restarts: 11,
                    memory_bytes: None,
                    cpu_secs: None,
                    status_text: String::new(),
                },
            ],
        };
        let table = status.table();
        assert_eq!(
            table,
            "web (sdcluster run), listening on 127.0.0.1:8080\n\
             INSTANCE  PID   STATE       UPTIME  RESTARTS  MEMORY  CPU    STATUS\n\
             1         4242  running     1h2m    2         3.0M    1.50s  serving 127.0.0.1:8080: 10 requests, 1 open connections\n\
             2         -     restarting  -       11        -       -\n"
        );
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(serde_json::from_str::<ClusterStatus>(&json).unwrap(), status);
    }

    #[test]
    fn own_process_usage_is_readable() {
        let (mem, cpu) = process_usage(std::process::id());
        assert!(mem.unwrap() > 0);
        assert!(cpu.unwrap() >= 0.0);
    }
}
