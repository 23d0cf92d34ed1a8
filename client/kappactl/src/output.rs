//! Rendering results: the JSON shapes scripts rely on (DESIGN.md "Machine-readable output") and
//! the human form, which never writes raw binary to a terminal.

use std::fmt::Write as _;

use data_encoding::BASE64;
use kappakv_client::{
    BootstrapStatus, Change, Context, GetResult, KeyVersions, NodeId, PeerStatus, Status,
    Timestamp, Version,
};
use serde_json::{Value, json};

/// Bytes as JSON: a string when valid UTF-8, else `{"base64": "..."}`.
pub(crate) fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => json!({ "base64": BASE64.encode(bytes) }),
    }
}

fn version_json(v: &Version) -> Value {
    json!({
        "id": v.id.to_hex(),
        "value": v.value.as_deref().map_or(Value::Null, bytes_json),
        "author": v.author.to_hex(),
        "timestamp": time_human(v.timestamp),
        "hlc": v.timestamp.0,
    })
}

/// `get --json`, and each line of `scan --json`.
pub(crate) fn key_versions_json(key: &[u8], values: &[Version], context: &Context) -> Value {
    json!({
        "key": bytes_json(key),
        "values": values.iter().map(version_json).collect::<Vec<_>>(),
        "context": context.to_string(),
    })
}

pub(crate) fn get_json(got: &GetResult) -> Value {
    key_versions_json(&got.key, &got.values, &got.context)
}

pub(crate) fn scan_json(kv: &KeyVersions) -> Value {
    key_versions_json(&kv.key, &kv.values, &Context(kv.context.clone()))
}

pub(crate) fn history_json(key: &[u8], versions: &[Version]) -> Value {
    json!({
        "key": bytes_json(key),
        "versions": versions.iter().map(version_json).collect::<Vec<_>>(),
    })
}

pub(crate) fn change_json(c: &Change) -> Value {
    json!({
        "lsn": c.lsn,
        "key": bytes_json(&c.key),
        "id": c.version.id.to_hex(),
        "value": c.version.value.as_deref().map_or(Value::Null, bytes_json),
        "author": c.version.author.to_hex(),
        "timestamp": time_human(c.version.timestamp),
        "hlc": c.version.timestamp.0,
        "supersedes": Context(c.supersedes.clone()).to_string(),
    })
}

fn peer_json(p: &PeerStatus) -> Value {
    json!({
        "node_id": p.node_id.to_hex(),
        "addr": p.addr,
        "connected": p.connected,
        "since_ms": p.since_ms,
        "sent": p.sent,
        "received": p.received,
        "they_lack": p.they_lack,
        "we_lack": p.we_lack,
        "origin": p.origin.as_str(),
    })
}

pub(crate) fn peers_json(peers: &[PeerStatus]) -> Value {
    Value::Array(peers.iter().map(peer_json).collect())
}

fn version_vector_json(vv: &[(NodeId, u64)]) -> Value {
    Value::Object(
        vv.iter()
            .map(|(node, seq)| (node.to_hex(), json!(seq)))
            .collect(),
    )
}

fn bootstrap_json(b: &BootstrapStatus) -> Value {
    json!({
        "peer": b.peer.to_hex(),
        "version_vector": version_vector_json(&b.version_vector),
        "state_root": b.state_root.to_hex(),
        "serving_snapshot": b.serving_snapshot,
        "verified": b.verified,
        "refused": b.refused,
    })
}

pub(crate) fn status_json(s: &Status) -> Value {
    let vv = version_vector_json(&s.version_vector);
    json!({
        "node_id": s.node_id.map(|n| n.to_hex()),
        "version": s.version,
        "log_lsn": s.log_lsn,
        "indexed_lsn": s.indexed_lsn,
        "writable": s.writable,
        "equivocations": s.equivocations,
        "state_root": s.state_root.map(|r| r.to_hex()),
        "version_vector": vv,
        "bootstrap": s.bootstrap.as_ref().map(bootstrap_json),
        "peers": peers_json(&s.peers),
        "indexes": s.indexes.iter().map(|i| json!({
            "name": i.name,
            "kind": i.kind,
            "applied_lsn": i.applied_lsn,
            "building": i.building,
            "documents": i.documents,
            "postings": i.postings,
            "skipped": i.skipped,
        })).collect::<Vec<_>>(),
    })
}

