//! Bad input over a raw QUIC connection: oversized values, garbage frames, unknown request
//! types, huge length prefixes and unauthenticated requests each get a typed error on their
//! stream, and the node keeps serving a well-behaved client meanwhile.

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::limits::MAX_VALUE_BYTES;
use kappakv_protocol::{ErrorCode, Request, Response, WriteOp};
use kappakv_tests::TestNode;
use kappakv_tests::raw::{code, exchange};

#[tokio::test]
async fn hostile_frames_get_typed_errors_and_honest_clients_are_served() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let honest = node.client().await?;
    let conn = kappakv_tests::raw::connect(&node.ticket()).await?;

    // Nothing is served before authentication.
    let get = encode_frame(&Request::Get {
        key: b"k".to_vec(),
        min_lsn: 0,
    });
    assert_eq!(
        code(&exchange(&conn, &get).await?),
        Some(ErrorCode::Unauthorized)
    );
    let wrong = encode_frame(&Request::Hello {
        token: "rw_nope".into(),
    });
    assert_eq!(
        code(&exchange(&conn, &wrong).await?),
        Some(ErrorCode::Unauthorized)
    );

    let hello = encode_frame(&Request::Hello {
        token: node.ticket().token,
    });
    assert!(matches!(
        exchange(&conn, &hello).await?,
        Response::Hello {
            read_only: false,
            ..
        }
    ));

    // An oversized value, past the client library's own check.
    let big = Request::Write {
        ops: vec![WriteOp {
            key: b"big".to_vec(),
            value: Some(vec![7; MAX_VALUE_BYTES + 1]),
            supersedes: None,
        }],
        request_id: None,
    };
    assert_eq!(
        code(&exchange(&conn, &encode_frame(&big)).await?),
        Some(ErrorCode::TooLarge)
    );

    // Garbage after a valid length prefix.
    let mut garbage = 5u32.to_le_bytes().to_vec();
    garbage.extend_from_slice(&[0xc1, 0xff, 0x00, 0x13, 0x37]);
    assert_eq!(
        code(&exchange(&conn, &garbage).await?),
        Some(ErrorCode::Malformed)
    );

    // A well-formed MessagePack map naming a request type the node does not know.
    let unknown = encode_frame(&std::collections::BTreeMap::from([("Teleport", 1u8)]));
    assert_eq!(
        code(&exchange(&conn, &unknown).await?),
        Some(ErrorCode::UnknownRequest)
    );

    // A 4 GiB length prefix is refused before anything is allocated.
    assert_eq!(
        code(&exchange(&conn, &u32::MAX.to_le_bytes()).await?),
        Some(ErrorCode::TooLarge)
    );

    // The same connection still works, and so does the honest client.
    let ok = encode_frame(&Request::Get {
        key: b"k".to_vec(),
        min_lsn: 0,
    });
    assert!(matches!(exchange(&conn, &ok).await?, Response::Versions(_)));
    honest.put("still", "served").await?;
    assert_eq!(honest.get("still").await?.values.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_client_pinning_another_node_id_is_refused() -> anyhow::Result<()> {
    let node = TestNode::start().await?;
    let mut ticket = node.ticket();
    ticket.node_id = kappakv_protocol::NodeId([7; 32]);
    let Err(err) = kappakv_client::Client::connect(&ticket).await else {
        panic!("pinning must fail")
    };
    assert!(
        !err.is_retryable(),
        "a wrong node id is not retryable: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn an_unauthenticated_connection_is_closed_and_reads_only_small_frames() -> anyhow::Result<()>
{
    let node = TestNode::start_with(|c| c.request_timeout_ms = 300).await?;
    let conn = kappakv_tests::raw::connect(&node.ticket()).await?;

    // Before hello, a frame larger than a hello could be is refused without being read.
    let big_hello = encode_frame(&Request::Hello {
        token: "x".repeat(8 * 1024),
    });
    assert_eq!(
        code(&exchange(&conn, &big_hello).await?),
        Some(ErrorCode::TooLarge)
    );

    // Keep-alives alone do not keep the slot: the node closes the connection.
    let reason = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await?;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 4u32.into()),
        "{reason:?}"
    );
    // An authenticated client is not affected.
    let c = node.client().await?;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    c.put("k", "v").await?;
    Ok(())
}
