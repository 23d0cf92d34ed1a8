//! Read results, and typed values: serde types stored as JSON or MessagePack bytes.

use kappakv_protocol::{Context, EntryId, KeyVersions, NodeId, Timestamp, Version};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::{Client, Written};
use crate::error::{Result, ValueError};

/// The current versions of a key and the context that supersedes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GetResult {
    /// The key.
    pub key: Vec<u8>,
    /// The current values (tombstones left out), ordered by timestamp then id. Empty when the
    /// key is missing or deleted; more than one when concurrent writes left siblings.
    pub values: Vec<Version>,
    /// Ids of every current version, tombstones included: pass it to
    /// [`Client::put_with`] to supersede exactly what was read.
    pub context: Context,
}

impl From<KeyVersions> for GetResult {
    fn from(kv: KeyVersions) -> Self {
        Self {
            key: kv.key,
            values: kv.values,
            context: Context(kv.context),
        }
    }
}

impl GetResult {
    /// Whether the key has no current value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether concurrent writes left more than one current value.
    pub fn has_siblings(&self) -> bool {
        self.values.len() > 1
    }

    /// The value, if there is exactly one.
    pub fn value(&self) -> Option<&[u8]> {
        match self.values.as_slice() {
            [only] => only.value.as_deref(),
            _ => None,
        }
    }

    /// Every current value's bytes.
    pub fn value_bytes(&self) -> impl Iterator<Item = &[u8]> {
        self.values.iter().filter_map(|v| v.value.as_deref())
    }

    /// Decodes every value as JSON.
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<Typed<T>, ValueError> {
        self.decode(|bytes| serde_json::from_slice(bytes).map_err(ValueError::from))
    }

    /// Decodes every value as MessagePack.
    pub fn decode_msgpack<T: DeserializeOwned>(&self) -> Result<Typed<T>, ValueError> {
        self.decode(|bytes| rmp_serde::from_slice(bytes).map_err(ValueError::from))
    }

    fn decode<T>(
        &self,
        f: impl Fn(&[u8]) -> Result<T, ValueError>,
    ) -> Result<Typed<T>, ValueError> {
        let values = self
            .values
            .iter()
            .filter_map(|v| v.value.as_deref().map(|bytes| (v, bytes)))
            .map(|(v, bytes)| {
                Ok(TypedVersion {
                    id: v.id,
                    author: v.author,
                    timestamp: v.timestamp,
                    value: f(bytes)?,
                })
            })
            .collect::<Result<_, ValueError>>()?;
        Ok(Typed {
            key: self.key.clone(),
            values,
            context: self.context.clone(),
        })
    }
}

/// A get whose values were decoded into `T`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Typed<T> {
    /// The key.
    pub key: Vec<u8>,
    /// The decoded current values, in the order of [`GetResult::values`].
    pub values: Vec<TypedVersion<T>>,
    /// The context that supersedes them all.
    pub context: Context,
}

impl<T> Typed<T> {
    /// The value, if there is exactly one.
    pub fn value(&self) -> Option<&T> {
        match self.values.as_slice() {
            [only] => Some(&only.value),
            _ => None,
        }
    }

    /// The values, dropping the version details.
    pub fn into_values(self) -> Vec<T> {
        self.values.into_iter().map(|v| v.value).collect()
    }
}

/// One decoded version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedVersion<T> {
    /// The entry that wrote it.
    pub id: EntryId,
    /// Who wrote it.
    pub author: NodeId,
    /// When, by the author's clock.
    pub timestamp: Timestamp,
    /// The value.
    pub value: T,
}

/// Typed values: `T` stored as JSON or MessagePack bytes.
///
/// ```no_run
/// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct User { name: String, visits: u32 }
///
/// client.put_json("user/1", &User { name: "ada".into(), visits: 1 }).await?;
/// let got = client.get_json::<User>("user/1").await?;
/// if let Some(user) = got.value() {
///     let next = User { name: user.name.clone(), visits: user.visits + 1 };
///     client.put_json_with("user/1", &next, &got.context).await?;
/// }
/// # Ok(()) }
/// ```
impl Client {
    /// Stores `value` as JSON, superseding every current version.
    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<Written> {
        let bytes = serde_json::to_vec(value).map_err(ValueError::from)?;
        self.put(key, bytes).await
    }

    /// Stores `value` as JSON, superseding exactly `context`.
    pub async fn put_json_with<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        context: &Context,
    ) -> Result<Written> {
        let bytes = serde_json::to_vec(value).map_err(ValueError::from)?;
        self.put_with(key, bytes, context).await
    }

    /// Reads every current value as JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, key: impl AsRef<[u8]>) -> Result<Typed<T>> {
        Ok(self.get(key).await?.decode_json()?)
    }

    /// Stores `value` as MessagePack (with field names), superseding every current version.
    pub async fn put_msgpack<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
    ) -> Result<Written> {
        let bytes = rmp_serde::to_vec_named(value).map_err(ValueError::from)?;
        self.put(key, bytes).await
    }

    /// Stores `value` as MessagePack (with field names), superseding exactly `context`.
    pub async fn put_msgpack_with<T: Serialize + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        context: &Context,
    ) -> Result<Written> {
        let bytes = rmp_serde::to_vec_named(value).map_err(ValueError::from)?;
        self.put_with(key, bytes, context).await
    }

    /// Reads every current value as MessagePack.
    pub async fn get_msgpack<T: DeserializeOwned>(
        &self,
        key: impl AsRef<[u8]>,
    ) -> Result<Typed<T>> {
        Ok(self.get(key).await?.decode_msgpack()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: u8, value: &[u8]) -> Version {
        Version {
            id: EntryId([id; 32]),
            author: NodeId([9; 32]),
            timestamp: Timestamp(u64::from(id)),
            value: Some(value.to_vec()),
        }
    }

    #[test]
    fn decodes_every_sibling() {
        let got = GetResult {
            key: b"k".to_vec(),
            values: vec![version(1, b"1"), version(2, b"[2]")],
            context: Context(vec![EntryId([1; 32]), EntryId([2; 32])]),
        };
        assert!(got.has_siblings());
        assert_eq!(got.value(), None);
        let err = got.decode_json::<u32>().unwrap_err();
        assert!(matches!(err, ValueError::Json(_)));
        let any = got.decode_json::<serde_json::Value>().unwrap();
        assert_eq!(any.values[1].value, serde_json::json!([2]));
        assert_eq!(any.context, got.context);
    }

    #[test]
    fn msgpack_round_trip() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct P {
            x: i32,
            name: String,
        }
        let p = P {
            x: -3,
            name: "n".into(),
        };
        let bytes = rmp_serde::to_vec_named(&p).unwrap();
        let got = GetResult {
            key: b"k".to_vec(),
            values: vec![version(1, &bytes)],
            context: Context::default(),
        };
        assert_eq!(got.decode_msgpack::<P>().unwrap().value(), Some(&p));
    }
}
