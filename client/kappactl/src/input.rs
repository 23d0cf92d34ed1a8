//! Reading what the user gives: the ticket, contexts, values, peer addresses and batch files.

use std::io::Read;
use std::path::{Path, PathBuf};

use data_encoding::BASE64;
use kappakv_client::{Batch, Context, IndexQuery, IndexValue, NodeId, Ticket, WriteOp};
use kappakv_protocol::limits::MAX_OPS_PER_ENTRY;
use serde_json::Value;

use crate::Failure;

/// The default data dir of `kappakv serve`, relative to the working directory.
const DEFAULT_DATA_DIR: &str = "kappakv.data";

/// Where the ticket comes from: `--ticket` (or `KAPPAKV_TICKET`, which clap folds into it), else
/// `DATA_DIR/client.ticket`, else `./kappakv.data/client.ticket`.
pub(crate) fn resolve_ticket(
    ticket: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<Ticket, Failure> {
    if let Some(text) = ticket {
        return text.parse().map_err(|e| {
            Failure::usage(format!("bad ticket: {e}; copy it again from `kappakv id`"))
        });
    }
    let path = data_dir
        .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), Path::to_path_buf)
        .join("client.ticket");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let hint = if data_dir.is_some() {
                "start `kappakv serve --data-dir` with that folder, or pass --ticket".to_string()
            } else {
                "start `kappakv serve` in this folder, or pass --ticket (or set KAPPAKV_TICKET)"
                    .to_string()
            };
            return Err(Failure::connect(format!(
                "no ticket at {}: {hint}",
                path.display()
            )));
        }
        Err(e) => {
            return Err(Failure::other(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    text.parse().map_err(|e| {
        Failure::usage(format!(
            "bad ticket in {}: {e}; run `kappakv id` to print a fresh one",
            path.display()
        ))
    })
}

pub(crate) fn parse_context(flag: &str, text: &str) -> Result<Context, Failure> {
    text.parse().map_err(|e| {
        Failure::usage(format!(
            "bad {flag}: {e}; pass the `context` that `kappactl get` printed"
        ))
    })
}

/// A VALUE argument: `-` reads standard input to its end.
pub(crate) fn read_value(arg: &str) -> Result<Vec<u8>, Failure> {
    if arg != "-" {
        return Ok(arg.as_bytes().to_vec());
    }
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .read_to_end(&mut buf)
        .map_err(|e| Failure::other(format!("cannot read the value from standard input: {e}")))?;
    Ok(buf)
}

/// `NODEID@HOST:PORT`.
pub(crate) fn parse_peer(text: &str) -> Result<(NodeId, String), Failure> {
    let (id, addr) = text
        .split_once('@')
        .ok_or_else(|| Failure::usage(format!("bad peer `{text}`: expected NODEID@HOST:PORT")))?;
    let id = parse_node_id(id)?;
    if addr
        .rsplit_once(':')
        .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
    {
        return Err(Failure::usage(format!(
            "bad peer address `{addr}`: expected HOST:PORT"
        )));
    }
    Ok((id, addr.to_string()))
}

pub(crate) fn parse_node_id(text: &str) -> Result<NodeId, Failure> {
    text.parse()
        .map_err(|e| Failure::usage(format!("bad node id: {e}")))
}

/// Parses a batch file: JSON Lines of `{"key": K, "value": V}` or `{"key": K, "delete": true}`,
/// each optionally with `"supersedes": CONTEXT`. Keys and values are strings, or
/// `{"base64": "..."}` for binary. Blank lines are skipped.
/// A query value: JSON when it parses (a JSON array gives the values of a compound index's
/// fields), else the text as a string.
pub(crate) fn parse_index_value(text: &str) -> Result<Vec<IndexValue>, Failure> {
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return Ok(vec![IndexValue::String(text.to_string())]);
    };
    let scalar = |v: &Value| match v {
        Value::Null => Ok(IndexValue::Null),
        Value::Bool(b) => Ok(IndexValue::Bool(*b)),
        Value::Number(n) => n
            .as_f64()
            .map(IndexValue::Number)
            .ok_or_else(|| Failure::usage(format!("{n} is not a number an index holds"))),
        Value::String(s) => Ok(IndexValue::String(s.clone())),
        Value::Array(_) | Value::Object(_) => Err(Failure::usage(format!(
            "{text}: an index holds null, booleans, numbers and strings"
        ))),
    };
    match &value {
        Value::Array(items) if items.is_empty() => {
            Err(Failure::usage("an empty array matches no index value"))
        }
        Value::Array(items) => items.iter().map(scalar).collect(),
        other => Ok(vec![scalar(other)?]),
    }
}

/// `N` numbers separated by commas, such as `61,65,-148,-144`, for `flag`.
pub(crate) fn parse_coordinates<const N: usize>(
    flag: &str,
    text: &str,
) -> Result<[f64; N], Failure> {
    let numbers: Vec<f64> = text
        .split(',')
        .map(|n| n.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::usage(format!("{flag} {text}: {e}")))?;
    <[f64; N]>::try_from(numbers).map_err(|got| {
        Failure::usage(format!(
            "{flag} {text}: expected {N} numbers separated by commas, got {}",
            got.len()
        ))
    })
}

/// `A..B` (B excluded), `A..=B`, `A..`, `..B`: each side a query value.
pub(crate) fn parse_range(text: &str) -> Result<IndexQuery, Failure> {
    let (start, end, end_inclusive) = if let Some((a, b)) = text.split_once("..=") {
        (a, b, true)
    } else if let Some((a, b)) = text.split_once("..") {
        (a, b, false)
    } else {
        return Err(Failure::usage(format!(
            "--range {text}: expected A..B, A..=B, A.. or ..B"
        )));
    };
    let side = |s: &str| {
        if s.is_empty() {
            Ok(None)
        } else {
            parse_index_value(s).map(Some)
        }
    };
    Ok(IndexQuery::Range {
        start: side(start)?,
        end: side(end)?,
        end_inclusive,
    })
}

pub(crate) fn parse_batch(text: &str) -> Result<Batch, Failure> {
    let mut batch = Batch::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let op = parse_batch_line(line)
            .map_err(|why| Failure::usage(format!("batch line {}: {why}", n + 1)))?;
        batch = batch.push(op);
    }
    if batch.is_empty() {
        return Err(Failure::usage("the batch file has no ops"));
    }
    if batch.len() > MAX_OPS_PER_ENTRY {
        return Err(Failure::usage(format!(
            "the batch has {} ops, the most in one atomic write is {MAX_OPS_PER_ENTRY}: split the file",
            batch.len()
        )));
    }
    Ok(batch)
}

