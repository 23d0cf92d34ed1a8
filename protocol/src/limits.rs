//! Wire and format limits. Every decoder checks these before it allocates.

/// Largest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most ops in one entry (one batch).
pub const MAX_OPS_PER_ENTRY: usize = 1024;
/// Most versions one op may supersede.
pub const MAX_SUPERSEDES: usize = 1024;
/// Largest canonical encoding of one entry.
pub const MAX_ENTRY_BYTES: usize = 4 * 1024 * 1024;
/// Largest log record payload: an entry plus its optional signature and the array header.
pub const MAX_RECORD_BYTES: usize = MAX_ENTRY_BYTES + 128;
/// Most bytes of one author's unsigned entries that may follow its last signed entry, in any
/// log: the sum of their record payloads (the canonical entry encoding plus
/// [`UNSIGNED_PAYLOAD_OVERHEAD`]). A writer signs an entry before the next one would take its
/// unsigned run past this, and a receiver buffers at most this much of one author while it
/// waits for a signature, so nodes with different batch settings always agree on what a run
/// may hold.
pub const MAX_UNSIGNED_RUN_BYTES: usize = 16 * 1024 * 1024;
/// Bytes a record payload adds to an unsigned entry's canonical encoding: the array header and
/// the `nil` signature.
pub const UNSIGNED_PAYLOAD_OVERHEAD: usize = 2;
/// Largest frame body on a QUIC stream.
pub const MAX_FRAME_BYTES: usize = MAX_ENTRY_BYTES + 64 * 1024;
/// Most requests in flight on one pipeline (`Request::Pipeline`): a node reads no further
/// request from a pipeline until one of these is answered.
pub const MAX_PIPELINED_REQUESTS: usize = 256;
/// Most keys a scan returns in one request.
pub const MAX_SCAN_LIMIT: u32 = 10_000;
/// Most entries a secondary index query returns in one request.
pub const MAX_QUERY_LIMIT: u32 = MAX_SCAN_LIMIT;
/// Most versions a history request returns.
pub const MAX_HISTORY_LIMIT: u32 = 10_000;

const _: () = assert!(MAX_KEY_BYTES + MAX_VALUE_BYTES < MAX_ENTRY_BYTES);
const _: () = assert!(MAX_ENTRY_BYTES < MAX_RECORD_BYTES);
const _: () = assert!(MAX_RECORD_BYTES < MAX_FRAME_BYTES);
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);
const _: () = assert!(MAX_ENTRY_BYTES + UNSIGNED_PAYLOAD_OVERHEAD <= MAX_UNSIGNED_RUN_BYTES);
