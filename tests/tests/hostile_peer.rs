//! A rogue peer written in the test: it dials a node over `kappakv-peer/1` with raw quinn and
//! sends crafted entries of authors whose keys the test holds. Forged, gapped, mislinked and
//! never-signed entries are refused without stopping the rest of the stream; an equivocation is
//! refused, counted and stored as proof; strangers and plain clients cannot speak the protocol.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::record::{RecordDecode, decode_record};
use kappakv_protocol::{ALPN_CLIENT, Entry, EntryId, Keypair, NodeId, Op, SignedEntry, Timestamp};
use kappakv_server::net::tls::TlsIdentity;
use kappakv_server::node::replication::driver::{EQUIVOCATIONS_DIR, peer_transport};
use kappakv_tests::{TestNode, eventually, free_udp_port};

/// One author's chain, built by hand.
struct Author {
    kp: Keypair,
    head: Option<(u64, EntryId)>,
}

impl Author {
    /// A fixed key, so that runs are reproducible.
    fn new(seed: u8) -> Self {
        Self {
            kp: Keypair::from_secret([seed; 32]),
            head: None,
        }
    }

    fn id(&self) -> NodeId {
        self.kp.node_id()
    }

    /// The next entry of the chain, putting `key` = `value`.
    fn next(&mut self, key: &str, value: &str) -> Entry {
        let (seq, prev) = self.head.map_or((1, None), |(s, id)| (s + 1, Some(id)));
        let e = entry(self.id(), seq, prev, key, value);
        self.head = Some((seq, e.id()));
        e
    }

    /// The next entry, signed by the author.
    fn signed(&mut self, key: &str, value: &str) -> SignedEntry {
        let e = self.next(key, value);
        sign(e, Some(&self.kp))
    }

    /// The next entry, unsigned (a later signature must cover it).
    fn unsigned(&mut self, key: &str, value: &str) -> SignedEntry {
        let e = self.next(key, value);
        sign(e, None)
    }
}

fn entry(author: NodeId, seq: u64, prev: Option<EntryId>, key: &str, value: &str) -> Entry {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis();
    Entry {
        author,
        seq,
        prev,
        timestamp: Timestamp(u64::try_from(millis).expect("millis fit u64") << 16),
        ops: vec![Op::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            supersedes: vec![],
        }],
    }
}

fn sign(entry: Entry, kp: Option<&Keypair>) -> SignedEntry {
    let id = entry.id();
    SignedEntry {
        id,
        entry,
        signature: kp.map(|kp| kp.sign(&id)),
    }
}

/// A raw connection with a node, as `kp`, on `alpn`, presenting `kp`'s certificate when
/// `with_cert`.
async fn dial(
    node: &TestNode,
    kp: &Keypair,
    alpn: &[u8],
    with_cert: bool,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let identity = TlsIdentity::new(kp)?;
    let cert = with_cert.then(|| (identity.chain.clone(), identity.key.clone_key().into()));
    let tls = kappakv_protocol::tls::client_config(node.server.node_id(), alpn, cert)?;
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    config.transport_config(Arc::new(peer_transport()));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint
        .connect_with(
            config,
            node.server.addr(),
            kappakv_protocol::tls::SERVER_NAME,
        )?
        .await?;
    Ok((endpoint, conn))
}

/// The rogue's half of a sync: its stream, opened with an empty hello.
struct Rogue {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: quinn::SendStream,
}

impl Rogue {
    /// Dials `node` as `kp`, which must be on the node's peer list, and says hello.
    async fn connect(node: &TestNode, kp: &Keypair) -> anyhow::Result<Self> {
        let (endpoint, conn) = dial(node, kp, kappakv_protocol::ALPN_PEER, true).await?;
        let mut tx = conn.open_uni().await?;
        tx.write_all(&encode_frame(&PeerMessage::Hello {
            version_vector: vec![],
        }))
        .await?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
            tx,
        })
    }

    async fn send(&mut self, entries: &[SignedEntry]) -> anyhow::Result<()> {
        let payloads = entries.iter().map(|e| e.encode_payload().into()).collect();
        self.tx
            .write_all(&encode_frame(&PeerMessage::Entries { payloads }))
            .await?;
        Ok(())
    }
}

