//! A fault-injecting [`LogDir`]: it passes every call to another one, and fails the calls it is
//! told to with EIO or ENOSPC, after a torn write or a lost writeback if asked. Tests drive the
//! store and the node through it, the way redb's fuzzer drives its `StorageBackend`.
//!
//! Calls are counted per [`FaultOp`] from the moment the [`FaultyLogDir`] is made, over every
//! file it opened, so a test can run a workload once to learn how many writes, syncs and
//! creates it makes, then run it again failing each of them in turn.
//!
//! A call can also be held ([`Faults::hold_next`]): it waits, before doing anything, until the
//! test releases it, so a test can look at the node while a batch is written but not yet synced.
//!
//! The log never renames a file: a segment is created under its final name and made durable
//! by `fsync` of the file and of the directory, so [`FaultOp::Create`] and
//! [`FaultOp::DirSync`] are where a rename would be.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::file::{LogDir, LogFile, OpenMode};

/// A kind of call that can be failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// [`LogDir::open`] with [`OpenMode::CreateNew`].
    Create,
    /// [`LogDir::open`] of an existing file.
    Open,
    /// [`LogFile::write_all_at`].
    Write,
    /// [`LogFile::sync_data`] (`fdatasync`).
    SyncData,
    /// [`LogFile::sync_all`] (`fsync`).
    SyncAll,
    /// [`LogDir::sync`] (`fsync` of the directory).
    DirSync,
    /// [`LogFile::set_len`].
    SetLen,
}

impl FaultOp {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultOp; 7] = [
        FaultOp::Create,
        FaultOp::Open,
        FaultOp::Write,
        FaultOp::SyncData,
        FaultOp::SyncAll,
        FaultOp::DirSync,
        FaultOp::SetLen,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// The error a failed call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultError {
    /// `EIO`: the device failed.
    Eio,
    /// `ENOSPC`: the file system is full.
    Enospc,
}

impl FaultError {
    /// The `io::Error` a failed call returns.
    pub fn to_io(self) -> io::Error {
        io::Error::from_raw_os_error(match self {
            FaultError::Eio => libc::EIO,
            FaultError::Enospc => libc::ENOSPC,
        })
    }
}

/// What reaches the file before a failed call returns its error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultEffect {
    /// Nothing: the call fails before doing anything.
    Nothing,
    /// On a write: the first half of the buffer reaches the file (a short write), then the
    /// error. Elsewhere the same as `Nothing`.
    TornWrite,
    /// On a sync: every byte written since the file's last successful sync is lost (the file is
    /// cut back to the length it had then), as when the kernel drops dirty pages whose
    /// writeback failed. Elsewhere the same as `Nothing`.
    LoseUnsynced,
}

/// One call to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The kind of call.
    pub op: FaultOp,
    /// Which one: the `nth` call of that kind since the directory was made, from 1.
    pub nth: u64,
    /// The error it returns.
    pub error: FaultError,
    /// What happens before the error.
    pub effect: FaultEffect,
}

/// The shared state of a [`FaultyLogDir`] and its files: the call counts, the faults to come,
/// the faults that fired, the disk-full switch and the free space it reports.
#[derive(Debug, Default)]
pub struct Faults {
    counts: [AtomicU64; FaultOp::ALL.len()],
    planned: Mutex<Vec<Fault>>,
    fired: Mutex<Vec<Fault>>,
    disk_full: AtomicBool,
    /// The free space the directory reports, instead of its file system's, when set.
    available: Mutex<Option<u64>>,
    /// Every call in order, once [`Faults::start_trace`] was called.
    trace: Mutex<Option<Vec<FaultOp>>>,
    /// Calls to hold, by kind and number, until their [`Hold`] is released.
    holds: Mutex<Vec<(FaultOp, u64, Arc<Hold>)>>,
}

/// A call that [`Faults::hold_next`] stops before it does anything: the calling thread waits
/// in it until [`release`](Self::release).
#[derive(Debug, Default)]
pub struct Hold {
    state: Mutex<HoldState>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum HoldState {
    #[default]
    Armed,
    Reached,
    Released,
}

impl Hold {
    /// Waits up to `timeout` for the held call to be made; whether it was.
    pub fn wait_reached(&self, timeout: Duration) -> bool {
        let state = self.state.lock().expect("hold lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| *s == HoldState::Armed)
            .expect("hold lock");
        *state != HoldState::Armed
    }

    /// Lets the held call go on; if it has not been made yet, it will not wait.
    pub fn release(&self) {
        *self.state.lock().expect("hold lock") = HoldState::Released;
        self.changed.notify_all();
    }

    /// Called by the held call: says it is here, then waits for the release.
    fn arrive(&self) {
        let mut state = self.state.lock().expect("hold lock");
        if *state == HoldState::Armed {
            *state = HoldState::Reached;
            self.changed.notify_all();
        }
        let _released = self
            .changed
            .wait_while(state, |s| *s != HoldState::Released)
            .expect("hold lock");
    }
}

impl Faults {
    /// Fails the call `fault` names, once.
    pub fn inject(&self, fault: Fault) {
        self.planned.lock().expect("faults lock").push(fault);
    }

    /// Fails the next call of kind `op` with `error`, after `effect`.
    pub fn fail_next(&self, op: FaultOp, error: FaultError, effect: FaultEffect) {
        self.inject(Fault {
            op,
            nth: self.count(op) + 1,
            error,
            effect,
        });
    }

    /// Holds the next call of kind `op` before it does anything, until the returned [`Hold`] is
    /// released; then it goes on, failing if a fault names it.
    pub fn hold_next(&self, op: FaultOp) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        self.holds
            .lock()
            .expect("faults lock")
            .push((op, self.count(op) + 1, hold.clone()));
        hold
    }

