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
use kappakv_protocol::limits::{MAX_ENTRY_BYTES, MAX_FRAME_BYTES, MAX_RECORD_BYTES};
use kappakv_protocol::peer::PeerMessage;
use kappakv_protocol::record::{RecordDecode, decode_record};
use kappakv_protocol::{NodeId, SignedEntry};
use serde_bytes::ByteBuf;
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
    fn count(&mut self, body: &[u8]) {
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
            })) => self.taken = Some((appended, present, refused)),
            _ => {}
        }
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
        flow.count(&frame[FRAME_HEADER_LEN..]);
        to.write_all(&frame).await?;
        to.flush().await?;
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
        let mut frame: Vec<ByteBuf> = Vec::new();
        let mut bytes = 0;
        for p in payloads {
            if !frame.is_empty() && bytes + p.len() > MAX_ENTRY_BYTES {
                to_node
                    .write_all(&encode_frame(&PeerMessage::Entries {
                        payloads: std::mem::take(&mut frame),
                    }))
                    .await?;
                bytes = 0;
            }
            bytes += p.len();
            frame.push(ByteBuf::from(p));
        }
        if !frame.is_empty() {
            to_node
                .write_all(&encode_frame(&PeerMessage::Entries { payloads: frame }))
                .await?;
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