/// A node with the rogue (seed 1) on its peer list, at an address where nothing listens.
async fn node_with_rogue() -> anyhow::Result<(TestNode, Keypair)> {
    let node = TestNode::start().await?;
    let rogue = Keypair::from_secret([1; 32]);
    let nowhere = format!("127.0.0.1:{}", free_udp_port()?);
    node.client()
        .await?
        .peer_add(rogue.node_id(), nowhere)
        .await?;
    Ok((node, rogue))
}

async fn value(node: &TestNode, key: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    Ok(node
        .client()
        .await?
        .get(key)
        .await?
        .values
        .into_iter()
        .filter_map(|v| v.value)
        .collect())
}

fn rejected(node: &TestNode, reason: &str) -> u64 {
    node.server
        .node()
        .replication()
        .and_then(|r| r.rejected().get(reason).copied())
        .unwrap_or(0)
}

#[tokio::test]
async fn refused_entries_do_not_stop_the_rest_of_the_stream() -> anyhow::Result<()> {
    let (node, rogue_kp) = node_with_rogue().await?;
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    let (mut good, mut forged, mut gapped, mut mislinked, mut never) = (
        Author::new(10),
        Author::new(11),
        Author::new(12),
        Author::new(13),
        Author::new(14),
    );

    // A good chain, signed only at its end, flows in.
    rogue
        .send(&[
            good.unsigned("x/1", "1"),
            good.unsigned("x/2", "2"),
            good.signed("x/3", "3"),
        ])
        .await?;
    eventually("the good chain arrives", || async {
        Ok(value(&node, "x/1").await? == [b"1"] && value(&node, "x/3").await? == [b"3"])
    })
    .await?;

    // In one frame: an entry signed with another author's key, a seq gap, a wrong prev, a run
    // never signed; then more of the good chain, which must still arrive.
    let y1 = {
        let e = forged.next("y/1", "forged");
        sign(e, Some(&good.kp))
    };
    let z1 = gapped.signed("z/1", "1");
    gapped.next("z/2", "skipped");
    let z3 = gapped.signed("z/3", "3");
    let w1 = mislinked.signed("w/1", "1");
    let w2 = sign(
        entry(
            mislinked.id(),
            2,
            Some(EntryId([7; 32])),
            "w/2",
            "mislinked",
        ),
        Some(&mislinked.kp),
    );
    let u1 = never.unsigned("u/1", "1");
    let u2 = never.unsigned("u/2", "2");
    let x4 = good.unsigned("x/4", "4");
    let x5 = good.signed("x/5", "5");
    rogue.send(&[y1, z1, z3, w1, w2, u1, u2, x4, x5]).await?;
    eventually("the good entries after the refused ones arrive", || async {
        Ok(value(&node, "x/5").await? == [b"5"] && value(&node, "x/4").await? == [b"4"])
    })
    .await?;

    assert!(
        value(&node, "y/1").await?.is_empty(),
        "forged entry applied"
    );
    assert_eq!(
        value(&node, "z/1").await?,
        [b"1"],
        "the gapped chain's first entry is good"
    );
    assert!(
        value(&node, "z/3").await?.is_empty(),
        "entry after a gap applied"
    );
    assert_eq!(
        value(&node, "w/1").await?,
        [b"1"],
        "the mislinked chain's first entry is good"
    );
    assert!(
        value(&node, "w/2").await?.is_empty(),
        "mislinked entry applied"
    );
    assert!(
        value(&node, "u/1").await?.is_empty(),
        "unsigned entry applied"
    );
    assert_eq!(rejected(&node, "bad_signature"), 1);
    assert_eq!(rejected(&node, "seq_gap"), 1);
    assert_eq!(rejected(&node, "bad_prev"), 1);

    // The unsigned run stays out after the stream ends too.
    let _ = rogue.tx.finish();
    rogue.conn.close(0u32.into(), b"done");
    let client = node.client().await?;
    eventually("the node sees the rogue leave", || async {
        Ok(client.status().await?.peers.iter().all(|p| !p.connected))
    })
    .await?;
    assert!(value(&node, "u/1").await?.is_empty());
    let status = client.status().await?;
    let mut expected = vec![(good.id(), 5), (gapped.id(), 1), (mislinked.id(), 1)];
    expected.sort_unstable();
    assert_eq!(status.version_vector, expected);
    assert_eq!(status.equivocations, 0);
    assert_eq!(status.log_lsn, 7, "x1..x5, z1, w1");
    Ok(())
}

