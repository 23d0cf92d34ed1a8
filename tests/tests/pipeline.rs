//! Pipelines: many requests on one stream, answered by id in any order, over real QUIC.
//!
//! By hand: a pipeline's bad frames (an unknown kind, a malformed body, a request that cannot
//! be pipelined, a frame over the limit) get typed errors with their ids and the pipeline goes
//! on, a frame without an id resets only that stream, and a finished pipeline is finished back once its
//! answers are sent. Through the library: hundreds of concurrent calls from one client share
//! one connection's pipeline and each gets its own answer, and the same client without a
//! pipeline reads what it wrote.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::future::try_join_all;
use kappakv_client::Client;
use kappakv_protocol::frame::{
    FrameDecode, decode_body, decode_frame, encode_frame, encode_tagged_frame, split_tagged,
};
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{ErrorCode, KeyRange, Request, Response, WriteOp};
use kappakv_tests::TestNode;
use quinn::{RecvStream, SendStream};

/// Opens a pipeline on `conn` and checks that the node took it.
async fn open(conn: &quinn::Connection) -> Result<(SendStream, RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(&Request::Pipeline)).await?;
    let mut buf = Vec::new();
    let answer = next_frame(&mut recv, &mut buf)
        .await?
        .context("no answer to Pipeline")?;
    let response: Response = decode_body(&answer)?;
    ensure!(response == Response::Ok, "Pipeline answered {response:?}");
    ensure!(buf.is_empty(), "bytes after the pipeline's Ok");
    Ok((send, recv))
}

/// The next frame body of `recv`, `None` once it is finished.
async fn next_frame(recv: &mut RecvStream, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>> {
    loop {
        if let FrameDecode::Frame { body, used } = decode_frame(buf, MAX_FRAME_BYTES)? {
            let body = body.to_vec();
            buf.drain(..used);
            return Ok(Some(body));
        }
        match recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None if buf.is_empty() => return Ok(None),
            None => bail!("the stream ended inside a frame"),
        }
    }
}

/// Reads `n` tagged answers, by id.
async fn answers(recv: &mut RecvStream, n: usize) -> Result<HashMap<u64, Response>> {
    let mut buf = Vec::new();
    let mut got = HashMap::new();
    while got.len() < n {
        let body = next_frame(recv, &mut buf)
            .await?
            .context("the pipeline ended before every answer")?;
        let (id, message) = split_tagged(&body)?;
        ensure!(
            got.insert(id, decode_body(message)?).is_none(),
            "two answers to {id}"
        );
    }
    ensure!(buf.is_empty(), "more answers than requests");
    Ok(got)
}

fn put(key: &str, value: &str) -> Request {
    Request::Write {
        ops: vec![WriteOp {
            key: key.into(),
            value: Some(value.into()),
            supersedes: None,
        }],
        request_id: None,
    }
}

