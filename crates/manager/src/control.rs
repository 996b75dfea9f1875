//! The local socket through which `sdcluster status`/`restart`/`scale` reach a running
//! `sdcluster run`, and where its notify socket lives.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `sdcluster run` keeps its sockets: `/run/sdcluster` for root, else the user's
/// runtime directory; `SDCLUSTER_RUNTIME_DIR` overrides both.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SDCLUSTER_RUNTIME_DIR") {
        return dir.into();
    }
    if nix::unistd::geteuid().is_root() {
        return "/run/sdcluster".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("sdcluster"),
        None => std::env::temp_dir().join(format!("sdcluster-{}", nix::unistd::geteuid())),
    }
}

/// The control socket of app `name`.
pub fn control_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.control"))
}

/// The notify socket workers of app `name` report to.
pub fn notify_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.notify"))
}

/// No `sdcluster run` answers for this app.
#[derive(Debug, thiserror::Error)]
#[error("no `sdcluster run` for {app:?} answers at {path} ({source})")]
pub struct NotRunning {
    /// The app.
    pub app: String,
    /// Where we knocked.
    pub path: PathBuf,
    /// Why it did not answer.
    pub source: std::io::Error,
}

/// Sends one command line (`status`, `restart`, `scale N`) and returns the one-line answer.
pub fn request(dir: &Path, app: &str, command: &str) -> Result<String, NotRunning> {
    let path = control_path(dir, app);
    let fail = |source| NotRunning { app: app.into(), path: path.clone(), source };
    let mut stream = UnixStream::connect(&path).map_err(fail)?;
    stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(fail)?;
    stream.write_all(format!("{command}\n").as_bytes()).map_err(fail)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(fail)?;
    Ok(answer.trim_end().to_owned())
}
