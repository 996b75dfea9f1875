//! The local socket through which `sdcluster status`/`restart`/`scale` reach a running
//! `sdcluster run`, where its notify socket lives, and the typed protocol spoken on it: one
//! JSON [`ControlRequest`] line from the client, one JSON [`ControlResponse`] line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, fstat};
use nix::unistd::Uid;
use serde::{Deserialize, Serialize};

use crate::spec::Instances;
use crate::status::ClusterStatus;

/// Where `sdcluster run` keeps its sockets: `/run/sdcluster` for root, else the user's
/// runtime directory (`$XDG_RUNTIME_DIR/sdcluster`, or `/tmp/sdcluster-UID` without it);
/// `SDCLUSTER_RUNTIME_DIR` overrides both. Whoever can write into it can take over the
/// control socket: [`prepare_private_dir`] makes it (mode 0700) and checks it before use.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SDCLUSTER_RUNTIME_DIR") {
        return dir.into();
    }
    if nix::unistd::geteuid().is_root() {
        return ROOT_RUNTIME_DIR.into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("sdcluster"),
        None => std::env::temp_dir().join(format!("sdcluster-{}", nix::unistd::geteuid())),
    }
}

/// A directory `sdcluster run` refuses to keep its sockets (or its apps' runtime files) in,
/// and why: the message says what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnsafeDir(pub String);

/// Whether a directory may be used for runtime files, and how strictly it is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    /// Owned by us, mode 0700 (no access for group or others), not a symlink. Root may also
    /// use a root-owned directory that group and others can read but not write (systemd
    /// makes `/run/sdcluster` 0755 for the runtime directories of installed apps, whose
    /// workers run as their own users): nobody else can create, replace or remove anything
    /// in it.
    Private,
    /// For a client about to talk to the sockets in it: owned by us or by root, writable by
    /// nobody else, not a symlink. (A user's status request to root's cluster is fine; a
    /// socket another user could have planted is not.)
    Trusted,
}

/// Root's runtime directory. systemd shares it: the runtime directories of installed apps
/// (`RuntimeDirectory=sdcluster/APP`) are made in it, for workers that run as their own
/// users; so root makes it 0755, as systemd would, and nobody else can write into it.
pub const ROOT_RUNTIME_DIR: &str = "/run/sdcluster";

/// Creates `dir` if it is missing (mode 0700, but [`ROOT_RUNTIME_DIR`] 0755 for root;
/// missing parents as usual), then checks it ([`check_dir`] with [`Privacy::Private`]).
pub fn prepare_private_dir(dir: &Path) -> Result<(), UnsafeDir> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(|e| UnsafeDir(format!("cannot create {}: {e}", parent.display())))?;
        }
    }
    let shared = Uid::effective().is_root() && dir == Path::new(ROOT_RUNTIME_DIR);
    match std::fs::DirBuilder::new().mode(if shared { 0o755 } else { 0o700 }).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(UnsafeDir(format!("cannot create the runtime directory {}: {e}", dir.display()))),
    }
    check_dir(dir, Privacy::Private)
}

/// Checks that `dir` is a directory (not a symlink to one: it is opened with `O_NOFOLLOW`)
/// that no other user can take over (see [`Privacy`]); the error says what is wrong and what
/// to do.
pub fn check_dir(dir: &Path, privacy: Privacy) -> Result<(), UnsafeDir> {
    let me = Uid::effective();
    let shown = dir.display();
    let fix = "remove it, or point SDCLUSTER_RUNTIME_DIR at a directory of your own with mode 0700";
    let fd = match open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
    {
        Ok(fd) => fd,
        // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR (or ELOOP): lstat tells.
        Err(Errno::ELOOP | Errno::ENOTDIR) if dir.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink()) => {
            return Err(UnsafeDir(format!(
                "the runtime directory {shown} is a symbolic link: refusing it (whoever made it chooses where the \
                 control socket goes); {fix}"
            )));
        }
        Err(Errno::ENOTDIR) => {
            return Err(UnsafeDir(format!("the runtime directory {shown} is not a directory; {fix}")));
        }
        Err(e) => return Err(UnsafeDir(format!("cannot open the runtime directory {shown}: {}", e.desc()))),
    };
    let st = fstat(&fd).map_err(|e| UnsafeDir(format!("cannot stat {shown}: {}", e.desc())))?;
    judge(dir, st.st_uid, st.st_mode & 0o7777, me.as_raw(), privacy)
}

