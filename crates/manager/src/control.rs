//! The local socket through which `sdcluster status`/`restart`/`scale` reach a running
//! `sdcluster run`, where its notify socket lives, and the typed protocol spoken on it: one
//! JSON [`ControlRequest`] line from the client, one JSON [`ControlResponse`] line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::Instances;
use crate::status::ClusterStatus;

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

/// The folder of app `name`'s hand-over flags, one file per instance
/// (`sdcluster_protocol::handover::HANDOVER_FLAG_ENV`).
pub fn handover_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.handover"))
}

/// The folder of app `name`'s credentials, one private folder per instance
/// (`$CREDENTIALS_DIRECTORY`), each there while its instance's process runs.
pub fn credentials_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.credentials"))
}

/// What a client asks of `sdcluster run`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The cluster as `sdcluster status` shows it.
    Status,
    /// A rolling restart; answered once it is over.
    Restart,
    /// Run this many instances (`auto`: one per CPU of the supervisor).
    Scale {
        /// The new count.
        #[serde(with = "instances_text")]
        instances: Instances,
    },
}

/// What `sdcluster run` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Answers [`ControlRequest::Status`].
    Status(ClusterStatus),
    /// Every instance was restarted, one at a time, each ready before the next.
    Restarted {
        /// How many running instances were restarted.
        instances: usize,
        /// The instances that had failed (exited with bad input, not restarted) and were
        /// started again, by name.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        started: Vec<String>,
    },
    /// The cluster runs `to` instances instead of `from`.
    Scaled {
        /// Instances before.
        from: usize,
        /// Instances now.
        to: usize,
    },
    /// The request failed (or a rolling restart stopped): why.
    Error {
        /// For people.
        message: String,
    },
}

impl ControlResponse {
    /// An [`ControlResponse::Error`].
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error { message: message.into() }
    }

    /// The status in a [`ControlResponse::Status`]; the message of anything else.
    pub fn into_status(self) -> Result<ClusterStatus, String> {
        match self {
            Self::Status(status) => Ok(status),
            Self::Error { message } => Err(message),
            other => Err(format!("unexpected answer to a status request: {other:?}")),
        }
    }

    /// The line the CLI prints for an answer, or the error's message.
    pub fn human(&self) -> Result<String, String> {
        match self {
            Self::Status(status) => Ok(status.table().trim_end().to_owned()),
            Self::Restarted { instances, started } if started.is_empty() => {
                Ok(format!("restarted {instances} instances one at a time"))
            }
            Self::Restarted { instances, started } => Ok(format!(
                "restarted {instances} instances one at a time, and started {} failed {} again ({})",
                started.len(),
                if started.len() == 1 { "instance" } else { "instances" },
                started.join(", ")
            )),
            Self::Scaled { to, .. } => Ok(format!("{to} instances")),
            Self::Error { message } => Err(message.clone()),
        }
    }
}

