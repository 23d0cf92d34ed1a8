//! `kappactl sync --stdio` and `kappactl import`: peer sessions through the node.
//!
//! `sync --stdio` relays the node's session on standard input and output, frame by frame, so
//! that two nodes sync through any byte stream (`dupsh`, ssh, socat, a pair of pipes); it only
//! reads frames to count what passes and to learn how the session ended. `import` is the other
//! side of a session itself: it sends the entries of export files, then says it is done.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use kappakv_client::{Client, SyncOptions};
use kappakv_protocol::frame::{Decoded, FRAME_HEADER_LEN, decode_message, encode_frame, frame_len};
use kappakv_protocol::limits::{MAX_FRAME_BYTES, MAX_RECORD_BYTES};
use kappakv_protocol::peer::{PeerMessage, entries_messages};
use kappakv_protocol::record::{RecordDecode, decode_record};
use kappakv_protocol::{NodeId, SignedEntry};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What passed one way through a relay.
#[derive(Debug, Default)]
struct Flow {
    entries: u64,
    authors: HashSet<NodeId>,
    synced: bool,
    taken: Option<(u64, u64, u64)>,
}

impl Flow {
    /// Counts what `body` holds; returns whether to pass it on (the node's `Taken` is for this
    /// relay alone).
    fn count(&mut self, body: &[u8]) -> bool {
        match decode_message::<PeerMessage>(body) {
            Ok(Decoded::Message(PeerMessage::Entries { payloads })) => {
                self.entries += payloads.len() as u64;
                for p in payloads {
                    if let Ok(e) = SignedEntry::decode_payload(&p) {
                        self.authors.insert(e.entry.author);
                    }
                }
            }
            Ok(Decoded::Message(PeerMessage::Synced)) => self.synced = true,
            Ok(Decoded::Message(PeerMessage::Taken {
                appended,
                present,
                refused,
            })) => {
                self.taken = Some((appended, present, refused));
                return false;
            }
            _ => {}
        }
        true
    }
}

/// Reads one frame: `None` at the end of the stream between frames.
async fn read_frame(from: &mut (impl AsyncRead + Unpin)) -> anyhow::Result<Option<Vec<u8>>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        let n = from.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("the stream ended inside a frame header");
        }
        got += n;
    }
    let len = frame_len(header, MAX_FRAME_BYTES)?;
    let mut frame = vec![0u8; FRAME_HEADER_LEN + len];
    frame[..FRAME_HEADER_LEN].copy_from_slice(&header);
    from.read_exact(&mut frame[FRAME_HEADER_LEN..])
        .await
        .context("the stream ended inside a frame")?;
    Ok(Some(frame))
}

/// Copies frames from `from` to `to` until `from` ends, counting what passes; then closes `to`.
async fn relay(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
) -> anyhow::Result<Flow> {
    let mut flow = Flow::default();
    while let Some(frame) = read_frame(&mut from).await? {
        if flow.count(&frame[FRAME_HEADER_LEN..]) {
            to.write_all(&frame).await?;
            to.flush().await?;
        }
    }
    to.shutdown().await?;
    Ok(flow)
}

fn authors(flow: &Flow) -> String {
    match flow.authors.len() {
        1 => "1 author".into(),
        n => format!("{n} authors"),
    }
}

/// `kappactl sync --stdio`: runs one session of the node on standard input and output.
pub(crate) async fn stdio(client: &Client, live: bool) -> anyhow::Result<()> {
    // A read-only ticket lets the node send only.
    let receive = !client.is_read_only();
    let stream = client
        .sync(SyncOptions {
            send: true,
            receive,
            live,
        })
        .await?;
    let (to_node, from_node) = stream.into_split();
    // What the other side sends goes to the node as it comes; the node ends the session (one
    // that is not live, once each side has said it sent everything), and what it sent is then
    // all out.
    let up = tokio::spawn(relay(tokio::io::stdin(), to_node));
    let down = relay(from_node, tokio::io::stdout()).await;
    up.abort();
    // Not an I/O error: a closed pipe here is a failed sync, not `| head`.
    let down = down.map_err(|e| anyhow::anyhow!("the session with the node failed: {e:#}"))?;
    let taken = down.taken.map_or(String::new(), |(a, p, r)| {
        format!(
            ", received {} entries: {a} new, {p} already present, {r} refused",
            a + p + r
        )
    });
    eprintln!(
        "sync: sent {} entries ({}){taken}",
        down.entries,
        authors(&down)
    );
    if let Some((_, _, refused)) = down.taken
        && refused > 0
    {
        eprintln!(
            "sync: the node refused {refused} entries{}; its log says why",
            if receive {
                ""
            } else {
                " (the ticket is read-only: it only sends)"
            }
        );
    }
    let whole = down.synced && down.taken.is_some();
    if !live && !whole {
        bail!("the session ended before both sides were synced");
    }
    Ok(())
}

