//! Addresses that work from elsewhere, through real processes: a node on a wildcard address with
//! `--advertise localhost:PORT` is reached through its ticket by name; without it, its ticket
//! lists the machine's interface addresses, loopback last; `kappakv id` shows what the node
//! serves, running or stopped. Traffic goes to loopback only: the tickets of the second test are
//! read, never dialled at their other addresses.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use kappakv_client::{Client, NodeAddr, Ticket};
use kappakv_tests::{ProcessNode, command, free_udp_port, run};

/// `kappakv id` for `data_dir`.
async fn id(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let mut cmd = command("kappakv")?;
    cmd.args(["id", "--data-dir"]).arg(data_dir);
    let out = run(&mut cmd, Duration::from_secs(30)).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn written_ticket(data_dir: &std::path::Path) -> anyhow::Result<(String, Ticket)> {
    let text = std::fs::read_to_string(data_dir.join("client.ticket"))?;
    let ticket = text.trim().parse()?;
    Ok((text, ticket))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_on_a_wildcard_address_is_reached_by_the_name_it_advertises() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let port = free_udp_port()?;
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let mut node =
        ProcessNode::start_in(&data, listen, &[("advertise", format!("localhost:{port}"))]).await?;

    let (text, ticket) = written_ticket(&data)?;
    assert_eq!(
        ticket.addrs,
        [NodeAddr::Name {
            host: "localhost".into(),
            port
        }],
        "{text}"
    );
    // The ticket as written: the client resolves the name and dials what it finds.
    let client = Client::connect(&ticket).await?;
    client.put("k", "v").await?;
    assert_eq!(client.get("k").await?.value(), Some(&b"v"[..]));

    let shown = id(&data).await?;
    assert!(
        shown.contains(&format!("@localhost:{port}/")),
        "id while serving: {shown}"
    );
    node.stop_with(libc::SIGTERM)?;
    let shown = id(&data).await?;
    assert!(
        shown.contains(&format!("addresses:         localhost:{port}")),
        "id once stopped: {shown}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_advertise_a_wildcard_node_lists_its_interface_addresses() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let port = free_udp_port()?;
    let listen = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    // Ready once a client reaches it through the loopback address of its ticket.
    let _node = ProcessNode::start_in(&data, listen, &[]).await?;

    let (text, ticket) = written_ticket(&data)?;
    let loopback = NodeAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    assert_eq!(
        ticket.addrs.last(),
        Some(&loopback),
        "loopback last: {text}"
    );
    assert!(
        ticket.addrs.iter().all(|a| a.port() == port),
        "the serving port everywhere: {text}"
    );
    // The address this machine would send from: found without sending anything (a UDP
    // socket's connect only picks a route). Where the machine has one, the ticket lists it.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0")?;
    match probe
        .connect("192.0.2.1:9")
        .and_then(|()| probe.local_addr())
    {
        Ok(local) if !local.ip().is_loopback() && !local.ip().is_unspecified() => {
            let own = NodeAddr::from(SocketAddr::new(local.ip(), port));
            assert!(ticket.addrs.contains(&own), "{own} missing from {text}");
        }
        _ => eprintln!("this machine has no route off loopback: only loopback to check"),
    }

    let shown = id(&data).await?;
    assert!(
        shown.contains(&format!("127.0.0.1:{port}")) && !shown.contains(":7700"),
        "id shows the serving port: {shown}"
    );
    Ok(())
}