fn code(response: Option<&Response>) -> Option<ErrorCode> {
    match response {
        Some(Response::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

#[tokio::test]
async fn a_pipeline_answers_each_request_by_id_and_survives_bad_ones() -> Result<()> {
    let node = TestNode::start().await?;
    let ticket = node.ticket();
    let conn = kappakv_tests::raw::connect(&ticket).await?;

    // Before hello a pipeline is refused like any other request.
    let refused = kappakv_tests::raw::exchange(&conn, &encode_frame(&Request::Pipeline)).await?;
    assert_eq!(
        code(Some(&refused)),
        Some(ErrorCode::Unauthorized),
        "{refused:?}"
    );
    kappakv_tests::raw::hello(&conn, &ticket).await?;

    let (mut send, mut recv) = open(&conn).await?;
    // Everything in one write: three puts, a get of a key written by the first put of
    // this batch (not guaranteed to be done yet, so only its kind is checked), a scan (not
    // pipelinable), an unknown kind, a malformed body, a nested pipeline, ids of every width.
    let mut out = Vec::new();
    encode_tagged_frame(1, &put("a", "1"), &mut out);
    encode_tagged_frame(300, &put("b", "2"), &mut out);
    encode_tagged_frame(1 << 40, &put("c", "3"), &mut out);
    encode_tagged_frame(
        7,
        &Request::Get {
            key: b"a".to_vec(),
            min_lsn: 0,
        },
        &mut out,
    );
    encode_tagged_frame(
        8,
        &Request::Scan {
            range: KeyRange::default(),
            limit: 10,
            min_lsn: 0,
        },
        &mut out,
    );
    encode_tagged_frame(9, &BTreeMap::from([("Teleport", 1u8)]), &mut out);
    encode_tagged_frame(10, &[0xc1u8], &mut out);
    encode_tagged_frame(11, &Request::Pipeline, &mut out);
    send.write_all(&out).await?;
    let got = answers(&mut recv, 8).await?;
    let mut lsns = Vec::new();
    for id in [1, 300, 1 << 40] {
        match got.get(&id) {
            Some(Response::Written { lsn, .. }) => lsns.push(*lsn),
            other => bail!("put {id} answered {other:?}"),
        }
    }
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns.len(), 3, "three writes, three LSNs: {lsns:?}");
    assert!(
        matches!(got.get(&7), Some(Response::Versions(_))),
        "{:?}",
        got.get(&7)
    );
    assert_eq!(code(got.get(&8)), Some(ErrorCode::BadRequest));
    assert_eq!(code(got.get(&9)), Some(ErrorCode::UnknownRequest));
    assert_eq!(code(got.get(&10)), Some(ErrorCode::Malformed));
    assert_eq!(code(got.get(&11)), Some(ErrorCode::BadRequest));

    // Reads after the writes, with their LSN: each gets its own value, by id.
    let max_lsn = *lsns.last().expect("three LSNs");
    out.clear();
    for (id, key) in [(20u64, "c"), (21, "a"), (22, "b")] {
        let get = Request::Get {
            key: key.into(),
            min_lsn: max_lsn,
        };
        encode_tagged_frame(id, &get, &mut out);
    }
    send.write_all(&out).await?;
    let got = answers(&mut recv, 3).await?;
    for (id, value) in [(20u64, b"3"), (21, b"1"), (22, b"2")] {
        match got.get(&id) {
            Some(Response::Versions(kv)) => {
                let values: Vec<_> = kv.values.iter().map(|v| v.value.clone()).collect();
                assert_eq!(values, vec![Some(value.to_vec())], "get {id}");
            }
            other => bail!("get {id} answered {other:?}"),
        }
    }

    // The client finishes: the node finishes back, with nothing left over.
    send.finish()?;
    let mut buf = Vec::new();
    assert!(next_frame(&mut recv, &mut buf).await?.is_none());

    // A frame over the limit is answered TooLarge with its id, read past and not held; the
    // pipeline goes on.
    let (mut send, mut recv) = open(&conn).await?;
    let len = MAX_FRAME_BYTES + 1;
    let mut big = u32::try_from(len)?.to_le_bytes().to_vec();
    big.extend_from_slice(&[0x92, 5]);
    big.resize(4 + len, 0xc0);
    send.write_all(&big).await?;
    out.clear();
    encode_tagged_frame(6, &Request::Status, &mut out);
    send.write_all(&out).await?;
    let got = answers(&mut recv, 2).await?;
    assert_eq!(
        code(got.get(&5)),
        Some(ErrorCode::TooLarge),
        "{:?}",
        got.get(&5)
    );
    assert!(matches!(got.get(&6), Some(Response::Status(_))));

    // A frame that is not [id, request] resets that stream only, with code 2.
    send.write_all(&encode_frame(&"no id")).await?;
    match recv.read_chunk(usize::MAX, true).await {
        Err(quinn::ReadError::Reset(code)) => assert_eq!(code.into_inner(), 2),
        other => bail!("a broken pipeline should be reset, got {other:?}"),
    }

    // The connection goes on, and so does the library's client.
    let (mut send, mut recv) = open(&conn).await?;
    out.clear();
    encode_tagged_frame(0, &Request::Status, &mut out);
    send.write_all(&out).await?;
    let got = answers(&mut recv, 1).await?;
    assert!(matches!(got.get(&0), Some(Response::Status(_))));
    let client = node.client().await?;
    assert_eq!(client.get("b").await?.values.len(), 1);
    Ok(())
}

/// Writes `n` keys at once from one client and reads each back at once.
async fn many_at_once(client: &Client, tag: &str, n: usize) -> Result<()> {
    let writes = (0..n).map(|i| {
        let client = client.clone();
        let (key, value) = (format!("{tag}/{i}"), format!("value {i}"));
        async move { client.put(&key, &value).await }
    });
    let written = try_join_all(writes).await?;
    let mut lsns: Vec<_> = written.iter().map(|w| w.lsn).collect();
    lsns.sort_unstable();
    lsns.dedup();
    ensure!(
        lsns.len() == n,
        "{n} writes got {} distinct LSNs",
        lsns.len()
    );
    let reads = (0..n).map(|i| {
        let client = client.clone();
        let key = format!("{tag}/{i}");
        async move { client.get(&key).await.map(|got| (i, got)) }
    });
    for (i, got) in try_join_all(reads).await? {
        let values: Vec<_> = got.values.iter().map(|v| v.value.as_deref()).collect();
        ensure!(
            values == [Some(format!("value {i}").as_bytes())],
            "{tag}/{i} read back {values:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_calls_of_one_client_each_get_their_own_answer() -> Result<()> {
    let node = TestNode::start().await?;
    // More calls at once than a pipeline carries (256): the rest wait for a slot.
    let client = node.client().await?;
    many_at_once(&client, "piped", 600).await?;
    // The same with every request on a stream of its own.
    let streams = Client::builder(node.ticket())
        .pipeline(false)
        .connect()
        .await?;
    many_at_once(&streams, "streams", 50).await?;
    // Both see each other's writes.
    assert_eq!(streams.get("piped/599").await?.values.len(), 1);
    assert_eq!(client.get("streams/49").await?.values.len(), 1);
    Ok(())
}