mod instances_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::spec::Instances;

    pub fn serialize<S: Serializer>(n: &Instances, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(n)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instances, D::Error> {
        let text = String::deserialize(d)?;
        Instances::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Writes `message` as one JSON line.
pub fn write_message<T: Serialize>(mut out: impl Write, message: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Parses one line written by [`write_message`].
pub fn parse_message<T: for<'de> Deserialize<'de>>(line: &str) -> Result<T, String> {
    serde_json::from_str(line.trim_end()).map_err(|e| format!("{e} in {:?}", line.trim_end()))
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

/// Sends one request and returns the answer; an answer that is not a [`ControlResponse`]
/// (another version of sdcluster) comes back as an [`ControlResponse::Error`].
pub fn request(dir: &Path, app: &str, request: &ControlRequest) -> Result<ControlResponse, NotRunning> {
    let path = control_path(dir, app);
    let fail = |source| NotRunning { app: app.into(), path: path.clone(), source };
    let stream = UnixStream::connect(&path).map_err(fail)?;
    stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(fail)?;
    exchange(stream, request).map_err(fail)
}

/// One request and its answer over a connected stream.
pub fn exchange(mut stream: UnixStream, request: &ControlRequest) -> std::io::Result<ControlResponse> {
    write_message(&mut stream, request)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        return Ok(ControlResponse::error("`sdcluster run` closed the control connection without an answer"));
    }
    Ok(parse_message(&answer).unwrap_or_else(|e| ControlResponse::error(format!("unexpected answer: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_once(stream: UnixStream, answer: impl FnOnce(ControlRequest) -> ControlResponse) {
        let mut line = String::new();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        reader.read_line(&mut line).unwrap();
        let request = parse_message(&line).unwrap();
        write_message(&stream, &answer(request)).unwrap();
    }

    #[test]
    fn requests_and_answers_cross_a_socket() {
        let cases = [
            (
                ControlRequest::Status,
                ControlResponse::Status(ClusterStatus {
                    app: "a".into(),
                    supervisor: "sdcluster run".into(),
                    listen: vec!["127.0.0.1:80".into()],
                    instances: vec![],
                }),
            ),
            (ControlRequest::Restart, ControlResponse::Restarted { instances: 3, started: vec![] }),
            (ControlRequest::Scale { instances: Instances::Count(4) }, ControlResponse::Scaled { from: 2, to: 4 }),
            (
                ControlRequest::Scale { instances: Instances::Auto },
                ControlResponse::error("the cluster is shutting down"),
            ),
        ];
        for (request, response) in cases {
            let (client, server) = UnixStream::pair().unwrap();
            let (expected, answer) = (request.clone(), response.clone());
            let thread = std::thread::spawn(move || {
                serve_once(server, |got| {
                    assert_eq!(got, expected);
                    answer
                })
            });
            assert_eq!(exchange(client, &request).unwrap(), response);
            thread.join().unwrap();
        }
    }

    #[test]
    fn the_wire_format_is_one_json_line() {
        let mut out = Vec::new();
        write_message(&mut out, &ControlRequest::Scale { instances: Instances::Count(3) }).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"request\":\"scale\",\"instances\":\"3\"}\n");
        assert!(parse_message::<ControlRequest>("{\"request\":\"scale\",\"instances\":\"0\"}").is_err());
        assert!(parse_message::<ControlRequest>("status").is_err());
    }

    #[test]
    fn garbage_and_silence_are_errors() {
        let (client, server) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            let mut line = String::new();
            BufReader::new(&server).read_line(&mut line).unwrap();
            (&server).write_all(b"ok: fine\n").unwrap();
        });
        let answer = exchange(client, &ControlRequest::Status).unwrap();
        assert!(matches!(&answer, ControlResponse::Error { message } if message.starts_with("unexpected answer")));
        thread.join().unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        drop(server);
        // Either the write fails (EPIPE) or the read finds the end: never an answer.
        let answer = exchange(client, &ControlRequest::Restart);
        assert!(answer.is_err() || matches!(answer, Ok(ControlResponse::Error { .. })), "{answer:?}");
    }

    #[test]
    fn human_output() {
        assert_eq!(
            ControlResponse::Restarted { instances: 2, started: vec![] }.human().unwrap(),
            "restarted 2 instances one at a time"
        );
        assert_eq!(
            ControlResponse::Restarted { instances: 1, started: vec!["2".into()] }.human().unwrap(),
            "restarted 1 instances one at a time, and started 1 failed instance again (2)"
        );
        // An older sdcluster's answer (no `started`) still reads.
        let old: ControlResponse = parse_message("{\"response\":\"restarted\",\"instances\":2}").unwrap();
        assert_eq!(old, ControlResponse::Restarted { instances: 2, started: vec![] });
        assert_eq!(ControlResponse::Scaled { from: 3, to: 1 }.human().unwrap(), "1 instances");
        assert_eq!(ControlResponse::error("no").human().unwrap_err(), "no");
    }
}
