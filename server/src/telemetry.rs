//! Every metric the node emits, named in one place.
//!
//! The crate only emits, through the `metrics` facade: without an installed recorder (the
//! library, tests) every call here is a no-op. `main.rs` installs the Prometheus recorder,
//! with the histogram buckets below, when the admin listener is on; `/metrics` renders it.
//!
//! Values that the node already keeps (LSNs, log size, per-view checkpoints, peer counters)
//! are not counted on the hot path but read when `/metrics` is scraped, by [`refresh`].

use std::time::{Duration, Instant};

use kappakv_protocol::{ErrorCode, Lsn, NodeId};
use metrics::{counter, gauge, histogram};

use crate::log::LogDir as _;
use crate::node::Node;

/// Requests served, by `type` and `outcome` (`ok` or the error code).
pub const REQUESTS: &str = "kappakv_requests_total";
/// Time from a request's decoding to its reply, by `type`.
pub const REQUEST_SECONDS: &str = "kappakv_request_duration_seconds";
/// Requests answered `Busy` at once because the node was at capacity.
pub const REQUESTS_SHED: &str = "kappakv_requests_shed_total";
/// Local writes made durable and acknowledged.
pub const WRITES_ACKNOWLEDGED: &str = "kappakv_writes_acknowledged_total";
/// Writes answered with an earlier write of the same request id (a client's repeat after a
/// lost answer), instead of being written again.
pub const WRITES_REPEATED: &str = "kappakv_writes_repeated_total";
/// Entries appended to the log, by `origin` (`local` or `remote`).
pub const ENTRIES_APPENDED: &str = "kappakv_log_entries_appended_total";
/// Entries per group commit.
pub const GROUP_COMMIT_ENTRIES: &str = "kappakv_group_commit_entries";
/// Time of the `fdatasync` of one group commit.
pub const FSYNC_SECONDS: &str = "kappakv_log_fsync_duration_seconds";
/// Batches the log refused, by `kind`: `disk_full` (the writes were refused and the node goes
/// on) or `fatal` (a failed write or `fsync`: the node takes no more writes until restarted).
pub const LOG_WRITE_FAILURES: &str = "kappakv_log_write_failures_total";
/// Each time the writer waited for the views before its next batch, because the log was too
/// far ahead of them (back-pressure that bounds the memory of writes the views have not
/// applied), how long.
pub const WRITER_HELD_SECONDS: &str = "kappakv_writer_held_for_views_seconds";
/// 1 while the log takes writes; 0 once it failed and the node must be restarted.
pub const LOG_WRITABLE: &str = "kappakv_log_writable";
/// 1 while the indexer runs; 0 once it stopped after an error (the node takes no writes and
/// must be restarted).
pub const INDEXER_RUNNING: &str = "kappakv_indexer_running";
/// Bytes free to the node on the file system of its data dir (the least of the data dir's and
/// the log directory's), which writes keep above `disk_reserve_bytes`.
pub const DISK_AVAILABLE: &str = "kappakv_disk_available_bytes";
/// Bytes in the log's segment files.
pub const LOG_BYTES: &str = "kappakv_log_bytes";
/// Segment files in the log.
pub const LOG_SEGMENTS: &str = "kappakv_log_segments";
/// LSN of the last durable record.
pub const LOG_DURABLE_LSN: &str = "kappakv_log_durable_lsn";
/// LSN every view has applied (what reads wait for).
pub const INDEXED_LSN: &str = "kappakv_indexed_lsn";
/// LSN a view has applied, by `view`.
pub const VIEW_APPLIED_LSN: &str = "kappakv_view_applied_lsn";
/// Entries a view is behind the durable log, by `view`.
pub const VIEW_LAG: &str = "kappakv_view_lag_entries";
/// 1 while the views are being rebuilt or caught up at start (the node does not serve yet).
pub const REBUILDING: &str = "kappakv_index_rebuilding";
/// Fraction of the start-up rebuild or catch-up done, 0 to 1.
pub const REBUILD_PROGRESS: &str = "kappakv_index_rebuild_progress_ratio";
/// Entries the start-up rebuild or catch-up still has to apply.
pub const REBUILD_REMAINING: &str = "kappakv_index_rebuild_remaining_entries";
/// 1 while a peer is connected, by `peer`.
pub const PEER_CONNECTED: &str = "kappakv_peer_connected";
/// Entries sent to a peer, by `peer`.
pub const PEER_SENT: &str = "kappakv_peer_entries_sent_total";
/// Entries read from the log to send to a peer, sent or not, by `peer`.
pub const PEER_READ: &str = "kappakv_peer_entries_read_total";
/// Entries received from a peer and appended, by `peer`.
pub const PEER_RECEIVED: &str = "kappakv_peer_entries_received_total";
/// Entries this node has that a peer lacks, as last known, by `peer`.
pub const PEER_THEY_LACK: &str = "kappakv_peer_they_lack_entries";
/// Entries a peer has that this node lacks, as last known, by `peer`.
pub const PEER_WE_LACK: &str = "kappakv_peer_we_lack_entries";
/// Sessions established with a peer (the first connection and every reconnection), by `peer`.
pub const PEER_CONNECTS: &str = "kappakv_peer_connects_total";
/// Entries refused from peers, by `reason`.
pub const PEER_REJECTED: &str = "kappakv_peer_rejected_entries_total";
/// Equivocations detected: two different entries for one (author, seq).
pub const EQUIVOCATIONS: &str = "kappakv_equivocations_total";
/// Snapshots refused: a peer's snapshot that its own rows, or this node's replay of the log
/// behind it, did not bear out.
pub const SNAPSHOTS_REFUSED: &str = "kappakv_snapshots_refused_total";
/// Open QUIC connections (clients and peers).
pub const CONNECTIONS_OPEN: &str = "kappakv_connections_open";
/// Connections refused at the connection limit.
pub const CONNECTIONS_REFUSED: &str = "kappakv_connections_refused_total";
/// Open client request streams (watches included).
pub const STREAMS_OPEN: &str = "kappakv_streams_open";
/// Gauge: open pipelines (long-lived client streams of many requests).
pub const PIPELINES_OPEN: &str = "kappakv_pipelines_open";
/// Always 1, with the `version` label.
pub const BUILD_INFO: &str = "kappakv_build_info";

