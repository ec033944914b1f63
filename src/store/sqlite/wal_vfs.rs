//! A VFS that hands each commit's WAL frames to the kernel in one write.
//!
//! SQLite writes a commit's frames to the WAL one `pwrite` per frame header
//! (24 bytes) and one per page (4 KiB): ~25 system calls per renewal, each
//! paying the kernel's per-call costs (the inode's times, dirty-page
//! throttling, write checks). This VFS wraps the platform's default one
//! (`unix`) and, for WAL files only, gathers writes that continue one
//! another in memory; they reach the file in one write before anything
//! that must see them: a sync, a read, a write elsewhere, a truncate, the
//! size, a file control, closing. Every other file is the default VFS's
//! own, untouched.
//!
//! Only the writer's connection opens through it, and only with
//! `synchronous = FULL` ([`super::Durability::Full`]): then SQLite syncs
//! the WAL at every commit, after the commit's frames and before it
//! publishes them in the WAL index (`walFrames`), so no other connection
//! (the checkpointer, Validate's readers, another process) can be told of
//! a frame still held here, and a commit is acknowledged only after its
//! frames were written and synced: the durability is SQLite's own. With
//! `NORMAL` a commit publishes frames without a sync, which would let a
//! reader see frames still here; that setting keeps the default VFS.
//!
//! A write error held back until the flush is reported by the call that
//! flushes (for a commit, its sync): SQLite then fails the commit, and the
//! frames it never published are ignored, as after any failed WAL write.

use std::cell::Cell;
use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name the writer opens its connection with.
pub(in crate::store) const NAME: &CStr = c"licensd-wal";

/// The most bytes held before they are written anyway (a commit's frames
/// rarely come near: a batch of 256 renewals writes ~2,000 frames, ~8 MB).
const MAX_HELD: usize = 16 << 20;

/// The most bytes handed to the default VFS in one write: `unix` writes at
/// most 128 KiB - 1 per system call (`seekAndWriteFd` masks the length with
/// 0x1ffff) and takes a write it cut to nothing for a full disk.
const MAX_WRITE: usize = 0x1f000;

thread_local! {
    /// Writes this thread handed to the default VFS for WAL files opened
    /// through this one (tests count them).
    static WAL_WRITES: Cell<u64> = const { Cell::new(0) };
}

/// The VFS registered under [`NAME`], and the default one it wraps.
struct Registered {
    ours: *mut ffi::sqlite3_vfs,
    real: *mut ffi::sqlite3_vfs,
}

// SAFETY: both point at VFS objects that live for the whole process and
// that SQLite itself uses from any thread.
unsafe impl Send for Registered {}
unsafe impl Sync for Registered {}

static REGISTERED: OnceLock<Result<Registered, String>> = OnceLock::new();

/// Registers the VFS (once per process; not as the default).
pub(in crate::store) fn register() -> Result<(), String> {
    REGISTERED
        .get_or_init(|| {
            // SAFETY: sqlite3_vfs_find with a null name returns the default
            // VFS, registered by SQLite's initialisation, which lives as
            // long as the process; the copy made here is leaked, so it does
            // too, as sqlite3_vfs_register requires.
            unsafe {
                if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
                    return Err("SQLite did not initialise".into());
                }
                let real = ffi::sqlite3_vfs_find(std::ptr::null());
                if real.is_null() {
                    return Err("SQLite has no default VFS".into());
                }
                let mut vfs = *real;
                vfs.zName = NAME.as_ptr();
                vfs.pNext = std::ptr::null_mut();
                vfs.szOsFile = (WAL_FILE_SIZE + (*real).szOsFile as usize) as c_int;
                vfs.xOpen = Some(open);
                let ours = Box::into_raw(Box::new(vfs));
                let rc = ffi::sqlite3_vfs_register(ours, 0);
                if rc != ffi::SQLITE_OK {
                    return Err(format!("registering the WAL VFS: SQLite error {rc}"));
                }
                Ok(Registered { ours, real })
            }
        })
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// How many writes to WAL files opened through this VFS this thread made.
#[cfg(test)]
pub(in crate::store) fn wal_writes() -> u64 {
    WAL_WRITES.get()
}

