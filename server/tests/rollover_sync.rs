//! Segment rollover is crash safe: a new segment is created, synced, and its directory entry
//! made durable with an `fsync` of the log directory before any record is written to it, so an
//! acknowledged batch in a new segment can never be lost with the segment's name. The same
//! holds for the first segment, created when the log is opened.

mod common;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{ChainBuilder, payloads};
use kappakv_server::log::{FsLogDir, LogConfig, LogDir, LogFile, LogStore, OpenMode};

/// What the store asked of the file system, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Create(String),
    SyncAll(String),
    SyncDir,
    Write(String),
    SyncData(String),
}

type Calls = Arc<Mutex<Vec<Call>>>;

/// The real directory, recording every call that changes it.
struct Recording {
    inner: FsLogDir,
    calls: Calls,
}

struct RecordingFile {
    inner: Box<dyn LogFile>,
    name: String,
    calls: Calls,
}

fn record(calls: &Calls, call: Call) {
    calls.lock().unwrap().push(call);
}

impl LogDir for Recording {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }

    fn open(&self, name: &str, mode: OpenMode) -> io::Result<Box<dyn LogFile>> {
        let inner = self.inner.open(name, mode)?;
        if mode == OpenMode::CreateNew {
            record(&self.calls, Call::Create(name.to_string()));
        }
        Ok(Box::new(RecordingFile {
            inner,
            name: name.to_string(),
            calls: self.calls.clone(),
        }))
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()?;
        record(&self.calls, Call::SyncDir);
        Ok(())
    }
}

impl LogFile for RecordingFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        record(&self.calls, Call::Write(self.name.clone()));
        self.inner.write_all_at(buf, offset)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.inner.sync_data()?;
        record(&self.calls, Call::SyncData(self.name.clone()));
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.inner.sync_all()?;
        record(&self.calls, Call::SyncAll(self.name.clone()));
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
}

#[test]
fn a_new_segment_and_its_directory_entry_are_synced_before_it_takes_records() {
    let dir = tempfile::tempdir().unwrap();
    let calls = Calls::default();
    let recording = Arc::new(Recording {
        inner: FsLogDir::new(dir.path()),
        calls: calls.clone(),
    });
    let cfg = LogConfig {
        segment_bytes_max: 1000,
        ..LogConfig::default()
    };
    let (mut store, _) = LogStore::open_in(recording, &cfg).unwrap();
    let mut chain = ChainBuilder::new(1);
    for _ in 0..20 {
        store.append(&payloads(&chain.batch(3, 100))).unwrap();
    }
    let calls = calls.lock().unwrap().clone();
    let created: Vec<String> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Create(name) => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert!(
        created.len() >= 5,
        "the batches filled several segments: {created:?}"
    );
    for name in &created {
        let at = |call: &Call| calls.iter().position(|c| c == call);
        let create = at(&Call::Create(name.clone())).unwrap();
        let synced = at(&Call::SyncAll(name.clone()))
            .unwrap_or_else(|| panic!("{name} was never fsynced after its create: {calls:?}"));
        let dir_synced = calls[synced..]
            .iter()
            .position(|c| *c == Call::SyncDir)
            .map_or_else(
                || panic!("the directory was not fsynced after {name}: {calls:?}"),
                |i| synced + i,
            );
        let first_write = at(&Call::Write(name.clone()))
            .unwrap_or_else(|| panic!("{name} took no record: {calls:?}"));
        assert!(
            create < synced && synced < dir_synced && dir_synced < first_write,
            "{name}: create at {create}, fsync at {synced}, directory fsync at {dir_synced}, first write at {first_write}: {calls:?}"
        );
        // Nothing is written anywhere between the create and the directory fsync.
        assert!(
            !calls[create..dir_synced]
                .iter()
                .any(|c| matches!(c, Call::Write(_))),
            "{calls:?}"
        );
    }
    // Every write is followed by its fdatasync before the next write (one per batch).
    let mut last_write = None;
    for call in &calls {
        match call {
            Call::Write(name) => {
                assert!(last_write.is_none(), "two writes without a sync: {calls:?}");
                last_write = Some(name.clone());
            }
            Call::SyncData(name) => {
                assert_eq!(last_write.take().as_ref(), Some(name), "{calls:?}");
            }
            _ => {}
        }
    }
}
