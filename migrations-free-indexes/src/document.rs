//! Documents and index keys: reading a field out of a stored value, and encoding index values
//! so that byte order is value order.
//!
//! A value is a *document* when it is a JSON object (its first non-blank byte is `{`) or a
//! MessagePack map. Anything else (plain bytes, JSON arrays, scalars) is not, and is skipped by
//! every secondary index.
//!
//! # Key encoding
//!
//! Each [`IndexValue`] is a type tag byte and a body, and no encoding is a proper prefix of
//! another, so a tuple of values encodes as the concatenation of its parts and still compares
//! component by component:
//!
//! | value | tag | body |
//! |---|---|---|
//! | null | `0x10` | — |
//! | false / true | `0x20` / `0x21` | — |
//! | number | `0x30` | the f64's bits, big-endian; sign bit flipped for positives, every bit flipped for negatives; `-0` as `0` |
//! | string | `0x40` | UTF-8 bytes with `0x00` written `0x00 0xFF`, then the terminator `0x00 0x01` |

use kappakv_protocol::IndexValue;
use serde_json::Value;

const TAG_NULL: u8 = 0x10;
const TAG_FALSE: u8 = 0x20;
const TAG_TRUE: u8 = 0x21;
const TAG_NUMBER: u8 = 0x30;
const TAG_STRING: u8 = 0x40;

/// Appends the order-preserving encoding of `value` to `out`.
pub fn encode_value(value: &IndexValue, out: &mut Vec<u8>) {
    match value {
        IndexValue::Null => out.push(TAG_NULL),
        IndexValue::Bool(false) => out.push(TAG_FALSE),
        IndexValue::Bool(true) => out.push(TAG_TRUE),
        IndexValue::Number(n) => {
            out.push(TAG_NUMBER);
            // `-0.0 == 0.0`: both encode as `+0` so an exact query finds either.
            let n = if *n == 0.0 { 0.0 } else { *n };
            let bits = n.to_bits();
            let sortable = if bits >> 63 == 1 {
                !bits
            } else {
                bits | 1 << 63
            };
            out.extend_from_slice(&sortable.to_be_bytes());
        }
        IndexValue::String(s) => {
            out.push(TAG_STRING);
            for &b in s.as_bytes() {
                out.push(b);
                if b == 0 {
                    out.push(0xFF);
                }
            }
            out.extend_from_slice(&[0x00, 0x01]);
        }
    }
}

/// The encoding of a tuple of values: the concatenation of their encodings.
pub fn encode_tuple(values: &[IndexValue]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        encode_value(v, &mut out);
    }
    out
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` when
/// there is none (`prefix` is all `0xFF`).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let end = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut out = prefix[..=end].to_vec();
    out[end] += 1;
    Some(out)
}

/// The stored value as a document, if it is one (a JSON object or a MessagePack map).
pub fn decode_document(bytes: &[u8]) -> Option<Value> {
    let first = *bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    let value: Value = match first {
        b'{' => serde_json::from_slice(bytes).ok()?,
        // fixmap, map16, map32.
        0x80..=0x8f | 0xde | 0xdf => rmp_serde::from_slice(bytes).ok()?,
        _ => return None,
    };
    value.is_object().then_some(value)
}

/// The value at `path` (object keys, outermost first) in `doc`.
pub fn lookup<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(doc, |node, segment| node.as_object()?.get(segment))
}

/// `value` as an index value, if it is a JSON scalar (NaN, which JSON cannot hold but
/// MessagePack can, is not).
pub fn scalar(value: &Value) -> Option<IndexValue> {
    match value {
        Value::Null => Some(IndexValue::Null),
        Value::Bool(b) => Some(IndexValue::Bool(*b)),
        Value::Number(n) => n.as_f64().filter(|f| !f.is_nan()).map(IndexValue::Number),
        Value::String(s) => Some(IndexValue::String(s.clone())),
        Value::Array(_) | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn enc(v: &IndexValue) -> Vec<u8> {
        encode_tuple(std::slice::from_ref(v))
    }

    fn any_value() -> impl Strategy<Value = IndexValue> {
        prop_oneof![
            Just(IndexValue::Null),
            any::<bool>().prop_map(IndexValue::Bool),
            any::<f64>()
                .prop_filter("not NaN", |f| !f.is_nan())
                .prop_map(IndexValue::Number),
            (-1000i64..1000).prop_map(IndexValue::from),
            "[a\\x00\\xff-\\x{10FFFF}]{0,6}".prop_map(IndexValue::String),
        ]
    }

    proptest! {
        #[test]
        fn byte_order_is_value_order(a in any_value(), b in any_value()) {
            prop_assert_eq!(enc(&a).cmp(&enc(&b)), a.cmp(&b));
        }

        #[test]
        fn tuples_compare_component_by_component(
            a in proptest::collection::vec(any_value(), 1..3),
            b in proptest::collection::vec(any_value(), 1..3),
        ) {
            prop_assert_eq!(encode_tuple(&a).cmp(&encode_tuple(&b)), a.cmp(&b));
        }
    }

    #[test]
    fn zero_and_negative_zero_are_one_value() {
        assert_eq!(enc(&IndexValue::from(-0.0)), enc(&IndexValue::from(0.0)));
    }

    #[test]
    fn successor_bounds_every_extension() {
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
    }

    #[test]
    fn documents_are_json_objects_or_msgpack_maps() {
        assert!(decode_document(br#" {"a": 1}"#).is_some());
        assert!(decode_document(b"[1]").is_none());
        assert!(decode_document(b"{not json").is_none());
        assert!(decode_document(b"plain bytes").is_none());
        let packed = rmp_serde::to_vec_named(&serde_json::json!({"a": {"b": [1, "x"]}})).unwrap();
        let doc = decode_document(&packed).unwrap();
        let path = ["a".to_string(), "b".to_string()];
        assert_eq!(lookup(&doc, &path), Some(&serde_json::json!([1, "x"])));
        assert_eq!(lookup(&doc, &["a".to_string(), "c".to_string()]), None);
    }
}