/// Buckets of the latency histograms, in seconds: 50 µs to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Buckets of the group-commit size histogram, in entries.
pub const ENTRIES_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Describes every metric to the installed recorder (for `# HELP` lines).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(REQUESTS, "Requests served, by type and outcome");
    describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Request latency, by type"
    );
    describe_counter!(REQUESTS_SHED, "Requests answered Busy at capacity");
    describe_counter!(WRITES_ACKNOWLEDGED, "Local writes durable and acknowledged");
    describe_counter!(
        WRITES_REPEATED,
        "Repeated writes answered with the earlier write of their request id"
    );
    describe_counter!(ENTRIES_APPENDED, "Log entries appended, by origin");
    describe_histogram!(GROUP_COMMIT_ENTRIES, "Entries per group commit");
    describe_histogram!(
        FSYNC_SECONDS,
        metrics::Unit::Seconds,
        "fdatasync time per group commit"
    );
    describe_counter!(
        LOG_WRITE_FAILURES,
        "Batches the log refused, by kind (disk_full or fatal)"
    );
    describe_histogram!(
        WRITER_HELD_SECONDS,
        metrics::Unit::Seconds,
        "Waits of the writer for the views to catch up with the log"
    );
    describe_gauge!(
        LOG_WRITABLE,
        "1 while the log takes writes, 0 once it failed (restart the node)"
    );
    describe_gauge!(
        INDEXER_RUNNING,
        "1 while the indexer runs, 0 once it stopped after an error (restart the node)"
    );
    describe_gauge!(
        DISK_AVAILABLE,
        metrics::Unit::Bytes,
        "Bytes free on the data dir's file system; writes keep it above disk_reserve_bytes"
    );
    describe_gauge!(LOG_BYTES, metrics::Unit::Bytes, "Bytes in log segments");
    describe_gauge!(LOG_SEGMENTS, "Log segment files");
    describe_gauge!(LOG_DURABLE_LSN, "LSN of the last durable log record");
    describe_gauge!(INDEXED_LSN, "LSN applied by every view");
    describe_gauge!(VIEW_APPLIED_LSN, "LSN applied, by view");
    describe_gauge!(VIEW_LAG, "Entries behind the durable log, by view");
    describe_gauge!(REBUILDING, "1 while views are rebuilt at start");
    describe_gauge!(REBUILD_PROGRESS, "Fraction of the start-up rebuild done");
    describe_gauge!(REBUILD_REMAINING, "Entries the start-up rebuild has left");
    describe_gauge!(PEER_CONNECTED, "1 while the peer is connected");
    describe_counter!(PEER_SENT, "Entries sent to the peer");
    describe_counter!(PEER_RECEIVED, "Entries received from the peer");
    describe_counter!(
        PEER_READ,
        "Entries read from the log to send to the peer, sent or not"
    );
    describe_gauge!(PEER_THEY_LACK, "Entries the peer lacks");
    describe_gauge!(PEER_WE_LACK, "Entries this node lacks from the peer");
    describe_counter!(PEER_CONNECTS, "Sessions established with the peer");
    describe_counter!(PEER_REJECTED, "Entries refused from peers, by reason");
    describe_counter!(EQUIVOCATIONS, "Equivocations detected");
    describe_counter!(
        SNAPSHOTS_REFUSED,
        "Peer snapshots refused as differing from the log behind them, by peer"
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open QUIC connections");
    describe_counter!(CONNECTIONS_REFUSED, "Connections refused at the limit");
    describe_gauge!(STREAMS_OPEN, "Open client request streams");
    describe_gauge!(
        PIPELINES_OPEN,
        "Open client pipelines (streams carrying many requests)"
    );
    describe_gauge!(BUILD_INFO, "Build information");
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The label of an error code.
pub fn outcome(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Malformed => "malformed",
        ErrorCode::UnknownRequest => "unknown_request",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::Busy => "busy",
        ErrorCode::Timeout => "timeout",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::SlowConsumer => "slow_consumer",
        ErrorCode::ShuttingDown => "shutting_down",
        ErrorCode::Internal => "internal",
        ErrorCode::IndexBuilding => "index_building",
        ErrorCode::Conflict => "conflict",
        _ => "other",
    }
}