    /// Calls of kind `op` made so far.
    pub fn count(&self, op: FaultOp) -> u64 {
        self.counts[op.index()].load(Ordering::SeqCst)
    }

    /// The faults that fired so far, in order.
    pub fn fired(&self) -> Vec<Fault> {
        self.fired.lock().expect("faults lock").clone()
    }

    /// Records every call from now on, for [`trace`](Self::trace).
    pub fn start_trace(&self) {
        *self.trace.lock().expect("faults lock") = Some(Vec::new());
    }

    /// The kind of every call since [`start_trace`](Self::start_trace), in order.
    pub fn trace(&self) -> Vec<FaultOp> {
        self.trace
            .lock()
            .expect("faults lock")
            .clone()
            .unwrap_or_default()
    }

    /// While `full`, every write stores the first half of its buffer and fails with ENOSPC, and
    /// every create fails with ENOSPC; syncs and reads still work.
    pub fn set_disk_full(&self, full: bool) {
        self.disk_full.store(full, Ordering::SeqCst);
    }

    /// Makes the directory report `bytes` of free space ([`LogDir::available_space`]) instead of
    /// what its file system has; `None` goes back to the file system's.
    pub fn set_available_space(&self, bytes: Option<u64>) {
        *self.available.lock().expect("faults lock") = bytes;
    }

    /// Counts a call of kind `op`, and returns the fault it must fail with, if any.
    fn call(&self, op: FaultOp) -> Option<Fault> {
        let nth = self.counts[op.index()].fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(trace) = self.trace.lock().expect("faults lock").as_mut() {
            trace.push(op);
        }
        let hold = {
            let mut holds = self.holds.lock().expect("faults lock");
            let at = holds.iter().position(|(o, n, _)| *o == op && *n == nth);
            at.map(|i| holds.swap_remove(i).2)
        };
        if let Some(hold) = hold {
            hold.arrive();
        }
        let fault = {
            let mut planned = self.planned.lock().expect("faults lock");
            let at = planned.iter().position(|f| f.op == op && f.nth == nth);
            at.map(|i| planned.swap_remove(i))
        };
        let fault = fault.or_else(|| {
            (self.disk_full.load(Ordering::SeqCst)
                && matches!(op, FaultOp::Write | FaultOp::Create))
            .then_some(Fault {
                op,
                nth,
                error: FaultError::Enospc,
                effect: FaultEffect::TornWrite,
            })
        });
        if let Some(f) = fault {
            self.fired.lock().expect("faults lock").push(f);
        }
        fault
    }
}

/// A [`LogDir`] that fails the calls its [`Faults`] name and passes every other call on.
pub struct FaultyLogDir {
    inner: Arc<dyn LogDir>,
    faults: Arc<Faults>,
}

impl std::fmt::Debug for FaultyLogDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyLogDir")
            .field("path", &self.inner.path())
            .field("faults", &self.faults)
            .finish()
    }
}

impl FaultyLogDir {
    /// Wraps `inner`, failing nothing until told to.
    pub fn new(inner: Arc<dyn LogDir>) -> Self {
        Self {
            inner,
            faults: Arc::new(Faults::default()),
        }
    }

    /// The counts and faults, shared with every file this directory opened.
    pub fn faults(&self) -> Arc<Faults> {
        self.faults.clone()
    }
}

impl LogDir for FaultyLogDir {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        let op = if mode == OpenMode::CreateNew {
            FaultOp::Create
        } else {
            FaultOp::Open
        };
        if let Some(f) = self.faults.call(op) {
            return Err(f.error.to_io());
        }
        let inner = self.inner.open(name, mode)?;
        let synced_len = inner.len()?;
        Ok(Box::new(FaultyLogFile {
            inner,
            faults: self.faults.clone(),
            synced_len,
        }))
    }

    fn sync(&self) -> io::Result<()> {
        if let Some(f) = self.faults.call(FaultOp::DirSync) {
            return Err(f.error.to_io());
        }
        self.inner.sync()
    }

    fn available_space(&self) -> io::Result<u64> {
        match *self.faults.available.lock().expect("faults lock") {
            Some(bytes) => Ok(bytes),
            None => self.inner.available_space(),
        }
    }
}

/// A file of a [`FaultyLogDir`].
struct FaultyLogFile {
    inner: Box<dyn LogFile>,
    faults: Arc<Faults>,
    /// The length at the last successful sync (or at open): what a lost writeback keeps.
    synced_len: u64,
}

impl FaultyLogFile {
    fn sync(&mut self, op: FaultOp) -> io::Result<()> {
        if let Some(f) = self.faults.call(op) {
            if f.effect == FaultEffect::LoseUnsynced && self.inner.len()? > self.synced_len {
                self.inner.set_len(self.synced_len)?;
            }
            return Err(f.error.to_io());
        }
        match op {
            FaultOp::SyncAll => self.inner.sync_all()?,
            _ => self.inner.sync_data()?,
        }
        self.synced_len = self.inner.len()?;
        Ok(())
    }
}

impl LogFile for FaultyLogFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(f) = self.faults.call(FaultOp::Write) {
            if f.effect == FaultEffect::TornWrite {
                self.inner.write_all_at(&buf[..buf.len() / 2], offset)?;
            }
            return Err(f.error.to_io());
        }
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.sync(FaultOp::SyncData)
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync(FaultOp::SyncAll)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        if let Some(f) = self.faults.call(FaultOp::SetLen) {
            return Err(f.error.to_io());
        }
        self.inner.set_len(len)?;
        self.synced_len = self.synced_len.min(len);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}
