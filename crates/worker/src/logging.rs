//! Logs go to the journal (with fields) when stderr is the journal, else to stderr as text.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber; `RUST_LOG` filters (default `info`).
///
/// In the journal every entry carries `SDCLUSTER_INSTANCE=` (`instance`: the unit's `%i`, or
/// the process id), beside tracing-journald's own fields (`PRIORITY=`, `TARGET=`,
/// `CODE_FILE=`, `CODE_LINE=`, `SYSLOG_IDENTIFIER=`, the span's `SPAN_NAME=` and event
/// fields as `F_NAME=`), so that `journalctl SDCLUSTER_INSTANCE=2` selects one worker.
pub fn init(instance: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald.with_custom_fields([(sdcluster_protocol::env::INSTANCE, instance)]);
            let _ = registry.with(journald).try_init();
            return;
        }
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init();
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` of the stream it connected stderr to; if stderr
/// still is that stream, native journal entries beat text lines (see systemd.exec(5)).
fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}