fn count_write() {
    WAL_WRITES.set(WAL_WRITES.get() + 1);
}

/// A WAL file: the default VFS's file (`real`, in the same allocation,
/// after this struct) and the writes held for it.
#[repr(C)]
struct WalFile {
    /// SQLite's part: the methods below.
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    /// Bytes to be written at `start`, in order.
    held: Vec<u8>,
    start: i64,
}

/// [`WalFile`]'s size, rounded up so the default VFS's file after it is
/// aligned for anything.
const WAL_FILE_SIZE: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(Ok(registered)) = REGISTERED.get() else {
        return ffi::SQLITE_ERROR;
    };
    debug_assert_eq!(vfs, registered.ours);
    let real_vfs = registered.real;
    // SAFETY: SQLite gives `file` szOsFile bytes (ours: WalFile's, then
    // the default VFS's), 8-byte aligned; the default VFS's xOpen fills the
    // file it is given and sets its pMethods (null on failure).
    unsafe {
        let real_open = (*real_vfs).xOpen.expect("a VFS has xOpen");
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            // Not a WAL: the default VFS's file, at the start of the space.
            return real_open(real_vfs, name, file, flags, out_flags);
        }
        let real = file
            .cast::<u8>()
            .add(WAL_FILE_SIZE)
            .cast::<ffi::sqlite3_file>();
        let rc = real_open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK {
            (*file).pMethods = std::ptr::null();
            return rc;
        }
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file {
                pMethods: wal_methods((*real).pMethods),
            },
            real,
            held: Vec::new(),
            start: 0,
        });
        rc
    }
}

/// The methods of a WAL file: the default VFS's (`real`, of the same
/// version), with the ones below in front.
fn wal_methods(real: *const ffi::sqlite3_io_methods) -> *const ffi::sqlite3_io_methods {
    static METHODS: OnceLock<Methods> = OnceLock::new();
    struct Methods(ffi::sqlite3_io_methods);
    // SAFETY: plain function pointers and an integer.
    unsafe impl Send for Methods {}
    unsafe impl Sync for Methods {}
    &METHODS
        .get_or_init(|| {
            // SAFETY: the default VFS's methods live for the process.
            let real = unsafe { &*real };
            Methods(ffi::sqlite3_io_methods {
                iVersion: real.iVersion,
                xClose: Some(close),
                xRead: Some(read),
                xWrite: Some(write),
                xTruncate: Some(truncate),
                xSync: Some(sync),
                xFileSize: Some(file_size),
                xLock: Some(lock),
                xUnlock: Some(unlock),
                xCheckReservedLock: Some(check_reserved_lock),
                xFileControl: Some(file_control),
                xSectorSize: Some(sector_size),
                xDeviceCharacteristics: Some(device_characteristics),
                xShmMap: real.xShmMap.map(|_| shm_map as _),
                xShmLock: real.xShmLock.map(|_| shm_lock as _),
                xShmBarrier: real.xShmBarrier.map(|_| shm_barrier as _),
                xShmUnmap: real.xShmUnmap.map(|_| shm_unmap as _),
                xFetch: real.xFetch.map(|_| fetch as _),
                xUnfetch: real.xUnfetch.map(|_| unfetch as _),
            })
        })
        .0
}

/// The WAL file behind `file`, and the default VFS's methods for it.
///
/// # Safety
/// `file` was opened by [`open`] as a WAL and not yet closed.
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (
    &'a mut WalFile,
    *mut ffi::sqlite3_file,
    &'a ffi::sqlite3_io_methods,
) {
    // SAFETY: as the caller promises; the real file's methods were set by
    // the default VFS's xOpen and live for the process.
    unsafe {
        let wal = &mut *file.cast::<WalFile>();
        let real = wal.real;
        (wal, real, &*(*real).pMethods)
    }
}

