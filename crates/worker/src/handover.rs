//! The worker's side of the fd store (`sd_notify(3)`: `FDSTORE=1`, `FDSTOREREMOVE=1`,
//! `BARRIER=1`), for handing kept-alive connections to the next process of its instance.
//! The names and variables are in [`sdcluster_protocol::handover`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice, Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use sdcluster_protocol::PassedFd;
use sdcluster_protocol::handover::{
    FDSTORE_MAX_ENV, HANDOVER_FLAG_ENV, SYSTEMD_FDSTORE_ENV, StoredFd, bytes_name, connection_name, parse_stored,
    store_capacity,
};

/// How long one notification may wait for room in the supervisor's queue.
const SEND_PATIENCE: Duration = Duration::from_secs(2);
/// How long the worker waits for the supervisor to confirm it has every stored fd.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes taken over with one connection (a partial request head, at most).
const MAX_TAKEN_BYTES: u64 = 16 * 1024 * 1024;

/// The supervisor's fd store, as this worker may use it.
pub(crate) struct HandOver {
    notify: Option<(UnixDatagram, UnixAddr)>,
    flag: Option<PathBuf>,
    capacity: usize,
    reserved: AtomicUsize,
    seq: AtomicU64,
}

impl HandOver {
    /// From `NOTIFY_SOCKET`, `SDCLUSTER_HANDOVER_FLAG`, `FDSTORE` / `SDCLUSTER_FDSTORE_MAX`.
    pub(crate) fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        let notify = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = notify_addr(path.as_encoded_bytes())?;
            let socket = UnixDatagram::unbound().ok()?;
            socket.set_nonblocking(true).ok()?;
            Some((socket, addr))
        });
        Self {
            notify,
            flag: std::env::var_os(HANDOVER_FLAG_ENV).filter(|f| !f.is_empty()).map(PathBuf::from),
            capacity: store_capacity(var(SYSTEMD_FDSTORE_ENV).as_deref(), var(FDSTORE_MAX_ENV).as_deref()),
            reserved: AtomicUsize::new(0),
            seq: AtomicU64::new(0),
        }
    }

    /// Whether this stop hands connections over, or why not.
    pub(crate) fn wanted(&self) -> Result<(), &'static str> {
        if self.notify.is_none() {
            return Err("no supervisor (NOTIFY_SOCKET unset)");
        }
        if self.capacity == 0 {
            return Err("the supervisor keeps no fds for this instance (FileDescriptorStoreMax=0)");
        }
        match &self.flag {
            None => Err("the supervisor does not say whether a replacement comes (SDCLUSTER_HANDOVER_FLAG unset)"),
            Some(flag) if !flag.exists() => Err("no replacement comes (a stop, not a restart)"),
            Some(_) => Ok(()),
        }
    }

    /// Takes one place in the store for a connection; false when it is full (a connection
    /// with buffered bytes needs a second place, which [`HandOver::store`] checks).
    pub(crate) fn reserve(&self) -> bool {
        self.reserved.fetch_add(1, Relaxed) < self.capacity
    }

    /// Stores `fd` (and, first, the bytes already read from it), so that the next process
    /// gets both. On failure the fd comes back, to be served here.
    pub(crate) async fn store(&self, fd: OwnedFd, bytes: &[u8]) -> Result<(), (io::Error, OwnedFd)> {
        let seq = self.seq.fetch_add(1, Relaxed);
        let pid = std::process::id();
        if !bytes.is_empty() {
            if self.reserved.fetch_add(1, Relaxed) >= self.capacity {
                return Err((io::Error::other("the fd store is full"), fd));
            }
            let name = bytes_name(pid, seq);
            let stored = match sealed_memfd(&name, bytes) {
                Ok(memfd) => self.send(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(memfd.as_fd())).await,
                Err(e) => Err(e),
            };
            if let Err(e) = stored {
                return Err((e, fd));
            }
        }
        let name = connection_name(pid, seq);
        match self.send(&format!("FDSTORE=1\nFDNAME={name}\n"), Some(fd.as_fd())).await {
            Ok(()) => Ok(()),
            Err(e) => Err((e, fd)),
        }
    }

    /// Drops stored fds by name (those this process took over).
    pub(crate) async fn remove(&self, name: &str) {
        if let Err(e) = self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None).await {
            tracing::warn!("cannot remove {name} from the fd store: {e}");
        }
    }

    /// Waits until the supervisor has handled every notification sent so far
    /// (`sd_notify_barrier(3)`), so that no stored fd is still in flight when we exit.
    pub(crate) async fn barrier(&self) {
        let Ok((read, write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) else {
            return;
        };
        if self.send("BARRIER=1\n", Some(write.as_fd())).await.is_err() {
            return;
        }
        drop(write);
        let Ok(read) = tokio::net::unix::pipe::Receiver::from_owned_fd(read) else { return };
        // The read end reports EOF once the supervisor closed the write end it received.
        if tokio::time::timeout(BARRIER_TIMEOUT, read.readable()).await.is_err() {
            tracing::warn!("the supervisor did not confirm the hand-over within {BARRIER_TIMEOUT:?}");
        }
    }

    async fn send(&self, message: &str, fd: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<()> {
        let Some((socket, addr)) = &self.notify else {
            return Err(io::Error::other("NOTIFY_SOCKET is unset"));
        };
        let fds: Vec<i32> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        let started = Instant::now();
        loop {
            let iov = [IoSlice::new(message.as_bytes())];
            match sendmsg(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL, Some(addr))
            {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) if started.elapsed() < SEND_PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `NOTIFY_SOCKET` as an address: a path, or `@name` for the abstract namespace.
fn notify_addr(value: &[u8]) -> Option<UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.first()? {
        b'/' => UnixAddr::new(std::ffi::OsStr::from_bytes(value)).ok(),
        b'@' => UnixAddr::new_abstract(&value[1..]).ok(),
        _ => None,
    }
}

/// A memfd holding `bytes`, sealed so that nobody can change it on the way.
fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let mut file = File::from(fd);
    file.write_all(bytes)?;
    let seals = SealFlag::F_SEAL_SEAL | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals))?;
    Ok(file.into())
}

