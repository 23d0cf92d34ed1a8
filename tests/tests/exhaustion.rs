//! Resource exhaustion against a real `kappakv serve` process, whose memory is its own: slowloris
//! streams, huge and half-sent frames, replies and watches that are never read, stream floods and
//! connection floods. During each attack an honest client's put and get succeed and the node's
//! peak resident memory stays under 512 MiB; after it, the node releases what the attack held.
//!
//! Figures are printed on lines starting with `figure:` (`cargo test … -- --nocapture`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt as _;
use kappakv_client::Client;
use kappakv_protocol::frame::encode_frame;
use kappakv_protocol::limits::MAX_FRAME_BYTES;
use kappakv_protocol::{ErrorCode, Request, Ticket};
use kappakv_tests::raw::{self, code};
use kappakv_tests::{ProcessNode, http_get, metric, mib};

/// The bound the node's resident memory must stay under during any attack.
const MEMORY_BOUND: u64 = 512 * 1024 * 1024;
/// What an honest request may take before the test gives up on it: generous, only so that a
/// failure does not hang.
const HONEST_DEADLINE: Duration = Duration::from_secs(30);

/// A node under attack: a `kappakv serve` process with its admin listener.
struct Target {
    node: ProcessNode,
    admin: SocketAddr,
    ticket: Ticket,
    _dir: tempfile::TempDir,
}

impl Target {
    /// Starts a node with `settings` (`KAPPAKV_*` variables without the prefix).
    async fn start(settings: &[(&str, &str)]) -> Result<Self> {
        let (dir, node, admin) = ProcessNode::start_with_settings(settings).await?;
        let ticket = node.ticket()?;
        Ok(Self {
            node,
            admin,
            ticket,
            _dir: dir,
        })
    }

    async fn gauge(&self, name: &str) -> Result<f64> {
        let (status, page) = http_get(self.admin, "/metrics").await?;
        ensure!(status == 200, "/metrics answered {status}");
        Ok(metric(&page, name))
    }

    /// Starts measuring the peak memory of an attack.
    fn measure(&self) {
        if !self.node.reset_peak_memory() {
            eprintln!("cannot reset the peak resident memory; peaks count from the node's start");
        }
    }

    /// Checks the peak since [`Target::measure`] against the bound and prints it.
    fn peak(&self, attack: &str) -> Result<u64> {
        let m = self.node.memory()?;
        println!(
            "figure: {attack}: peak RSS {:.1} MiB (now {:.1} MiB)",
            mib(m.peak),
            mib(m.rss)
        );
        ensure!(
            m.peak < MEMORY_BOUND,
            "{attack}: peak resident memory {:.1} MiB is over the bound",
            mib(m.peak)
        );
        Ok(m.peak)
    }

