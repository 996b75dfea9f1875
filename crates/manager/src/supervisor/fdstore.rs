//! One instance's file descriptor store, with systemd's semantics
//! (`FILE_DESCRIPTOR_STORE.md`, `sd_notify(3)`): `FDSTORE=1` keeps the fds sent along under
//! `FDNAME=` (default `stored`) up to a cap (`FileDescriptorStoreMax=`), `FDSTOREREMOVE=1`
//! drops every fd of a name, an fd that hangs up (POLLHUP/POLLERR) is dropped unless it was
//! stored with `FDPOLL=0`, the same file is never stored twice, and the next process of
//! the instance gets them all after its listeners in `LISTEN_FDS`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// The name systemd gives fds stored without `FDNAME=`.
pub const DEFAULT_NAME: &str = "stored";

struct Stored {
    fd: OwnedFd,
    name: String,
    poll: bool,
}

/// What [`FdStore::add`] did with the fds it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Added {
    /// Now in the store.
    pub kept: usize,
    /// Closed: the store was full.
    pub over_cap: usize,
    /// Closed: that file was stored already.
    pub duplicates: usize,
}

/// The fds one instance keeps for its next process.
pub struct FdStore {
    max: usize,
    fds: Vec<Stored>,
}

impl FdStore {
    /// An empty store that keeps at most `max` fds (0: none).
    pub fn new(max: usize) -> Self {
        Self { max, fds: Vec::new() }
    }

    /// How many fds it holds.
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Keeps `fds` under `name` (in order), closing those beyond the cap and those already
    /// stored (the same open file, as systemd's `same_fd()`).
    pub fn add(&mut self, fds: Vec<OwnedFd>, name: &str, poll: bool) -> Added {
        let mut added = Added::default();
        for fd in fds {
            if self.fds.iter().any(|s| same_file(&s.fd, &fd)) {
                added.duplicates += 1;
            } else if self.fds.len() >= self.max {
                added.over_cap += 1;
            } else {
                self.fds.push(Stored { fd, name: name.to_owned(), poll });
                added.kept += 1;
            }
        }
        added
    }

    /// Drops (closes) every fd stored under `name`; returns how many.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.fds.len();
        self.fds.retain(|s| s.name != name);
        before - self.fds.len()
    }

    /// Drops every fd; returns how many.
    pub fn clear(&mut self) -> usize {
        let n = self.fds.len();
        self.fds.clear();
        n
    }

    /// Drops the fds that report POLLHUP or POLLERR (or were closed: POLLNVAL), except those
    /// stored with `FDPOLL=0`; returns the names of the dropped ones.
    pub fn drop_hung_up(&mut self) -> Vec<String> {
        let watched: Vec<usize> = (0..self.fds.len()).filter(|&i| self.fds[i].poll).collect();
        if watched.is_empty() {
            return Vec::new();
        }
        let mut polls: Vec<libc::pollfd> =
            watched.iter().map(|&i| libc::pollfd { fd: self.fds[i].fd.as_raw_fd(), events: 0, revents: 0 }).collect();
        // SAFETY: `polls` is a valid array of pollfd for its length; timeout 0 never blocks.
        if unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) } <= 0 {
            return Vec::new();
        }
        let gone = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        let hung: Vec<usize> =
            watched.iter().zip(&polls).filter(|(_, p)| p.revents & gone != 0).map(|(&i, _)| i).collect();
        let mut names = Vec::new();
        for &i in hung.iter().rev() {
            names.push(self.fds.remove(i).name);
        }
        names.reverse();
        names
    }

    /// The stored fds and their names, in the order they were stored.
    pub fn entries(&self) -> Vec<(RawFd, &str)> {
        self.fds.iter().map(|s| (s.fd.as_raw_fd(), s.name.as_str())).collect()
    }
}

/// Whether two fds are the same file (device and inode; for sockets and pipes, the same
/// object).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().unwrap()
    }

    fn names(store: &FdStore) -> Vec<&str> {
        store.entries().into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn the_cap_closes_the_extra_fds() {
        let mut store = FdStore::new(3);
        let pairs: Vec<(UnixStream, UnixStream)> = (0..5).map(|_| UnixStream::pair().unwrap()).collect();
        let fds: Vec<OwnedFd> = pairs.iter().map(|(a, _)| a.try_clone().unwrap().into()).collect();
        assert_eq!(store.add(fds, "x", true), Added { kept: 3, over_cap: 2, duplicates: 0 });
        assert_eq!(names(&store), ["x", "x", "x"]);
        assert_eq!(FdStore::new(0).add(vec![pipe().0], "x", true).over_cap, 1, "0 turns the store off");
    }

    #[test]
    fn the_same_file_is_stored_once() {
        let mut store = FdStore::new(10);
        let (r, _w) = pipe();
        let dup = r.try_clone().unwrap();
        assert_eq!(store.add(vec![r, dup], "a", true), Added { kept: 1, over_cap: 0, duplicates: 1 });
    }

    #[test]
    fn remove_drops_every_fd_of_a_name() {
        let mut store = FdStore::new(10);
        let keep: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| pipe()).collect();
        let fds = |range: std::ops::Range<usize>| range.map(|i| keep[i].0.try_clone().unwrap()).collect::<Vec<_>>();
        store.add(fds(0..2), "a", true);
        store.add(fds(2..3), "b", true);
        assert_eq!(store.remove("a"), 2);
        assert_eq!(store.remove("nothing"), 0);
        assert_eq!(names(&store), ["b"]);
        assert_eq!(store.clear(), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn hung_up_fds_are_dropped_unless_fdpoll_is_off() {
        let mut store = FdStore::new(10);
        let (r1, w1) = pipe();
        let (r2, w2) = pipe();
        let (r3, _w3) = pipe();
        store.add(vec![r1], "hup", true);
        store.add(vec![r2], "nopoll", false);
        store.add(vec![r3], "alive", true);
        assert!(store.drop_hung_up().is_empty(), "nothing hung up yet");
        drop((w1, w2));
        assert_eq!(store.drop_hung_up(), ["hup"]);
        assert_eq!(names(&store), ["nopoll", "alive"]);
        // A socket whose peer is gone reports POLLHUP too.
        let (a, b) = UnixStream::pair().unwrap();
        store.add(vec![a.into()], "sock", true);
        drop(b);
        assert_eq!(store.drop_hung_up(), ["sock"]);
        assert_eq!(store.len(), 2);
    }
}