/// One request of `kind` was answered with `outcome` after `elapsed`.
pub fn request(kind: &'static str, outcome: &'static str, elapsed: Duration) {
    counter!(REQUESTS, "type" => kind, "outcome" => outcome).increment(1);
    histogram!(REQUEST_SECONDS, "type" => kind).record(elapsed.as_secs_f64());
    if outcome == "busy" {
        counter!(REQUESTS_SHED).increment(1);
    }
}

/// A group commit made `local` local and `remote` remote entries durable.
pub fn group_commit(local: u64, remote: u64) {
    counter!(WRITES_ACKNOWLEDGED).increment(local);
    counter!(ENTRIES_APPENDED, "origin" => "local").increment(local);
    counter!(ENTRIES_APPENDED, "origin" => "remote").increment(remote);
    histogram!(GROUP_COMMIT_ENTRIES).record((local + remote) as f64);
}

/// A repeated write was answered with the earlier write of its request id.
pub fn write_repeated() {
    counter!(WRITES_REPEATED).increment(1);
}

/// The log refused a batch: `kind` is `disk_full` or `fatal`.
pub fn log_write_failed(kind: &'static str) {
    counter!(LOG_WRITE_FAILURES, "kind" => kind).increment(1);
}

/// The writer waited `held` for the views before a batch.
pub fn writer_held(held: Duration) {
    histogram!(WRITER_HELD_SECONDS).record(held.as_secs_f64());
}