/// [`check_dir`]'s verdict on a directory of `owner` and `mode`, for a process of uid `me`.
fn judge(dir: &Path, owner: u32, mode: u32, me: u32, privacy: Privacy) -> Result<(), UnsafeDir> {
    let shown = dir.display();
    let fix = "remove it, or point SDCLUSTER_RUNTIME_DIR at a directory of your own with mode 0700";
    let owner_ok = owner == me || (privacy == Privacy::Trusted && owner == 0);
    if !owner_ok {
        return Err(UnsafeDir(format!(
            "the runtime directory {shown} belongs to uid {owner}, not to this user (uid {me}): refusing it (its \
             owner could take over or watch the control socket); {fix}"
        )));
    }
    let readable_ok = privacy == Privacy::Trusted || owner == 0;
    let exposed = if readable_ok { mode & 0o022 } else { mode & 0o077 };
    if exposed != 0 {
        let who = if readable_ok { "write into it" } else { "use it" };
        return Err(UnsafeDir(format!(
            "the runtime directory {shown} has mode {mode:04o}: group or others may {who}; make it private \
             (chmod 700 {shown}), or {fix}"
        )));
    }
    Ok(())
}

/// Whether a peer of uid `peer` may use a control socket of this process (effective uid
/// `me`): the same user, or root.
pub fn peer_allowed(peer: u32, me: u32) -> bool {
    peer == me || peer == 0
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
    if dir.symlink_metadata().is_ok() {
        // (Missing, the connect below says so.)
        check_dir(dir, Privacy::Trusted)
            .map_err(|e| fail(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.0)))?;
    }
    let stream = UnixStream::connect(&path).map_err(fail)?;
    // Whoever answers must be us or root: a socket another user planted gets no request.
    let server = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| fail(e.into()))?;
    let me = Uid::effective().as_raw();
    if !peer_allowed(server.uid(), me) {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing it: the socket is served by uid {} (pid {}), not by this user (uid {me}) or root",
                server.uid(),
                server.pid()
            ),
        )));
    }
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
    fn runtime_directories_must_be_private() {
        let dir = Path::new("/run/x");
        let ok = |owner, mode, me, privacy| judge(dir, owner, mode, me, privacy).map_err(|e| e.0);
        assert_eq!(ok(1000, 0o700, 1000, Privacy::Private), Ok(()));
        let err = ok(1001, 0o700, 1000, Privacy::Private).unwrap_err();
        assert!(
            err.starts_with("the runtime directory /run/x belongs to uid 1001, not to this user (uid 1000)"),
            "{err}"
        );
        assert!(err.contains("SDCLUSTER_RUNTIME_DIR"), "what to do: {err}");
        let err = ok(1000, 0o750, 1000, Privacy::Private).unwrap_err();
        assert!(err.contains("has mode 0750: group or others may use it") && err.contains("chmod 700 /run/x"), "{err}");
        assert!(ok(1000, 0o701, 1000, Privacy::Private).is_err(), "others may not even search it");
        // Root's /run/sdcluster, as systemd makes it for installed apps: nobody else can write.
        assert_eq!(ok(0, 0o755, 0, Privacy::Private), Ok(()));
        assert!(ok(0, 0o775, 0, Privacy::Private).unwrap_err().contains("may write into it"));
        assert!(ok(0, 0o1777, 0, Privacy::Private).is_err(), "not even a sticky /tmp");
        // A client trusts its own and root's directories that nobody else can write.
        assert_eq!(ok(0, 0o755, 1000, Privacy::Trusted), Ok(()));
        assert_eq!(ok(1000, 0o755, 1000, Privacy::Trusted), Ok(()));
        assert!(ok(1001, 0o700, 1000, Privacy::Trusted).is_err());
        assert!(ok(1000, 0o757, 1000, Privacy::Trusted).is_err());
        assert!(ok(0, 0o700, 1000, Privacy::Private).is_err(), "a user does not run in root's directory");
    }

    #[test]
    fn private_directories_are_made_private_and_symlinks_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("sdcluster-rtdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let made = base.join("a/sdcluster");
        prepare_private_dir(&made).unwrap();
        assert_eq!(std::fs::metadata(&made).unwrap().permissions().mode() & 0o7777, 0o700);
        prepare_private_dir(&made).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&made, &link).unwrap();
        let err = prepare_private_dir(&link).unwrap_err().0;
        assert!(err.contains("is a symbolic link: refusing it"), "{err}");
        let file = base.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(check_dir(&file, Privacy::Private).unwrap_err().0.contains("is not a directory"));
        std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(prepare_private_dir(&made).unwrap_err().0.contains("has mode 0777"), "an existing one is not fixed");
        if Uid::effective().is_root() {
            std::fs::set_permissions(&made, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&made, Some(Uid::from_raw(65534)), None).unwrap();
            let err = prepare_private_dir(&made).unwrap_err().0;
            assert!(err.contains("belongs to uid 65534, not to this user (uid 0)"), "{err}");
        }
        std::fs::remove_dir_all(&base).unwrap();
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
