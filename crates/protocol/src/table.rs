//! What the shared tables ([`crate::balance`], [`crate::metrics`]) have in common: sizing and
//! checking their file, a sealed memfd for a supervisor to pass, and a mapping that a
//! truncated file cannot turn into a crash.
//!
//! A process that touches a page of a shared file mapping past the file's end gets SIGBUS,
//! which kills it. Every worker of an app maps the same tables, so one `truncate` of the file
//! (an operator's mistake, a buggy or hostile process of the same user) would kill them all
//! at once. So: a memfd is sealed against shrinking and growing once sized
//! ([`sealed_memfd`]); a file (under systemd, `/run/sdcluster/APP/*`, which cannot be sealed)
//! is checked at each heartbeat ([`SharedMap::still_mapped`]), and a SIGBUS that still comes
//! in between is caught: the pages of the table are replaced by private zero pages, the
//! faulting access is retried on them, and the table reports itself detached, so that its
//! user stops counting on it (a worker then accepts unbalanced, with a warning).

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Sizes a new (empty) table file to `bytes`, and refuses one that is shorter but not empty:
/// truncated, or not a table of this version; `what` names it in the error.
pub(crate) fn prepare(file: &File, bytes: u64, what: &str) -> io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        file.set_len(bytes)?;
        return Ok(());
    }
    check_len(len, bytes, what)
}

/// An error unless `len` holds a whole table of `bytes`.
pub(crate) fn check_len(len: u64, bytes: u64, what: &str) -> io::Result<()> {
    if len < bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the {what} is {len} bytes, shorter than a table ({bytes} bytes): truncated, or not a {what} of this version"
            ),
        ));
    }
    Ok(())
}

/// A memfd of `bytes` zeroes named `name`, close-on-exec, sealed so that it can neither
/// shrink nor grow (nor be unsealed): no process it is passed to can cut it under the
/// others' mappings.
pub fn sealed_memfd(name: &str, bytes: u64) -> io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let file = File::from(fd);
    file.set_len(bytes)?;
    fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))?;
    Ok(file.into())
}

/// How a [`SharedMap`] maps its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// A file, shared, read and written.
    Write,
    /// A file, shared, read only.
    Read,
    /// Anonymous memory of this process alone.
    Private,
}

/// A table's memory: a shared mapping of a file, guarded against its truncation (see the
/// module's documentation), or private anonymous memory.
pub(crate) struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
    access: Access,
    /// The mapped file, to check its size; `None` for private memory.
    file: Option<File>,
    /// Our entry in [`GUARDED`]; `None` for private memory, or when every entry is taken.
    guard: Option<usize>,
}