impl WalFile {
    /// Writes what is held, whatever that returns.
    ///
    /// # Safety
    /// `real` and `methods` are this file's.
    unsafe fn flush(
        &mut self,
        real: *mut ffi::sqlite3_file,
        methods: &ffi::sqlite3_io_methods,
    ) -> c_int {
        let write = methods.xWrite.expect("a file has xWrite");
        let mut rc = ffi::SQLITE_OK;
        let mut at = self.start;
        for chunk in self.held.chunks(MAX_WRITE) {
            count_write();
            // SAFETY: `chunk` is readable and shorter than c_int's range;
            // `real` is open.
            rc = unsafe { write(real, chunk.as_ptr().cast(), chunk.len() as c_int, at) };
            if rc != ffi::SQLITE_OK {
                break;
            }
            at += chunk.len() as i64;
        }
        self.held.clear();
        rc
    }
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite closes a file it opened once; the WalFile is dropped
    // in place here and its pMethods cleared, so nothing calls it again.
    unsafe {
        let (wal, real, methods) = parts(file);
        let flushed = wal.flush(real, methods);
        let closed = (methods.xClose.expect("a file has xClose"))(real);
        std::ptr::drop_in_place(file.cast::<WalFile>());
        (*file).pMethods = std::ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: a WAL file of ours; `buf` is `amount` bytes SQLite gave.
    unsafe {
        let (wal, real, methods) = parts(file);
        let Ok(len) = usize::try_from(amount) else {
            return ffi::SQLITE_IOERR_WRITE;
        };
        let continues = !wal.held.is_empty() && offset == wal.start + wal.held.len() as i64;
        if !continues || wal.held.len() + len > MAX_HELD {
            let rc = wal.flush(real, methods);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
        }
        if wal.held.is_empty() {
            wal.start = offset;
        }
        wal.held
            .extend_from_slice(std::slice::from_raw_parts(buf.cast::<u8>(), len));
        ffi::SQLITE_OK
    }
}

/// Defines a method that calls the default VFS's method of the same name
/// with the same arguments; `flush`: after writing what is held (for the
/// methods that read, sync, size or change the file), `pass`: at once
/// (locks and shared memory, which nothing held concerns).
macro_rules! forward {
    ($name:ident, $method:ident, $when:ident, ($($arg:ident: $ty:ty),*)) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: a WAL file of ours; the arguments as SQLite gave them.
            unsafe {
                let (wal, real, methods) = parts(file);
                if forward!(@flushes $when) {
                    let rc = wal.flush(real, methods);
                    if rc != ffi::SQLITE_OK {
                        return rc;
                    }
                }
                (methods.$method.expect(concat!("a file has ", stringify!($method))))(real $(, $arg)*)
            }
        }
    };
    (@flushes flush) => { true };
    (@flushes pass) => { false };
}

forward!(read, xRead, flush, (buf: *mut c_void, amount: c_int, offset: i64));
forward!(truncate, xTruncate, flush, (size: i64));
forward!(sync, xSync, flush, (flags: c_int));
forward!(file_size, xFileSize, flush, (size: *mut i64));
forward!(file_control, xFileControl, flush, (op: c_int, arg: *mut c_void));
forward!(fetch, xFetch, flush, (offset: i64, amount: c_int, out: *mut *mut c_void));
forward!(lock, xLock, pass, (level: c_int));
forward!(unlock, xUnlock, pass, (level: c_int));
forward!(check_reserved_lock, xCheckReservedLock, pass, (out: *mut c_int));
forward!(sector_size, xSectorSize, pass, ());
forward!(device_characteristics, xDeviceCharacteristics, pass, ());
forward!(shm_map, xShmMap, pass, (region: c_int, size: c_int, extend: c_int, out: *mut *mut c_void));
forward!(shm_lock, xShmLock, pass, (offset: c_int, n: c_int, flags: c_int));
forward!(shm_unmap, xShmUnmap, pass, (delete: c_int));
forward!(unfetch, xUnfetch, pass, (offset: i64, page: *mut c_void));

unsafe extern "C" fn shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: a WAL file of ours.
    unsafe {
        let (_, real, methods) = parts(file);
        (methods
            .xShmBarrier
            .expect("checked when the methods were made"))(real)
    }
}

#[cfg(test)]
mod tests;