/// One `fdatasync` of the log, started at `started`.
pub fn fsync(started: Instant) {
    histogram!(FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
}

/// The send loop to `peer` read `n` entries from the log.
pub fn peer_entries_read(peer: &NodeId, n: u64) {
    counter!(PEER_READ, "peer" => peer.to_string()).increment(n);
}

/// A session with `peer` was established.
pub fn peer_connected(peer: &NodeId) {
    counter!(PEER_CONNECTS, "peer" => peer.to_string()).increment(1);
}

/// A snapshot from `peer` was refused.
pub fn snapshot_refused(peer: &NodeId) {
    counter!(SNAPSHOTS_REFUSED, "peer" => peer.to_string()).increment(1);
}

/// A connection was refused at the connection limit.
pub fn connection_refused() {
    counter!(CONNECTIONS_REFUSED).increment(1);
}

/// Start-up catch-up progress: started after `from`, at `at`, to reach `upto`.
pub fn catch_up(from: Lsn, at: Lsn, upto: Lsn) {
    let total = upto.saturating_sub(from);
    let done = at.saturating_sub(from);
    gauge!(REBUILDING).set(1.0);
    gauge!(REBUILD_REMAINING).set(total.saturating_sub(done) as f64);
    gauge!(REBUILD_PROGRESS).set(if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    });
}

/// The start-up catch-up is over.
pub fn catch_up_done() {
    gauge!(REBUILDING).set(0.0);
    gauge!(REBUILD_REMAINING).set(0.0);
    gauge!(REBUILD_PROGRESS).set(1.0);
}

/// Counts one open connection or stream for as long as it lives.
#[derive(Debug)]
pub struct OpenGuard(&'static str);

impl OpenGuard {
    /// A connection is open.
    pub fn connection() -> Self {
        gauge!(CONNECTIONS_OPEN).increment(1.0);
        Self(CONNECTIONS_OPEN)
    }

    /// A client stream is open.
    pub fn stream() -> Self {
        gauge!(STREAMS_OPEN).increment(1.0);
        Self(STREAMS_OPEN)
    }

    /// A client stream became a pipeline.
    pub fn pipeline() -> Self {
        gauge!(PIPELINES_OPEN).increment(1.0);
        Self(PIPELINES_OPEN)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// Sets the gauges and counters read from the node's own state: LSNs, log size, per-view
/// applied LSN and lag, peers. Blocking (it lists the log directory): run it off the runtime's
/// workers.
pub fn refresh(node: &Node) {
    let durable = *node.durable.borrow();
    gauge!(LOG_DURABLE_LSN).set(durable as f64);
    gauge!(LOG_WRITABLE).set(if node.writer.is_stopped() { 0.0 } else { 1.0 });
    gauge!(INDEXED_LSN).set(*node.indexed.borrow() as f64);
    gauge!(INDEXER_RUNNING).set(if node.indexer_failure().is_some() {
        0.0
    } else {
        1.0
    });
    if let Ok(available) = crate::log::FsLogDir::new(node.data_dir.log()).available_space() {
        gauge!(DISK_AVAILABLE).set(available as f64);
    }
    let (bytes, segments) = log_size(&node.data_dir.log());
    gauge!(LOG_BYTES).set(bytes as f64);
    gauge!(LOG_SEGMENTS).set(segments as f64);
    for (view, lsn) in node.view_lsns() {
        gauge!(VIEW_APPLIED_LSN, "view" => view.clone()).set(lsn as f64);
        gauge!(VIEW_LAG, "view" => view).set(durable.saturating_sub(lsn) as f64);
    }
    if let Some(replication) = node.replication() {
        for p in replication.status() {
            let peer = p.node_id.to_string();
            gauge!(PEER_CONNECTED, "peer" => peer.clone()).set(f64::from(u8::from(p.connected)));
            counter!(PEER_SENT, "peer" => peer.clone()).absolute(p.sent);
            counter!(PEER_RECEIVED, "peer" => peer.clone()).absolute(p.received);
            gauge!(PEER_THEY_LACK, "peer" => peer.clone()).set(p.they_lack as f64);
            gauge!(PEER_WE_LACK, "peer" => peer).set(p.we_lack as f64);
        }
        for (reason, n) in replication.rejected() {
            counter!(PEER_REJECTED, "reason" => reason).absolute(n);
        }
        counter!(EQUIVOCATIONS).absolute(replication.equivocations());
    }
}

/// Bytes and number of the segment files in `log_dir`.
fn log_size(log_dir: &std::path::Path) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir(log_dir) else {
        return (0, 0);
    };
    let mut bytes = 0;
    let mut segments = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        if crate::log::segment::parse_segment_name(&name.to_string_lossy()).is_some() {
            segments += 1;
            bytes += entry.metadata().map_or(0, |m| m.len());
        }
    }
    (bytes, segments)
}