// SAFETY: the mapping is plain memory, only ever accessed through atomics; the pointer is
// valid for the life of the value on any thread.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps the first `len` bytes of `file` (whose size the caller checked) with `access`.
    pub(crate) fn file(file: &File, len: usize, access: Access) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let prot =
            if access == Access::Read { nix::libc::PROT_READ } else { nix::libc::PROT_READ | nix::libc::PROT_WRITE };
        let file = file.try_clone()?;
        install_handler();
        // SAFETY: a new mapping at an address the kernel chooses; nothing else is affected.
        let ptr =
            unsafe { nix::libc::mmap(std::ptr::null_mut(), len, prot, nix::libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == nix::libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let guard = register(ptr.as_ptr() as usize, len, access == Access::Write);
        Ok(Self { ptr, len, access, file: Some(file), guard })
    }

    /// `len` bytes of zeroed memory of this process alone.
    pub(crate) fn private(len: usize) -> io::Result<Self> {
        // SAFETY: a new anonymous mapping; nothing else is affected.
        let ptr = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                len,
                nix::libc::PROT_READ | nix::libc::PROT_WRITE,
                nix::libc::MAP_PRIVATE | nix::libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == nix::libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { ptr, len, access: Access::Private, file: None, guard: None })
    }

    /// The first byte; the mapping is page-aligned and [`SharedMap::len`] long.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// How it is mapped.
    pub(crate) fn access(&self) -> Access {
        self.access
    }

    /// Whether the memory is still the shared file's: false once the file was found shorter
    /// than the mapping (it is then detached here, before any access can fault) or a SIGBUS
    /// detached it. A detached table is this process's private zeroes: still safe to touch,
    /// shared with nobody. One `fstat`: meant for a heartbeat, not for every access.
    pub(crate) fn still_mapped(&self) -> bool {
        let Some(file) = &self.file else { return true };
        if self.detached() {
            return false;
        }
        match file.metadata() {
            Ok(meta) if meta.len() < self.len as u64 => {
                // SAFETY: replaces our own mapping, in place, with zeroed private pages.
                unsafe { detach(self.ptr.as_ptr() as usize, self.len, self.access == Access::Write) };
                if let Some(i) = self.guard {
                    GUARDED[i].detached.store(true, Ordering::Release);
                }
                false
            }
            _ => !self.detached(),
        }
    }

    fn detached(&self) -> bool {
        self.guard.is_some_and(|i| GUARDED[i].detached.load(Ordering::Acquire))
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        if let Some(i) = self.guard {
            GUARDED[i].start.store(0, Ordering::Release);
        }
        // SAFETY: our own mapping (the file's or the zero pages that replaced it), which
        // nothing uses after this value is gone.
        unsafe { nix::libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One guarded mapping, as the SIGBUS handler sees it (`start` 0: a free entry).
struct Guarded {
    start: AtomicUsize,
    len: AtomicUsize,
    writable: AtomicBool,
    detached: AtomicBool,
}

/// Mappings a process holds at once: a worker maps two tables (a few more in tests).
const GUARDS: usize = 32;

static GUARDED: [Guarded; GUARDS] = [const {
    Guarded {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        writable: AtomicBool::new(false),
        detached: AtomicBool::new(false),
    }
}; GUARDS];

/// Entries being filled in: taken, `start` not yet published.
static FILLING: [AtomicBool; GUARDS] = [const { AtomicBool::new(false) }; GUARDS];

fn register(start: usize, len: usize, writable: bool) -> Option<usize> {
    for (i, entry) in GUARDED.iter().enumerate() {
        if entry.start.load(Ordering::Acquire) == 0
            && FILLING[i].compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            if entry.start.load(Ordering::Acquire) != 0 {
                FILLING[i].store(false, Ordering::Release);
                continue;
            }
            entry.len.store(len, Ordering::Release);
            entry.writable.store(writable, Ordering::Release);
            entry.detached.store(false, Ordering::Release);
            entry.start.store(start, Ordering::Release);
            FILLING[i].store(false, Ordering::Release);
            return Some(i);
        }
    }
    None
}

/// Replaces `len` bytes at `start` with private zero pages, in place.
///
/// # Safety
///
/// `start..start + len` must be a mapping of this process that nothing but atomics reads.
unsafe fn detach(start: usize, len: usize, writable: bool) -> bool {
    let prot = if writable { nix::libc::PROT_READ | nix::libc::PROT_WRITE } else { nix::libc::PROT_READ };
    // SAFETY: the caller's promise; mmap is async-signal-safe (a system call).
    let ptr = unsafe {
        nix::libc::mmap(
            start as *mut nix::libc::c_void,
            len,
            prot,
            nix::libc::MAP_PRIVATE | nix::libc::MAP_ANONYMOUS | nix::libc::MAP_FIXED,
            -1,
            0,
        )
    };
    ptr != nix::libc::MAP_FAILED
}

/// The SIGBUS action before ours, for faults that are not in a table.
static mut PREVIOUS: std::mem::MaybeUninit<nix::libc::sigaction> = std::mem::MaybeUninit::zeroed();

fn install_handler() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in as the kernel expects; PREVIOUS
        // is written once, here, before the handler that reads it is installed.
        unsafe {
            let mut action: nix::libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = nix::libc::SA_SIGINFO | nix::libc::SA_ONSTACK;
            nix::libc::sigemptyset(&mut action.sa_mask);
            nix::libc::sigaction(nix::libc::SIGBUS, &action, (&raw mut PREVIOUS).cast());
        }
    });
}

