//! A `geo` index through real processes: declared in the config of two nodes that replicate,
//! points written on both give equal answers to box and nearest queries on both (through the
//! client library and `kappactl query --bbox/--near`); a moved point leaves its old box, a
//! deleted key leaves the index, and a changed definition is rebuilt while the node serves.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kappakv_client::{Client, IndexQuery, QueryOptions};
use kappakv_tests::{ProcessNode, command, eventually, free_udp_port, run, serve_command};
use serde_json::{Value, json};

const MAP: &str = "\
[[index]]
name = \"map\"
prefix = \"map/\"
kind = \"geo\"
";

/// The same index, its point read from `pos.lat` and `pos.lon`.
const MAP_BY_POS: &str = "\
[[index]]
name = \"map\"
prefix = \"map/\"
kind = \"geo\"
fields = [\"pos.lat\", \"pos.lon\"]
";

const DEMO_BOX: (f64, f64, f64, f64) = (61.0, 65.0, -148.0, -144.0);

async fn start(data_dir: &Path, addr: SocketAddr, config: &str) -> anyhow::Result<ProcessNode> {
    let file = data_dir.with_extension("toml");
    std::fs::write(&file, config)?;
    let mut cmd = serve_command(data_dir, addr)?;
    cmd.arg("--config").arg(&file);
    ProcessNode::spawn(cmd, data_dir, addr).await
}

/// Every key the query finds, a page of one at a time, with the distances of a near query.
async fn all(client: &Client, q: IndexQuery) -> anyhow::Result<(Vec<String>, Vec<f64>)> {
    let (mut keys, mut distances, mut next) = (Vec::new(), Vec::new(), None);
    loop {
        let mut options = QueryOptions::new(q.clone())
            .limit(1)
            .wait(Duration::from_secs(20));
        if let Some(cursor) = next.take() {
            options = options.start_after(cursor);
        }
        let page = client.query("map", &options).await?;
        keys.extend(
            page.items
                .iter()
                .map(|g| String::from_utf8_lossy(&g.key).into_owned()),
        );
        distances.extend(page.distances_m);
        match page.next {
            Some(cursor) => next = Some(cursor),
            None => return Ok((keys, distances)),
        }
    }
}

async fn in_box(client: &Client) -> anyhow::Result<Vec<String>> {
    let (a, b, c, d) = DEMO_BOX;
    let (mut keys, _) = all(client, IndexQuery::bbox(a, b, c, d)).await?;
    keys.sort();
    Ok(keys)
}

fn point(lat: f64, lon: f64) -> Value {
    json!({"lat": lat, "lon": lon})
}

/// `kappactl query map ARGS --json` on `node`, one JSON object per line.
async fn kappactl_query(node: &ProcessNode, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut cmd = command("kappactl")?;
    cmd.args([
        "--ticket",
        &node.ticket()?.to_string(),
        "query",
        "map",
        "--json",
    ])
    .args(args);
    let out = run(&mut cmd, Duration::from_secs(30)).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_geo_index_answers_equally_on_two_nodes_and_follows_the_log() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a_data, b_data) = (dir.path().join("a"), dir.path().join("b"));
    let a_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let b_addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let mut a = start(&a_data, a_addr, MAP).await?;
    let b = start(&b_data, b_addr, MAP).await?;
    let (a_client, b_client) = (a.client().await?, b.client().await?);
    let (a_id, b_id) = (
        a_client.status().await?.node_id.expect("a's id"),
        b_client.status().await?.node_id.expect("b's id"),
    );
    a_client.peer_add(b_id, b_addr.to_string()).await?;
    b_client.peer_add(a_id, a_addr.to_string()).await?;

    // The seed's demo, written on both nodes, and points elsewhere.
    a_client.put_json("map/A", &point(64.5, -147.6)).await?;
    a_client.put_json("map/B", &point(63.9, -147.6)).await?;
    b_client.put_json("map/C", &point(64.2, -146.5)).await?;
    b_client.put_json("map/far", &point(-33.9, 151.2)).await?;
    b_client
        .put_json("map/dateline", &point(0.0, 179.99))
        .await?;
    b_client.put_json("map/bad", &point(95.0, 0.0)).await?;
    eventually("both nodes hold every point", || async {
        Ok(in_box(&a_client).await? == ["map/A", "map/B", "map/C"]
            && in_box(&b_client).await? == ["map/A", "map/B", "map/C"])
    })
    .await?;
    let near = IndexQuery::near(64.5, -147.6);
    let (a_near, a_dist) = all(&a_client, near.clone()).await?;
    assert_eq!(
        a_near,
        ["map/A", "map/C", "map/B", "map/dateline", "map/far"]
    );
    assert!(a_dist[0].abs() < f64::EPSILON, "{a_dist:?}");
    assert_eq!(all(&b_client, near).await?, (a_near, a_dist));
    let (across, _) = all(&b_client, IndexQuery::bbox(-1.0, 1.0, 179.0, -179.0)).await?;
    assert_eq!(across, ["map/dateline"], "a box across the antimeridian");

    // kappactl: the box, and the two nearest with their distances.
    let boxed = kappactl_query(&a, &["--bbox", "61,65,-148,-144"]).await?;
    let mut keys: Vec<&str> = boxed.iter().filter_map(|v| v["key"].as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["map/A", "map/B", "map/C"], "{boxed:?}");
    let nearest = kappactl_query(&a, &["--near", "64.5,-147.6", "--limit", "2"]).await?;
    assert_eq!(nearest.len(), 2, "{nearest:?}");
    assert_eq!(nearest[0]["key"], "map/A");
    assert_eq!(nearest[0]["distance_m"], 0.0);
    let second = nearest[1]["distance_m"].as_f64().expect("a distance");
    assert!((50_000.0..70_000.0).contains(&second), "{nearest:?}");

    // A point moved on B leaves the box on A; a key deleted on A leaves it on B.
    b_client.put_json("map/A", &point(10.0, 10.0)).await?;
    a_client.delete("map/B").await?;
    eventually("the move and the delete on both nodes", || async {
        Ok(in_box(&a_client).await? == ["map/C"] && in_box(&b_client).await? == ["map/C"])
    })
    .await?;

    // A changed definition: A rebuilds the index from its log while it serves.
    a_client
        .put_json(
            "map/D",
            &json!({"lat": 0.0, "lon": 0.0, "pos": {"lat": 64.3, "lon": -147.0}}),
        )
        .await?;
    drop(a_client);
    a.stop_with(libc::SIGTERM)?;
    let a = start(&a_data, a_addr, MAP_BY_POS).await?;
    let a_client = a.client().await?;
    assert!(a_client.get("map/C").await?.value().is_some());
    assert_eq!(in_box(&a_client).await?, ["map/D"]);
    Ok(())
}