/// `kappactl import FILE...`: hands the entries of export files to the node.
pub(crate) async fn import(client: &Client, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    for file in files {
        let bytes = if file.as_os_str() == "-" {
            let mut buf = Vec::new();
            tokio::io::stdin().read_to_end(&mut buf).await?;
            buf
        } else {
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
        };
        let mut at = 0;
        while at < bytes.len() {
            match decode_record(&bytes[at..], MAX_RECORD_BYTES) {
                Ok(RecordDecode::Record { payload, used }) => {
                    payloads.push(payload.to_vec());
                    at += used;
                }
                Ok(RecordDecode::NeedMore { needed }) => {
                    eprintln!(
                        "{}: torn record at offset {at} ({needed} bytes missing); the rest of the file is skipped",
                        file.display()
                    );
                    break;
                }
                Err(e) => {
                    eprintln!(
                        "{}: damaged record at offset {at} ({e}); the rest of the file is skipped",
                        file.display()
                    );
                    break;
                }
            }
        }
    }
    let payloads = causal_order(payloads);
    let stream = client
        .sync(SyncOptions {
            send: false,
            receive: true,
            live: false,
        })
        .await?;
    let (mut to_node, from_node) = stream.into_split();
    let sent = payloads.len();
    let send = async move {
        to_node
            .write_all(&encode_frame(&PeerMessage::Hello {
                version_vector: Vec::new(),
            }))
            .await?;
        for message in entries_messages(payloads) {
            to_node.write_all(&encode_frame(&message)).await?;
        }
        to_node
            .write_all(&encode_frame(&PeerMessage::Synced))
            .await?;
        to_node.shutdown().await?;
        anyhow::Ok(())
    };
    let (sent_ok, down) = tokio::join!(send, relay(from_node, tokio::io::sink()));
    sent_ok.map_err(|e| anyhow::anyhow!("sending the entries to the node failed: {e:#}"))?;
    let down = down.map_err(|e| anyhow::anyhow!("the session with the node failed: {e:#}"))?;
    let Some((appended, present, refused)) = down.taken else {
        bail!("the node ended the session before it took in every entry");
    };
    println!("{sent} entries sent: {appended} new, {present} already present, {refused} refused");
    if refused > 0 {
        bail!("{refused} entries were refused; the node's log says why");
    }
    Ok(())
}

/// The payloads in an order a session takes, whatever order the files held them in: each
/// author's entries by seq (copies of one entry once), a whole run up to its signed entry at a
/// time, runs interleaved by the timestamp of their first entry (which follows causality: a
/// write that saw another has a later clock). A payload that does not decode is sent as it
/// came, first, for the node to refuse and count.
fn causal_order(payloads: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    use std::collections::{BTreeMap, BinaryHeap, VecDeque};

    use kappakv_protocol::EntryId;
    /// An entry and the payload it came in.
    type Held = (SignedEntry, Vec<u8>);
    let mut undecodable = Vec::new();
    let mut chains: BTreeMap<NodeId, BTreeMap<(u64, EntryId), Held>> = BTreeMap::new();
    for p in payloads {
        match SignedEntry::decode_payload(&p) {
            Ok(e) => {
                let key = (e.entry.seq, e.id);
                let copies = chains.entry(e.entry.author).or_default();
                // Of copies of one entry, keep one that carries a signature.
                if copies
                    .get(&key)
                    .is_none_or(|(kept, _)| kept.signature.is_none())
                {
                    copies.insert(key, (e, p));
                }
            }
            Err(_) => undecodable.push(p),
        }
    }
    // Each author's runs, in seq order.
    let mut runs: Vec<VecDeque<Vec<Held>>> = Vec::new();
    for chain in chains.into_values() {
        let mut author_runs = VecDeque::new();
        let mut run = Vec::new();
        for (e, p) in chain.into_values() {
            let signed = e.signature.is_some();
            run.push((e, p));
            if signed {
                author_runs.push_back(std::mem::take(&mut run));
            }
        }
        if !run.is_empty() {
            author_runs.push_back(run);
        }
        runs.push(author_runs);
    }
    // The next run of every author, oldest first.
    let first_ts = |run: &Vec<Held>| run[0].0.entry.timestamp;
    let mut next: BinaryHeap<std::cmp::Reverse<(kappakv_protocol::Timestamp, usize)>> = runs
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.front().map(|run| std::cmp::Reverse((first_ts(run), i))))
        .collect();
    let mut out = undecodable;
    while let Some(std::cmp::Reverse((_, i))) = next.pop() {
        let run = runs[i].pop_front().expect("a queued author has a run");
        out.extend(run.into_iter().map(|(_, p)| p));
        if let Some(run) = runs[i].front() {
            next.push(std::cmp::Reverse((first_ts(run), i)));
        }
    }
    out
}