/// A connection the previous process of this instance handed over.
#[derive(Debug)]
pub struct TakenOver {
    /// Its store names (the connection's and its bytes'), to remove from the store.
    pub(crate) names: Vec<String>,
    /// The connected socket.
    pub(crate) fd: OwnedFd,
    /// What the previous process had already read from it.
    pub(crate) bytes: Bytes,
}

/// Sorts the stored fds among the passed ones into connections with their bytes; a bad
/// entry is logged and dropped (its names are still returned, to clear them from the store).
pub(crate) fn take_over(stored: Vec<(StoredFd, PassedFd)>) -> (Vec<TakenOver>, Vec<String>) {
    let mut connections = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    let mut names = Vec::new();
    for (kind, fd) in stored {
        let name = fd.name.clone().unwrap_or_default();
        match kind {
            StoredFd::Connection(key) => match fd.into_connection() {
                Ok(owned) => {
                    connections.insert(key, (name, owned));
                }
                Err(e) => {
                    tracing::warn!("{e}");
                    names.push(name);
                }
            },
            StoredFd::Bytes(key) => match fd.into_file().map_err(|e| e.to_string()).and_then(read_bytes) {
                Ok(data) => {
                    bytes.insert(key, (name, data));
                }
                Err(e) => {
                    tracing::warn!("cannot read the bytes of a handed-over connection ({e})");
                    names.push(name);
                }
            },
        }
    }
    let mut taken = Vec::new();
    for (key, (name, fd)) in connections {
        let mut entry = TakenOver { names: vec![name], fd, bytes: Bytes::new() };
        if let Some((bytes_name, data)) = bytes.remove(&key) {
            entry.names.push(bytes_name);
            entry.bytes = data;
        }
        taken.push(entry);
    }
    // Bytes whose connection did not arrive (the store filled up between the two).
    names.extend(bytes.into_values().map(|(name, _)| name));
    (taken, names)
}

fn read_bytes(mut file: File) -> Result<Bytes, String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len > MAX_TAKEN_BYTES {
        return Err(format!("{len} bytes is more than a request head"));
    }
    file.rewind().map_err(|e| e.to_string())?;
    let mut data = Vec::with_capacity(len as usize);
    file.read_to_end(&mut data).map_err(|e| e.to_string())?;
    Ok(data.into())
}

/// Splits the stored fds of ours from the rest of what was passed.
pub(crate) fn split_stored(passed: Vec<PassedFd>) -> (Vec<PassedFd>, Vec<(StoredFd, PassedFd)>) {
    let mut rest = Vec::new();
    let mut stored = Vec::new();
    for fd in passed {
        match fd.name.as_deref().and_then(parse_stored) {
            Some(kind) => stored.push((kind, fd)),
            None => rest.push(fd),
        }
    }
    (rest, stored)
}