fn parse_batch_line(line: &str) -> Result<WriteOp, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("expected an object")?;
    for field in obj.keys() {
        if !matches!(field.as_str(), "key" | "value" | "delete" | "supersedes") {
            return Err(format!("unknown field `{field}`"));
        }
    }
    let key =
        bytes_field(obj.get("key").ok_or("missing `key`")?).map_err(|e| format!("`key`: {e}"))?;
    let delete = match obj.get("delete") {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(_) => return Err("`delete` must be true or false".into()),
    };
    let value = match (obj.get("value"), delete) {
        (Some(_), true) => return Err("give `value` or `\"delete\": true`, not both".into()),
        (Some(v), false) => Some(bytes_field(v).map_err(|e| format!("`value`: {e}"))?),
        (None, true) => None,
        (None, false) => return Err("missing `value` (or `\"delete\": true`)".into()),
    };
    let supersedes = match obj.get("supersedes") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            s.parse::<Context>()
                .map_err(|e| format!("`supersedes`: {e}"))?
                .normalized()
                .0,
        ),
        Some(_) => return Err("`supersedes` must be a context string".into()),
    };
    Ok(WriteOp {
        key,
        value,
        supersedes,
    })
}

/// A string, or `{"base64": "..."}`.
fn bytes_field(v: &Value) -> Result<Vec<u8>, String> {
    match v {
        Value::String(s) => Ok(s.as_bytes().to_vec()),
        Value::Object(o) if o.len() == 1 => match o.get("base64") {
            Some(Value::String(b)) => BASE64
                .decode(b.as_bytes())
                .map_err(|e| format!("bad base64: {e}")),
            _ => Err("expected a string or {\"base64\": \"...\"}".into()),
        },
        _ => Err("expected a string or {\"base64\": \"...\"}".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExitCode;
    use kappakv_client::EntryId;

    #[test]
    fn coordinates_are_numbers_separated_by_commas() {
        assert_eq!(
            parse_coordinates::<4>("--bbox", "61, 65,-148,-144")
                .unwrap()
                .map(f64::to_bits),
            [61.0, 65.0, -148.0, -144.0f64].map(f64::to_bits)
        );
        assert!(parse_coordinates::<2>("--near", "1,2,3").is_err());
        assert!(parse_coordinates::<2>("--near", "north,2").is_err());
    }

    #[test]
    fn query_values_and_ranges() {
        assert_eq!(
            parse_index_value("cats").unwrap(),
            [IndexValue::from("cats")]
        );
        assert_eq!(parse_index_value("\"3\"").unwrap(), [IndexValue::from("3")]);
        assert_eq!(parse_index_value("-2.5").unwrap(), [IndexValue::from(-2.5)]);
        assert_eq!(
            parse_index_value("[\"ada\", 2020, null]").unwrap(),
            [
                IndexValue::from("ada"),
                IndexValue::from(2020i64),
                IndexValue::Null
            ]
        );
        assert!(parse_index_value("{\"a\": 1}").is_err());
        assert_eq!(
            parse_range("10..=20").unwrap(),
            IndexQuery::Range {
                start: Some(vec![IndexValue::from(10i64)]),
                end: Some(vec![IndexValue::from(20i64)]),
                end_inclusive: true
            }
        );
        assert_eq!(
            parse_range("..b").unwrap(),
            IndexQuery::Range {
                start: None,
                end: Some(vec![IndexValue::from("b")]),
                end_inclusive: false
            }
        );
        assert!(parse_range("10-20").is_err());
    }

    #[test]
    fn batch_lines() {
        let ctx = Context(vec![EntryId([3; 32])]);
        let text = format!(
            "{{\"key\":\"a\",\"value\":\"1\"}}\n\n{{\"key\":{{\"base64\":\"/w==\"}},\"value\":{{\"base64\":\"AAE=\"}}}}\n\
             {{\"key\":\"c\",\"delete\":true,\"supersedes\":\"{ctx}\"}}\n"
        );
        let ops: Vec<WriteOp> = parse_batch(&text).unwrap().into();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            ops[0],
            WriteOp {
                key: b"a".to_vec(),
                value: Some(b"1".to_vec()),
                supersedes: None
            }
        );
        assert_eq!(ops[1].key, vec![0xff]);
        assert_eq!(ops[1].value, Some(vec![0, 1]));
        assert_eq!(
            ops[2],
            WriteOp {
                key: b"c".to_vec(),
                value: None,
                supersedes: Some(ctx.0)
            }
        );
    }

    #[test]
    fn batch_errors_name_the_line() {
        for (text, want) in [
            ("{\"key\":\"a\"}", "line 1: missing `value`"),
            ("{\"key\":\"a\",\"value\":\"1\"}\nnope", "line 2: not JSON"),
            (
                "{\"key\":\"a\",\"value\":\"1\",\"delete\":true}",
                "not both",
            ),
            ("{\"key\":\"a\",\"value\":1}", "`value`: expected a string"),
            (
                "{\"key\":\"a\",\"value\":\"1\",\"supersedes\":\"xyz\"}",
                "`supersedes`",
            ),
            ("{\"key\":\"a\",\"valeu\":\"1\"}", "unknown field `valeu`"),
            ("\n\n", "no ops"),
        ] {
            let err = parse_batch(text).unwrap_err();
            assert_eq!(err.code, ExitCode::Usage);
            assert!(err.message.contains(want), "{text:?}: {}", err.message);
        }
    }

    #[test]
    fn tickets_contexts_and_peers() {
        let id = NodeId([5; 32]);
        let ticket = format!("kappakv://{id}@127.0.0.1:7700/rw_tok");
        assert_eq!(resolve_ticket(Some(&ticket), None).unwrap().node_id, id);
        assert_eq!(
            resolve_ticket(Some("nope"), None).unwrap_err().code,
            ExitCode::Usage
        );

        let dir = std::env::temp_dir().join(format!("kappactl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = resolve_ticket(None, Some(&dir)).unwrap_err();
        assert_eq!(missing.code, ExitCode::Connect);
        assert!(missing.message.contains("client.ticket") && missing.message.contains("--ticket"));
        std::fs::write(dir.join("client.ticket"), format!("{ticket}\n")).unwrap();
        assert_eq!(resolve_ticket(None, Some(&dir)).unwrap().token, "rw_tok");
        std::fs::remove_dir_all(&dir).unwrap();

        let ctx = Context(vec![EntryId([2; 32]), EntryId([1; 32])]).normalized();
        assert_eq!(
            parse_context("--supersedes", &ctx.to_string()).unwrap(),
            ctx
        );
        assert_eq!(
            parse_context("--supersedes", "").unwrap(),
            Context::default()
        );
        assert_eq!(
            parse_context("--supersedes", "zz").unwrap_err().code,
            ExitCode::Usage
        );

        assert_eq!(
            parse_peer(&format!("{id}@10.0.0.1:7700")).unwrap(),
            (id, "10.0.0.1:7700".into())
        );
        assert_eq!(
            parse_peer(&format!("{id}@host.example:7700")).unwrap().1,
            "host.example:7700"
        );
        assert!(parse_peer(&format!("{id}@10.0.0.1")).is_err());
        assert!(parse_peer("abc@10.0.0.1:1").is_err());
    }
}