/// Reads an equivocation proof file: its records, decoded.
fn read_proof(path: &std::path::Path) -> anyhow::Result<Vec<SignedEntry>> {
    let bytes = std::fs::read(path)?;
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        match decode_record(&bytes[at..], usize::MAX)? {
            RecordDecode::Record { payload, used } => {
                out.push(SignedEntry::decode_payload(payload)?);
                at += used;
            }
            RecordDecode::NeedMore { .. } => anyhow::bail!("torn record at {at}"),
        }
    }
    Ok(out)
}

/// The proof file of (`author`, `seq`), once it is there: it is written after the
/// equivocation is counted.
async fn proof_file(
    dir: &std::path::Path,
    author: NodeId,
    seq: u64,
) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(format!("{author}-{seq}.records"));
    eventually(&format!("{} appears", path.display()), || async {
        Ok(path.exists())
    })
    .await?;
    Ok(path)
}

#[tokio::test]
async fn an_equivocation_is_refused_counted_and_stored_as_proof() -> anyhow::Result<()> {
    let (node, rogue_kp) = node_with_rogue().await?;
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    let mut x = Author::new(20);
    let x1 = x.signed("k1", "one");
    let x2 = x.signed("k2", "two");
    let x3 = x.signed("k3", "three");
    rogue.send(&[x1.clone(), x2.clone(), x3.clone()]).await?;
    eventually("X's chain arrives", || async {
        Ok(value(&node, "k3").await? == [b"three"])
    })
    .await?;

    // In the same stream, the next entry, then a second entry for seq 2: below the head, so
    // the node finds its own entry for seq 2 in the log lookup view.
    let x4 = x.signed("k4", "four");
    let fork2 = sign(entry(x.id(), 2, Some(x1.id), "k2", "forked"), Some(&x.kp));
    rogue.send(&[x4.clone(), fork2.clone()]).await?;
    let client = node.client().await?;
    eventually("the equivocation is counted", || async {
        Ok(client.status().await?.equivocations >= 1)
    })
    .await?;
    assert_eq!(value(&node, "k4").await?, [b"four"]);
    assert_eq!(value(&node, "k2").await?, [b"two"], "the original stays");
    let dir = node.dir.path().join(EQUIVOCATIONS_DIR);
    let proof = read_proof(&proof_file(&dir, x.id(), 2).await?)?;
    assert_eq!(proof, [x2.clone(), fork2], "ours, then theirs");

    // A new session that resends X's start, then forks at the node's head: a different
    // seq 4, linked to the original seq 3, and a seq 5 that signs it.
    let _ = rogue.tx.finish();
    rogue.conn.close(0u32.into(), b"again");
    eventually("the node sees the rogue leave", || async {
        Ok(client.status().await?.peers.iter().all(|p| !p.connected))
    })
    .await?;
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    let fork4 = sign(entry(x.id(), 4, Some(x3.id), "k4", "forked"), None);
    let mut f = Author {
        kp: x.kp.clone(),
        head: Some((4, fork4.id)),
    };
    let fork5 = f.signed("k5", "forked");
    rogue
        .send(&[x1, x2, x3, fork4.clone(), fork5.clone()])
        .await?;
    eventually("the second equivocation is counted", || async {
        Ok(client.status().await?.equivocations >= 2)
    })
    .await?;
    let proof = read_proof(&proof_file(&dir, x.id(), 4).await?)?;
    assert_eq!(
        proof,
        [x4, fork4, fork5],
        "ours, then their seq 4 and the seq 5 that signs it"
    );
    assert_eq!(value(&node, "k4").await?, [b"four"]);
    assert!(value(&node, "k5").await?.is_empty());
    assert_eq!(client.status().await?.version_vector, [(x.id(), 4)]);
    Ok(())
}