/// Bytes for a human: UTF-8 text as is, with control characters escaped; anything else as
/// `base64:…`, so a terminal never receives raw binary.
pub(crate) fn bytes_human(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if s.chars().any(char::is_control) => {
            s.chars()
                .fold(String::with_capacity(s.len()), |mut out, c| {
                    if c.is_control() {
                        let _ = write!(out, "{}", c.escape_default());
                    } else {
                        out.push(c);
                    }
                    out
                })
        }
        Ok(s) => s.to_string(),
        Err(_) => format!("base64:{}", BASE64.encode(bytes)),
    }
}

fn value_human(v: &Version) -> String {
    v.value
        .as_deref()
        .map_or_else(|| "(deleted)".to_string(), bytes_human)
}

/// A hybrid-clock timestamp as an RFC 3339 UTC date and time with milliseconds (the clock's
/// counter, which orders writes within one millisecond, is the raw value's: `hlc` in JSON).
pub(crate) fn time_human(ts: Timestamp) -> String {
    let millis = ts.millis();
    let secs = millis / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(i64::MAX));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        millis % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `get` for a human: the value (or every sibling with its id), then the context to paste into
/// `--supersedes`.
pub(crate) fn get_human(got: &GetResult) -> String {
    let mut out = String::new();
    match got.values.as_slice() {
        [] => {}
        [only] => {
            let _ = writeln!(out, "{}", value_human(only));
        }
        many => {
            let _ = writeln!(
                out,
                "{} concurrent values; pass the context to `put --supersedes` to merge them:",
                many.len()
            );
            for v in many {
                let _ = writeln!(
                    out,
                    "  id {}  by {}  at {}\n    {}",
                    v.id,
                    v.author.short(),
                    time_human(v.timestamp),
                    value_human(v)
                );
            }
        }
    }
    if !got.context.0.is_empty() {
        let _ = writeln!(out, "context: {}", got.context);
    }
    out
}

/// One key of a query for a human, as [`scan_human`] shows it; a near query's distance first,
/// `DISTANCE m<TAB>`.
pub(crate) fn query_human(got: &GetResult, distance_m: Option<f64>) -> String {
    let shown = scan_human(&KeyVersions {
        key: got.key.clone(),
        values: got.values.clone(),
        context: got.context.0.clone(),
    });
    let Some(d) = distance_m else {
        return shown;
    };
    let mut out = String::new();
    for line in shown.lines() {
        let _ = writeln!(out, "{d:.3} m\t{line}");
    }
    out
}

/// One key of a query as JSON: [`get_json`]'s object, with `"distance_m"` for a near query.
pub(crate) fn query_json(got: &GetResult, distance_m: Option<f64>) -> Value {
    let mut v = get_json(got);
    if let (Some(d), Value::Object(map)) = (distance_m, &mut v) {
        map.insert("distance_m".into(), json!(d));
    }
    v
}

/// One key of a scan for a human: `KEY<TAB>VALUE`, one line per sibling.
pub(crate) fn scan_human(kv: &KeyVersions) -> String {
    let key = bytes_human(&kv.key);
    let mut out = String::new();
    let n = kv.values.len();
    for (i, v) in kv.values.iter().enumerate() {
        if n > 1 {
            let _ = writeln!(out, "{key}\t({}/{n}) {}", i + 1, value_human(v));
        } else {
            let _ = writeln!(out, "{key}\t{}", value_human(v));
        }
    }
    out
}

