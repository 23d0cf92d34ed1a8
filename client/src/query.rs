//! Queries of a node's declared secondary indexes, a page at a time.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use kappakv_protocol::limits::MAX_QUERY_LIMIT;
use kappakv_protocol::{IndexQuery, IndexValue, Request, Response};

use crate::client::Client;
use crate::connection::{read_frame, response_kind};
use crate::error::{ProtocolError, RequestError, Result};
use crate::value::GetResult;

/// What a query asks of an index, and how much of it.
///
/// ```
/// use kappakv_client::QueryOptions;
///
/// let cats = QueryOptions::exact("cats").limit(32);
/// let teens = QueryOptions::range(Some(13i64.into()), Some(20i64.into()));
/// # let _ = (cats, teens);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryOptions {
    query: IndexQuery,
    limit: u32,
    start_after: Option<QueryCursor>,
    wait: Duration,
}

/// Entries per page unless [`QueryOptions::limit`] says otherwise.
pub const DEFAULT_QUERY_LIMIT: u32 = 100;

impl QueryOptions {
    /// Any query, such as an exact match on several fields of a compound index.
    pub fn new(query: IndexQuery) -> Self {
        Self {
            query,
            limit: DEFAULT_QUERY_LIMIT,
            start_after: None,
            wait: Duration::ZERO,
        }
    }

    /// Keys whose indexed value equals `value`.
    pub fn exact(value: impl Into<IndexValue>) -> Self {
        Self::new(IndexQuery::exact(value))
    }

    /// Keys whose indexed value is in `start..end` (end excluded); `None` leaves a side open.
    pub fn range(start: Option<IndexValue>, end: Option<IndexValue>) -> Self {
        Self::new(IndexQuery::range(start, end))
    }

    /// Of a `geo` index: keys with a point in the box `min_lat..=max_lat`,
    /// `min_lon..=max_lon`, edges included (`min_lon > max_lon` crosses the antimeridian).
    pub fn bbox(min_lat: f64, max_lat: f64, min_lon: f64, max_lon: f64) -> Self {
        Self::new(IndexQuery::bbox(min_lat, max_lat, min_lon, max_lon))
    }

    /// Of a `geo` index: the keys nearest to (`lat`, `lon`) by great-circle distance, nearest
    /// first; [`QueryPage::distances_m`] has their distances. The limit is how many.
    pub fn near(lat: f64, lon: f64) -> Self {
        Self::new(IndexQuery::near(lat, lon))
    }

    /// At most `entries` per page, clamped to `1..=MAX_QUERY_LIMIT`.
    pub fn limit(mut self, entries: u32) -> Self {
        self.limit = entries.clamp(1, MAX_QUERY_LIMIT);
        self
    }

    /// Start after this position: the [`QueryPage::next`] of the previous page.
    pub fn start_after(mut self, cursor: QueryCursor) -> Self {
        self.start_after = Some(cursor);
        self
    }

    /// While the index is being built, wait up to `wait` for it (the node bounds the wait by its
    /// request timeout) instead of failing at once with [`crate::ErrorCode::IndexBuilding`].
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The query.
    pub fn query(&self) -> &IndexQuery {
        &self.query
    }
}

/// A position in an index, where a page ended. Opaque; its text form is hex.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryCursor(pub Vec<u8>);

impl fmt::Display for QueryCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl FromStr for QueryCursor {
    type Err = data_encoding::DecodeError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.as_bytes())
            .map(QueryCursor)
    }
}

/// One page of a query's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryPage {
    /// Matching keys with their current versions, in index order. A key of a multi-valued
    /// index appears once per element in a range; a key of a `geo` index appears once.
    pub items: Vec<GetResult>,
    /// Of a `near` query: each item's great-circle distance from the point, in metres (to the
    /// millimetre), nearest first. Empty for other queries.
    pub distances_m: Vec<f64>,
    /// Where the next page starts, if the limit cut this one short.
    pub next: Option<QueryCursor>,
}

impl Client {
    /// One page of the keys whose values the declared index `index` finds for `options`, each
    /// with its current versions. The page is read from one snapshot of the node, so it is
    /// consistent under concurrent writes; pass [`QueryPage::next`] to
    /// [`QueryOptions::start_after`] for the next page.
    ///
    /// ```no_run
    /// # async fn demo(client: kappakv_client::Client) -> kappakv_client::Result<()> {
    /// use kappakv_client::QueryOptions;
    ///
    /// let page = client.query("posts_by_tag", &QueryOptions::exact("cats").limit(32)).await?;
    /// for post in &page.items {
    ///     let doc = post.decode_json::<serde_json::Value>()?;
    ///     println!("{}: {:?}", String::from_utf8_lossy(&post.key), doc.value());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn query(&self, index: &str, options: &QueryOptions) -> Result<QueryPage> {
        let request = Request::Query {
            index: index.to_string(),
            query: options.query.clone(),
            limit: options.limit,
            start_after: options.start_after.as_ref().map(|c| c.0.clone()),
            min_lsn: self.written_lsn(),
            wait_ms: u64::try_from(options.wait.as_millis()).unwrap_or(u64::MAX),
        };
        let after = self.request_timeout() + options.wait;
        tokio::time::timeout(after, self.query_page(&request))
            .await
            .map_err(|_| RequestError::Timeout { after })?
    }

    async fn query_page(&self, request: &Request) -> Result<QueryPage> {
        let (_send, mut recv, _) = self.open_stream(request, true).await?;
        let (mut items, mut distances_m) = (Vec::new(), Vec::new());
        loop {
            match read_frame(&mut recv, "query").await? {
                Some(Response::Versions(kv)) => items.push(GetResult::from(kv)),
                Some(Response::Nearby {
                    versions,
                    distance_mm,
                }) => {
                    items.push(GetResult::from(versions));
                    distances_m.push(distance_mm as f64 / 1000.0);
                }
                Some(Response::QueryEnd { resume_after }) => {
                    return Ok(QueryPage {
                        items,
                        distances_m,
                        next: resume_after.map(|c| QueryCursor(c.into_vec())),
                    });
                }
                Some(Response::Error { code, message }) => {
                    return Err(RequestError::Server { code, message });
                }
                Some(other) => {
                    return Err(ProtocolError::Unexpected {
                        request: "query",
                        got: response_kind(&other),
                    }
                    .into());
                }
                None => return Err(ProtocolError::Truncated { request: "query" }.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_print_and_parse_as_hex() {
        let c = QueryCursor(vec![0, 1, 0xab]);
        assert_eq!(c.to_string(), "0001ab");
        assert_eq!("0001AB".parse::<QueryCursor>().unwrap(), c);
        assert!("xyz".parse::<QueryCursor>().is_err());
    }

    #[test]
    fn limits_are_clamped() {
        assert_eq!(QueryOptions::exact("a").limit(0).limit, 1);
        assert_eq!(
            QueryOptions::exact("a").limit(u32::MAX).limit,
            MAX_QUERY_LIMIT
        );
    }
}