    /// Waits until the node holds no client stream and at most `connections` connections.
    async fn released(&self, connections: f64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let streams = self.gauge("kappakv_streams_open").await?;
            let conns = self.gauge("kappakv_connections_open").await?;
            if streams == 0.0 && conns <= connections {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the node still holds {streams} streams and {conns} connections");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One honest put and get of a fresh key on `client`; returns how long they took.
async fn honest(client: &Client, tag: &str) -> Result<Duration> {
    let started = Instant::now();
    let key = format!("honest/{tag}");
    tokio::time::timeout(HONEST_DEADLINE, async {
        client.put(&key, tag).await?;
        let got = client.get(&key).await?;
        ensure!(got.values.len() == 1, "{key} read back {got:?}");
        Ok(())
    })
    .await
    .with_context(|| format!("honest put/get `{tag}` not answered"))??;
    Ok(started.elapsed())
}

/// A stream that sent part of a frame and stalls.
struct Stalled {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// Opens `n` streams on `conn`, each sending `prefix` and then nothing.
async fn stall(conn: &quinn::Connection, n: usize, prefix: &[u8]) -> Result<Vec<Stalled>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(prefix).await?;
        out.push(Stalled { _send: send, recv });
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_streams_are_bounded_and_timed_out() -> Result<()> {
    const CONNECTIONS: usize = 4;
    const STREAMS_PER_CONNECTION: usize = 256;
    let target = Target::start(&[
        ("request_timeout_ms", "5000"),
        (
            "max_streams_per_connection",
            &STREAMS_PER_CONNECTION.to_string(),
        ),
    ])
    .await?;
    let client = Client::connect(&target.ticket).await?;
    honest(&client, "before").await?;
    target.measure();

    // Half a length prefix on some streams, a whole prefix and a few body bytes on others.
    let mut partial = encode_frame(&Request::Get {
        key: vec![b'k'; 1000],
        min_lsn: 0,
    });
    partial.truncate(10);
    let mut conns = Vec::new();
    let mut stalled = Vec::new();
    for i in 0..CONNECTIONS {
        let conn = raw::authenticated(&target.ticket).await?;
        let prefix: &[u8] = if i % 2 == 0 { &partial[..2] } else { &partial };
        // The hello used one stream: closed, but QUIC grants credit again only in batches of
        // an eighth of the limit. Every other stream stalls.
        stalled.extend(stall(&conn, STREAMS_PER_CONNECTION - 1, prefix).await?);
        conns.push(conn);
    }
    let n = stalled.len() as f64;
    kappakv_tests::eventually("the node holds every stalled stream", || async {
        Ok(target.gauge("kappakv_streams_open").await? >= n)
    })
    .await?;
    println!("figure: slowloris: {n} streams stalled on {CONNECTIONS} connections");

    // One stream more per connection is not buffered: the node grants no credit for it.
    for conn in &conns {
        let more = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
        ensure!(
            more.is_err(),
            "a stream past the per-connection limit was opened"
        );
    }

    let took = honest(&client, "slowloris").await?;
    println!("figure: slowloris: honest put+get {took:?}");
    target.peak("slowloris")?;

    // The node answers every stalled stream with `Timeout` and closes it.
    let mut timed_out = 0;
    for s in &mut stalled {
        let r = tokio::time::timeout(Duration::from_secs(60), raw::read_response(&mut s.recv))
            .await
            .context("a stalled stream was never closed")??;
        ensure!(code(&r) == Some(ErrorCode::Timeout), "{r:?}");
        timed_out += 1;
    }
    println!("figure: slowloris: {timed_out} streams answered Timeout and closed");
    // Once the attacker lets go of its halves too, the credit comes back: a new stream opens
    // on every connection.
    drop(stalled);
    for conn in &conns {
        tokio::time::timeout(Duration::from_secs(30), conn.open_bi())
            .await
            .context("no stream credit after the stalled streams closed")??;
    }
    drop(conns);
    target.released(1.0).await?;
    honest(&client, "after").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_timed_out_from_its_first_byte() -> Result<()> {
    let target = Target::start(&[("request_timeout_ms", "1000")]).await?;
    let conn = raw::authenticated(&target.ticket).await?;
    // The first bytes of a later stream open `early` at the node too, as when a client's
    // queued request reaches the node after its next one.
    let (mut early, mut early_rx) = conn.open_bi().await?;
    let later = raw::exchange(&conn, &encode_frame(&Request::Status)).await?;
    ensure!(code(&later).is_none(), "{later:?}");
    kappakv_tests::eventually("the node holds the early stream", || async {
        Ok(target.gauge("kappakv_streams_open").await? >= 1.0)
    })
    .await?;
    // Three request timeouts later, its request is served, not answered `Timeout`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    early
        .write_all(&encode_frame(&Request::Get {
            key: b"k".to_vec(),
            min_lsn: 0,
        }))
        .await?;
    early.finish()?;
    let r = tokio::time::timeout(HONEST_DEADLINE, raw::read_response(&mut early_rx))
        .await
        .context("no answer")??;
    ensure!(
        code(&r).is_none(),
        "the early stream's request was answered {r:?}"
    );
    Ok(())
}

/// Sends `bytes` on a new stream and holds it open. The node either takes the bytes (`Ok`, the
/// stream stays open until the node answers) or answers before taking them all (`Err` with its
/// answer, usually after stopping the stream).
async fn push(
    conn: quinn::Connection,
    bytes: std::sync::Arc<Vec<u8>>,
) -> Result<std::result::Result<Stalled, ErrorCode>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    match send.write_all(&bytes).await {
        Ok(()) => Ok(Ok(Stalled { _send: send, recv })),
        Err(quinn::WriteError::Stopped(_)) => {
            drop(send);
            let r = raw::read_response(&mut recv).await?;
            Ok(Err(code(&r).with_context(|| format!("{r:?}"))?))
        }
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_length_prefixes_are_refused_before_allocation() -> Result<()> {
    let target = Target::start(&[]).await?;
    let client = Client::connect(&target.ticket).await?;
    honest(&client, "before").await?;
    target.measure();

    // 4 GiB announced on 1,000 streams, half of them before authentication; the prefix is all
    // that is sent.
    let mut conns = Vec::new();
    for i in 0..4 {
        conns.push(if i < 2 {
            raw::connect(&target.ticket).await?
        } else {
            raw::authenticated(&target.ticket).await?
        });
    }
    let mut refused = 0;
    for conn in &conns {
        // In rounds of 50: a connection has 64 streams open at most at the default settings.
        for _ in 0..5 {
            let streams = stall(conn, 50, &u32::MAX.to_le_bytes()).await?;
            for mut s in streams {
                let r = tokio::time::timeout(HONEST_DEADLINE, raw::read_response(&mut s.recv))
                    .await
                    .context("no answer to a 4 GiB prefix")??;
                ensure!(code(&r) == Some(ErrorCode::TooLarge), "{r:?}");
                refused += 1;
            }
        }
    }
    println!("figure: 4 GiB prefix: {refused} streams answered TooLarge");
    let took = honest(&client, "prefix").await?;
    println!("figure: 4 GiB prefix: honest put+get {took:?}");
    target.peak("4 GiB prefix")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_large_frames_are_bounded() -> Result<()> {
    const CONNECTIONS: usize = 4;
    const STREAMS_PER_CONNECTION: usize = 32;
    let target = Target::start(&[("request_timeout_ms", "10000")]).await?;
    let client = Client::connect(&target.ticket).await?;
    honest(&client, "before").await?;
    target.measure();

    // Each stream announces the largest frame the node reads and sends all of it but the last
    // byte: 512 MiB announced in all.
    let mut frame = (MAX_FRAME_BYTES as u32).to_le_bytes().to_vec();
    frame.resize(4 + MAX_FRAME_BYTES - 1, 0x91);
    let frame = std::sync::Arc::new(frame);
    let mut tasks = tokio::task::JoinSet::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let conn = raw::authenticated(&target.ticket).await?;
        for _ in 0..STREAMS_PER_CONNECTION {
            tasks.spawn(push(conn.clone(), frame.clone()));
        }
        conns.push(conn);
    }
    let (mut held, mut busy) = (Vec::new(), 0);
    while let Some(done) = tasks.join_next().await {
        match done?? {
            Ok(stream) => held.push(stream),
            Err(ErrorCode::Busy) => busy += 1,
            Err(other) => bail!("a half-sent frame was answered {other:?}"),
        }
    }

    let took = honest(&client, "half-sent").await?;
    println!("figure: half-sent 4 MiB frames: honest put+get {took:?}");
    target.peak("half-sent 4 MiB frames")?;
    // Every stream is answered: `Busy` at once for those over the budget (the rest of their
    // body read and dropped), `Timeout` for the others.
    let mut timed_out = 0;
    for s in &mut held {
        let r = tokio::time::timeout(Duration::from_secs(60), raw::read_response(&mut s.recv))
            .await
            .context("a half-sent frame was never answered")??;
        match code(&r) {
            Some(ErrorCode::Busy) => busy += 1,
            Some(ErrorCode::Timeout) => timed_out += 1,
            _ => bail!("a half-sent frame was answered {r:?}"),
        }
    }
    println!(
        "figure: half-sent 4 MiB frames: {timed_out} held by the node until Timeout, {busy} answered Busy"
    );
    ensure!(busy > 0 && timed_out > 0);
    drop(held);
    drop(conns);
    target.released(1.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stop_reading_are_bounded() -> Result<()> {
    // Every stream a connection may open at the default settings (64) besides its hello's,
    // whose credit QUIC grants again only in batches.
    const CONNECTIONS: usize = 8;
    const STREAMS_PER_CONNECTION: usize = 63;
    let target = Target::start(&[("request_timeout_ms", "5000")]).await?;
    let client = Client::connect(&target.ticket).await?;
    client
        .put("big", vec![7u8; kappakv_protocol::limits::MAX_VALUE_BYTES])
        .await?;
    honest(&client, "before").await?;
    target.measure();

    // 504 gets of a 1 MiB value whose answers are never read; the attacker's own window is
    // small so that it buffers little itself.
    let get = encode_frame(&Request::Get {
        key: b"big".to_vec(),
        min_lsn: 0,
    });
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(16_384u32.into())
        .keep_alive_interval(Some(Duration::from_secs(1)));
    let transport = std::sync::Arc::new(transport);
    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let endpoint = raw::endpoint_with(&target.ticket, transport.clone())?;
        let conn = raw::dial(&endpoint, &target.ticket).await?;
        raw::hello(&conn, &target.ticket).await?;
        for _ in 0..STREAMS_PER_CONNECTION {
            let (mut send, recv) = conn.open_bi().await?;
            send.write_all(&get).await?;
            send.finish()?;
            streams.push((send, recv));
        }
        conns.push((endpoint, conn));
    }
    // Give the node the time to answer them all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let took = honest(&client, "slow readers").await?;
    println!("figure: slow readers: honest put+get {took:?}");
    target.peak("slow readers")?;
    drop(streams);
    drop(conns);
    target.released(1.0).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_that_stop_reading_are_bounded() -> Result<()> {
    const VALUES: usize = 20;
    const VALUE_BYTES: usize = 256 * 1024;
    const CONNECTIONS: usize = 4;
    const WATCHES_PER_CONNECTION: usize = 40;
    let target = Target::start(&[("request_timeout_ms", "2000")]).await?;
    let client = Client::connect(&target.ticket).await?;
    for i in 0..VALUES {
        client
            .put(format!("big/{i:02}"), vec![b'w'; VALUE_BYTES])
            .await?;
    }
    honest(&client, "before").await?;
    target.measure();

    // 160 watches replaying 5 MiB of changes each, never read: unbounded, each would hold its
    // chunk of changes (and the frame it is stuck sending) until the request timeout ends it.
    let watch = encode_frame(&Request::Watch {
        prefix: b"big/".to_vec(),
        from_lsn: Some(0),
    });
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(16_384u32.into())
        .keep_alive_interval(Some(Duration::from_secs(1)));
    let transport = std::sync::Arc::new(transport);
    let mut conns = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let endpoint = raw::endpoint_with(&target.ticket, transport.clone())?;
        let conn = raw::dial(&endpoint, &target.ticket).await?;
        raw::hello(&conn, &target.ticket).await?;
        for _ in 0..WATCHES_PER_CONNECTION {
            let (mut send, recv) = conn.open_bi().await?;
            send.write_all(&watch).await?;
            streams.push((send, recv));
        }
        conns.push((endpoint, conn));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let took = honest(&client, "stalled watchers").await?;
    println!("figure: stalled watchers: honest put+get {took:?}");
    target.peak("stalled watchers")?;
    // The node ends every stalled watch and releases what it held.
    target.released(1.0 + CONNECTIONS as f64).await?;
    println!(
        "figure: stalled watchers: {} watches ended by the node",
        CONNECTIONS * WATCHES_PER_CONNECTION
    );
    target.peak("stalled watchers, until the last was ended")?;
    drop(streams);
    drop(conns);
    target.released(1.0).await?;

    // A watcher that reads gets every change, each large value in one piece.
    let mut watch = client.watch("big/", Some(0));
    for i in 0..VALUES {
        let change = tokio::time::timeout(HONEST_DEADLINE, watch.next())
            .await
            .context("a change was not sent")?
            .context("the watch ended")??;
        ensure!(change.key == format!("big/{i:02}").into_bytes());
        ensure!(change.version.value.as_ref().map(Vec::len) == Some(VALUE_BYTES));
    }
    Ok(())
}

/// Opens streams on `conn` as fast as it can until `until`, sends a few bytes on each and
/// abandons it; returns how many it opened.
async fn abandon_streams(conn: quinn::Connection, until: Instant) -> Result<u64> {
    let mut n = 0;
    while Instant::now() < until {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[0x10, 0, 0, 0, 0x81]).await?;
        let _ = send.reset(0u32.into());
        let _ = recv.stop(0u32.into());
        n += 1;
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_absorbed() -> Result<()> {
    let target = Target::start(&[]).await?;
    let client = Client::connect(&target.ticket).await?;
    honest(&client, "before").await?;
    target.measure();

    let until = Instant::now() + Duration::from_secs(3);
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..8 {
        let conn = if i % 2 == 0 {
            raw::connect(&target.ticket).await?
        } else {
            raw::authenticated(&target.ticket).await?
        };
        flood.spawn(abandon_streams(conn, until));
    }
    let mut served = 0;
    while Instant::now() < until {
        honest(&client, &format!("flood-{served}")).await?;
        served += 1;
    }
    let mut opened = 0;
    while let Some(n) = flood.join_next().await {
        opened += n??;
    }
    println!(
        "figure: stream flood: {opened} streams opened and abandoned, {served} honest put+get"
    );
    target.peak("stream flood")?;
    target.released(1.0).await?;
    honest(&client, "after").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_does_not_lock_out_new_clients() -> Result<()> {
    const MAX_CONNECTIONS: usize = 64;
    let target = Target::start(&[
        ("max_connections", &MAX_CONNECTIONS.to_string()),
        ("request_timeout_ms", "5000"),
    ])
    .await?;
    let client = Client::connect(&target.ticket).await?;
    honest(&client, "before").await?;
    target.measure();

    // Twice the limit in connections that complete the handshake and never say hello.
    let endpoint = raw::endpoint(&target.ticket)?;
    let mut silent = Vec::new();
    for _ in 0..2 * MAX_CONNECTIONS {
        if let Ok(c) = raw::dial(&endpoint, &target.ticket).await {
            silent.push(c);
        }
    }
    println!(
        "figure: connection flood: {} silent connections accepted",
        silent.len()
    );
    let newcomer = Client::connect(&target.ticket)
        .await
        .context("a new client during a flood of silent connections")?;
    honest(&newcomer, "newcomer").await?;
    honest(&client, "silent flood").await?;

    // Twice the limit in handshakes that are never completed.
    let mut sockets = Vec::new();
    for _ in 0..2 * MAX_CONNECTIONS {
        let initial = raw::initial_packet(&target.ticket).await?;
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let to = target.ticket.addrs[0].ip().context("an IP address")?;
        socket.send_to(&initial, to).await?;
        sockets.push(socket);
    }
    let late = Client::connect(&target.ticket)
        .await
        .context("a new client during a flood of half-open handshakes")?;
    honest(&late, "late").await?;
    honest(&client, "handshake flood").await?;
    target.peak("connection flood")?;
    drop(silent);
    drop(sockets);
    drop(newcomer);
    drop(late);
    target.released(1.0).await?;
    Ok(())
}