pub(crate) fn history_human(versions: &[Version]) -> String {
    let mut out = String::new();
    for v in versions {
        let _ = writeln!(
            out,
            "{}  {}  by {}  {}",
            time_human(v.timestamp),
            v.id,
            v.author.short(),
            value_human(v)
        );
    }
    out
}

pub(crate) fn change_human(c: &Change) -> String {
    format!(
        "{}\t{}\t{}",
        c.lsn,
        bytes_human(&c.key),
        value_human(&c.version)
    )
}

pub(crate) fn peers_human(peers: &[PeerStatus]) -> String {
    if peers.is_empty() {
        return "no peers\n".to_string();
    }
    let mut out = String::new();
    for p in peers {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}  sent {}  received {}  they lack {}  we lack {}",
            p.node_id,
            p.addr.as_deref().unwrap_or("-"),
            p.origin.as_str(),
            if p.connected {
                "connected"
            } else {
                "disconnected"
            },
            p.sent,
            p.received,
            p.they_lack,
            p.we_lack
        );
    }
    out
}

pub(crate) fn status_human(s: &Status) -> String {
    let mut out = String::new();
    let node = s.node_id.map_or_else(|| "?".to_string(), |n| n.to_hex());
    let _ = writeln!(out, "node         {node}");
    if !s.version.is_empty() {
        let _ = writeln!(out, "version      {}", s.version);
    }
    let _ = writeln!(out, "log lsn      {}", s.log_lsn);
    let _ = writeln!(out, "indexed lsn  {}", s.indexed_lsn);
    if let Some(root) = s.state_root {
        let _ = writeln!(out, "state root   {root}");
    }
    if let Some(b) = &s.bootstrap {
        let state = match (b.verified, b.refused, b.serving_snapshot) {
            (true, _, _) => "verified: the log behind it gives the same state",
            (_, true, _) => {
                "REFUSED: the log behind it gives another state; serving what the log proves"
            }
            (_, _, true) => {
                "not verified yet: reads come from the snapshot while the log behind it replays"
            }
            _ => "not verified yet",
        };
        let at: u64 = b.version_vector.iter().map(|(_, seq)| seq).sum();
        let _ = writeln!(
            out,
            "bootstrap    snapshot from {} at {at} entries, {state}",
            b.peer
        );
    }
    let _ = writeln!(
        out,
        "writable     {}",
        if s.writable { "yes" } else { "no" }
    );
    if s.equivocations > 0 {
        let _ = writeln!(out, "equivocations {}", s.equivocations);
    }
    let _ = writeln!(out, "version vector:");
    for (author, seq) in &s.version_vector {
        let _ = writeln!(out, "  {author}  {seq}");
    }
    let _ = writeln!(out, "peers:");
    for line in peers_human(&s.peers).lines() {
        let _ = writeln!(out, "  {line}");
    }
    if !s.indexes.is_empty() {
        let _ = writeln!(out, "indexes:");
        for i in &s.indexes {
            let state = if i.building {
                let percent =
                    (u128::from(i.applied_lsn) * 100 / u128::from(s.log_lsn.max(1))).min(99);
                format!("building {percent}%")
            } else {
                "ready".to_string()
            };
            let _ = writeln!(
                out,
                "  {}  {}  {state}  lsn {}  {} documents  {} postings  {} skipped",
                i.name, i.kind, i.applied_lsn, i.documents, i.postings, i.skipped
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappakv_client::{EntryId, NodeId, PeerOrigin};

    fn version(id: u8, value: Option<&[u8]>) -> Version {
        Version {
            id: EntryId([id; 32]),
            author: NodeId([0xaa; 32]),
            timestamp: Timestamp(1_700_000_000_123 << 16),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn get_json_shape_with_text_and_binary() {
        let got = GetResult {
            key: vec![0xff, 0x00],
            values: vec![version(1, Some(b"hello")), version(2, Some(&[0xc3, 0x28]))],
            context: Context(vec![EntryId([1; 32]), EntryId([2; 32])]),
        };
        let v = get_json(&got);
        assert_eq!(v["key"], json!({"base64": "/wA="}));
        assert_eq!(v["values"][0]["value"], json!("hello"));
        assert_eq!(v["values"][1]["value"], json!({"base64": "wyg="}));
        assert_eq!(v["values"][0]["id"], json!(EntryId([1; 32]).to_hex()));
        assert_eq!(v["values"][0]["author"], json!(NodeId([0xaa; 32]).to_hex()));
        assert_eq!(
            v["values"][0]["timestamp"],
            json!("2023-11-14T22:13:20.123Z")
        );
        assert_eq!(v["values"][0]["hlc"], json!(1_700_000_000_123u64 << 16));
        assert_eq!(
            v["context"],
            json!(format!("{}.{}", EntryId([1; 32]), EntryId([2; 32])))
        );
    }

    #[test]
    fn missing_key_has_empty_values() {
        let got = GetResult {
            key: b"k".to_vec(),
            values: vec![],
            context: Context::default(),
        };
        assert_eq!(
            get_json(&got).to_string(),
            r#"{"context":"","key":"k","values":[]}"#
        );
        assert_eq!(get_human(&got), "");
    }

    #[test]
    fn status_json_shape() {
        let s = Status {
            node_id: Some(NodeId([1; 32])),
            log_lsn: 5,
            indexed_lsn: 4,
            version_vector: vec![(NodeId([1; 32]), 3)],
            peers: vec![PeerStatus {
                node_id: NodeId([2; 32]),
                addr: Some("127.0.0.1:7701".into()),
                connected: true,
                since_ms: 1,
                sent: 2,
                received: 3,
                they_lack: 0,
                we_lack: 0,
                origin: PeerOrigin::Joined,
            }],
            ..Status::default()
        };
        let v = status_json(&s);
        assert_eq!(v["version_vector"][NodeId([1; 32]).to_hex()], json!(3));
        assert_eq!(v["peers"][0]["connected"], json!(true));
        assert_eq!(v["peers"][0]["sent"], json!(2));
        assert_eq!(v["peers"][0]["origin"], json!("joined"));
        assert_eq!(v["log_lsn"], json!(5));
        assert_eq!(v["indexed_lsn"], json!(4));
    }

    #[test]
    fn a_near_query_shows_each_distance() {
        let got = GetResult::from(KeyVersions {
            key: b"map/A".to_vec(),
            values: vec![],
            context: vec![],
        });
        assert_eq!(query_json(&got, Some(12.5))["distance_m"], json!(12.5));
        assert!(query_json(&got, None).get("distance_m").is_none());
    }

    #[test]
    fn human_never_prints_raw_binary() {
        assert_eq!(bytes_human(b"plain text"), "plain text");
        assert_eq!(bytes_human(b"a\x1b[31mb\n"), "a\\u{1b}[31mb\\n");
        assert_eq!(bytes_human(&[0xff, 0xfe]), "base64://4=");
    }

    #[test]
    fn siblings_are_all_shown_with_ids() {
        let got = GetResult {
            key: b"k".to_vec(),
            values: vec![version(1, Some(b"a")), version(2, Some(b"b"))],
            context: Context(vec![EntryId([1; 32]), EntryId([2; 32])]),
        };
        let text = get_human(&got);
        assert!(
            text.contains(&EntryId([1; 32]).to_hex()) && text.contains(&EntryId([2; 32]).to_hex())
        );
        assert!(
            text.contains("\n    a\n") && text.contains("\n    b\n"),
            "{text}"
        );
        assert!(text.ends_with(&format!("context: {}\n", got.context)));
    }

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(time_human(Timestamp(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            time_human(Timestamp(1_700_000_000_123 << 16 | 7)),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            time_human(Timestamp(951_782_400_000 << 16)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