#[tokio::test]
async fn strangers_and_plain_clients_cannot_speak_the_peer_protocol() -> anyhow::Result<()> {
    let (node, rogue_kp) = node_with_rogue().await?;
    let stranger = Keypair::from_secret([2; 32]);
    let mut x = Author::new(30);
    let frames = [
        encode_frame(&PeerMessage::Hello {
            version_vector: vec![],
        }),
        encode_frame(&PeerMessage::Entries {
            payloads: vec![x.signed("s/1", "1").encode_payload().into()],
        }),
    ];

    // A stranger with a valid certificate on the peer protocol: closed as not a peer.
    let (_e1, conn) = dial(&node, &stranger, kappakv_protocol::ALPN_PEER, true).await?;
    if let Ok(mut tx) = conn.open_uni().await {
        for f in &frames {
            let _ = tx.write_all(f).await;
        }
    }
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 1u32.into()),
        "{reason:?}"
    );

    // No certificate on the peer protocol: closed as well.
    let (_e2, conn) = dial(&node, &stranger, kappakv_protocol::ALPN_PEER, false).await?;
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await?;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 1u32.into()),
        "{reason:?}"
    );

    // A client connection (no certificate) that sends peer frames on a uni stream: ignored.
    let (_e3, client_conn) = dial(&node, &stranger, ALPN_CLIENT, false).await?;
    let mut tx = client_conn.open_uni().await?;
    for f in &frames {
        tx.write_all(f).await?;
    }
    let _ = tx.finish();

    // Then the listed rogue sends a marker; once it is in, the others had their chance.
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    let mut m = Author::new(31);
    rogue.send(&[m.signed("marker", "in")]).await?;
    eventually("the listed peer's marker arrives", || async {
        Ok(value(&node, "marker").await? == [b"in"])
    })
    .await?;
    assert!(
        value(&node, "s/1").await?.is_empty(),
        "a non-peer's entry applied"
    );
    let status = node.client().await?.status().await?;
    assert_eq!(status.log_lsn, 1, "only the marker");
    assert_eq!(status.peers.len(), 1, "the stranger was not added");
    Ok(())
}

/// A frame holding a message kind of a later protocol version, as a newer peer would send it:
/// MessagePack `{"Gossip": ["peers", 3]}`.
fn future_message_frame() -> Vec<u8> {
    let mut body = vec![0x81, 0xa6];
    body.extend_from_slice(b"Gossip");
    body.extend_from_slice(&[0x92, 0xa5]);
    body.extend_from_slice(b"peers");
    body.push(0x03);
    let mut frame = u32::try_from(body.len())
        .expect("a short body")
        .to_le_bytes()
        .to_vec();
    frame.extend_from_slice(&body);
    frame
}

#[tokio::test]
async fn a_message_of_a_newer_kind_is_skipped_and_the_session_goes_on() -> anyhow::Result<()> {
    let (node, rogue_kp) = node_with_rogue().await?;
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    let mut good = Author::new(20);
    rogue.tx.write_all(&future_message_frame()).await?;
    rogue.send(&[good.signed("after/1", "1")]).await?;
    eventually("the entry after the unknown message arrives", || async {
        Ok(value(&node, "after/1").await? == [b"1"])
    })
    .await?;
    assert!(rogue.conn.close_reason().is_none(), "the session ended");
    Ok(())
}

#[tokio::test]
async fn entries_of_a_small_order_author_key_are_refused() -> anyhow::Result<()> {
    let (node, rogue_kp) = node_with_rogue().await?;
    let mut rogue = Rogue::connect(&node, &rogue_kp).await?;
    // The identity point as an author id: with R the identity and s = 0, the plain ed25519
    // check holds for any entry id.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut forged_sig = [0u8; 64];
    forged_sig[0] = 1;
    let e = entry(NodeId(identity), 1, None, "weak/1", "forged");
    let forged = SignedEntry {
        id: e.id(),
        entry: e,
        signature: Some(kappakv_protocol::Signature(forged_sig)),
    };
    let mut good = Author::new(21);
    rogue.send(&[forged, good.signed("good/1", "1")]).await?;
    eventually("the good entry after the forgery arrives", || async {
        Ok(value(&node, "good/1").await? == [b"1"])
    })
    .await?;
    assert!(value(&node, "weak/1").await?.is_empty());
    assert_eq!(rejected(&node, "bad_signature"), 1);
    Ok(())
}