/// A SIGBUS in a guarded mapping (its file was truncated under it): detach the mapping and
/// return, so that the access is retried on zero pages. Any other SIGBUS: put the previous
/// action back and let it take its course.
extern "C" fn on_sigbus(signal: nix::libc::c_int, info: *mut nix::libc::siginfo_t, _context: *mut nix::libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; only atomics, mmap,
    // sigaction and raise are used, all async-signal-safe.
    unsafe {
        let addr = (*info).si_addr() as usize;
        if (*info).si_code > 0 {
            for entry in &GUARDED {
                let start = entry.start.load(Ordering::Acquire);
                let len = entry.len.load(Ordering::Acquire);
                if start != 0 && addr >= start && addr < start + len {
                    if detach(start, len, entry.writable.load(Ordering::Acquire)) {
                        entry.detached.store(true, Ordering::Release);
                        return;
                    }
                    break;
                }
            }
        }
        nix::libc::sigaction(signal, (&raw const PREVIOUS).cast(), std::ptr::null_mut());
        if (*info).si_code <= 0 {
            nix::libc::raise(signal); // sent, not a fault: deliver it to the previous action
        }
        // A fault: returning retries the access, which faults again, under the previous action.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_file_is_refused_and_an_empty_one_sized() {
        let file = crate::scratch_file("table-prepare");
        prepare(&file, 8192, "test table").unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8192);
        prepare(&file, 8192, "test table").unwrap();
        file.set_len(100).unwrap();
        let err = prepare(&file, 8192, "test table").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("the test table is 100 bytes, shorter than a table (8192 bytes)"), "{err}");
    }

    #[test]
    fn a_sealed_memfd_cannot_shrink_or_grow() {
        let memfd = File::from(sealed_memfd("sdcluster-test", 8192).unwrap());
        assert_eq!(memfd.metadata().unwrap().len(), 8192);
        assert!(memfd.set_len(0).is_err());
        assert!(memfd.set_len(1 << 20).is_err());
        assert_eq!(memfd.metadata().unwrap().len(), 8192);
    }

    #[test]
    fn a_truncated_file_is_detached_instead_of_faulting() {
        let file = crate::scratch_file("table-truncate");
        prepare(&file, 16384, "test table").unwrap();
        let map = SharedMap::file(&file, 16384, Access::Write).unwrap();
        let word = |i: usize| {
            // SAFETY: within the mapping, aligned to 8; only accessed atomically.
            unsafe { &*map.as_ptr().add(i * 8).cast::<std::sync::atomic::AtomicU64>() }
        };
        word(1000).store(7, Ordering::Relaxed);
        assert!(map.still_mapped());
        file.set_len(0).unwrap();
        // This access faults (the page is past the end of the file): caught, retried on a
        // zero page.
        assert_eq!(word(1000).load(Ordering::Relaxed), 0);
        word(1000).store(8, Ordering::Relaxed);
        assert_eq!(word(1000).load(Ordering::Relaxed), 8);
        assert!(!map.still_mapped());

        // Found at a heartbeat before any access faults.
        let file = crate::scratch_file("table-shrink");
        prepare(&file, 16384, "test table").unwrap();
        let map = SharedMap::file(&file, 16384, Access::Read).unwrap();
        file.set_len(4096).unwrap();
        assert!(!map.still_mapped());
        // SAFETY: within the mapping; read only.
        let last = unsafe { &*map.as_ptr().add(16384 - 8).cast::<std::sync::atomic::AtomicU64>() };
        assert_eq!(last.load(Ordering::Relaxed), 0);
    }
}
