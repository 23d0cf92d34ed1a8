//! `kappactl` as a script sees it: output shapes and exit statuses, against the in-process
//! stand-in node.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::MockNode;
use serde_json::{Value, json};

fn kappactl(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kappactl"));
    cmd.args(args)
        .env_remove("KAPPAKV_TICKET")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// Runs kappactl off the async runtime, so the node keeps answering meanwhile.
async fn run(ticket: &str, args: &[&str]) -> Output {
    run_with_stdin(ticket, args, None).await
}

async fn run_with_stdin(ticket: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut all = vec![
        "--ticket".to_string(),
        ticket.to_string(),
        "--connect-timeout".into(),
        "1".into(),
    ];
    all.extend(args.iter().map(ToString::to_string));
    let stdin = stdin.map(<[u8]>::to_vec);
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        kappactl(&refs, stdin.as_deref())
    })
    .await
    .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}, stderr: {}",
        o.status.code(),
        stderr(o)
    );
    stdout(o)
}

fn json_of(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_scan_batch_and_status() {
    let node = MockNode::start();
    let t = node.ticket().to_string();

    let id = ok(&run(&t, &["put", "k", "v1"]).await);
    assert_eq!(id.trim().len(), 64, "{id}");
    let got = json_of(&run(&t, &["get", "k", "--json"]).await);
    assert_eq!(got["key"], json!("k"));
    assert_eq!(got["values"][0]["value"], json!("v1"));
    assert_eq!(got["values"][0]["id"], json!(id.trim()));
    assert_eq!(got["values"][0]["author"], json!(node.node_id.to_hex()));
    // RFC 3339, UTC, with milliseconds; the clock's raw value beside it.
    let time = got["values"][0]["timestamp"]
        .as_str()
        .expect("a time string");
    assert_eq!(time.len(), "2026-12-06T01:02:03.456Z".len(), "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
    assert!(got["values"][0]["hlc"].is_u64());
    assert_eq!(got["context"], json!(id.trim()));

    let missing = run(&t, &["get", "nothing", "--json"]).await;
    assert_eq!(
        json_of(&missing),
        json!({"key": "nothing", "values": [], "context": ""})
    );

    // Binary values: read from stdin, never printed raw unless asked.
    let bytes = [0u8, 0xff, 0xfe, b'\n'];
    ok(&run_with_stdin(&t, &["put", "bin", "-"], Some(&bytes)).await);
    let got = json_of(&run(&t, &["get", "bin", "--json"]).await);
    assert_eq!(got["values"][0]["value"], json!({"base64": "AP/+Cg=="}));
    assert!(ok(&run(&t, &["get", "bin"]).await).starts_with("base64:AP/+Cg==\ncontext: "));
    assert_eq!(run(&t, &["get", "bin", "--raw"]).await.stdout, bytes);

    // Siblings (a put with an empty context supersedes nothing), shown with ids, then merged.
    ok(&run(&t, &["put", "k", "v2", "--supersedes", ""]).await);
    let human = ok(&run(&t, &["get", "k"]).await);
    assert!(human.starts_with("2 concurrent values"), "{human}");
    let context = human
        .lines()
        .last()
        .unwrap()
        .strip_prefix("context: ")
        .unwrap()
        .to_string();
    ok(&run(&t, &["put", "k", "merged", "--supersedes", &context]).await);
    let got = json_of(&run(&t, &["get", "k", "--json"]).await);
    assert_eq!(got["values"].as_array().unwrap().len(), 1);
    assert_eq!(got["values"][0]["value"], json!("merged"));

    let dir = std::env::temp_dir().join(format!("kappactl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("batch.jsonl");
    std::fs::write(
        &file,
        "{\"key\":\"s/1\",\"value\":\"a\"}\n{\"key\":\"s/2\",\"value\":\"b\"}\n{\"key\":\"s/3\",\"value\":\"c\"}\n",
    )
    .unwrap();
    ok(&run(&t, &["batch", file.to_str().unwrap()]).await);
    std::fs::remove_dir_all(&dir).unwrap();
    let lines = ok(&run(&t, &["scan", "--prefix", "s/", "--json"]).await);
    let keys: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["key"].clone())
        .collect();
    assert_eq!(keys, vec![json!("s/1"), json!("s/2"), json!("s/3")]);
    assert_eq!(
        ok(&run(&t, &["scan", "--prefix", "s/", "--limit", "2"]).await),
        "s/1\ta\ns/2\tb\n"
    );

    let status = json_of(&run(&t, &["status", "--json"]).await);
    assert_eq!(status["node_id"], json!(node.node_id.to_hex()));
    for field in ["log_lsn", "indexed_lsn", "version_vector", "peers"] {
        assert!(status.get(field).is_some(), "status lacks {field}");
    }

    let changes = ok(&run(
        &t,
        &[
            "watch", "--prefix", "s/", "--from", "0", "--count", "2", "--json",
        ],
    )
    .await);
    let changes: Vec<Value> = changes
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["key"], json!("s/1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses() {
    let node = MockNode::start();
    let t = node.ticket().to_string();

    let mut bad = node.ticket();
    bad.token = "wrong".into();
    let o = run(&bad.to_string(), &["get", "k"]).await;
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(stderr(&o).contains("refused the token"), "{}", stderr(&o));

    let mut other = node.ticket();
    other.node_id = kappakv_protocol::NodeId([7; 32]);
    let o = run(&other.to_string(), &["get", "k"]).await;
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains(&format!("the node at {} is not", node.addr)),
        "{}",
        stderr(&o)
    );

    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut nowhere = node.ticket();
    nowhere.addrs = vec![silent.local_addr().unwrap().into()];
    let o = run(&nowhere.to_string(), &["get", "k"]).await;
    assert_eq!(o.status.code(), Some(3));

    let o = run(&t, &["put", "k", "v", "--supersedes", "not-a-context"]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).starts_with("kappactl: bad --supersedes"),
        "{}",
        stderr(&o)
    );
    assert_eq!(run(&t, &["frobnicate"]).await.status.code(), Some(2));

    // The stand-in does not know peers: the node's error is exit 5.
    let o = run(&t, &["peer", "list"]).await;
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);

    let dir = std::env::temp_dir().join(format!("kappactl-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || kappactl(&["--data-dir", dir.to_str().unwrap(), "get", "k"], None)
    })
    .await
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(o.status.code(), Some(3));
    let msg = stderr(&o);
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert!(
        msg.contains("client.ticket") && msg.contains("--ticket"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_the_json_shape() {
    let node = MockNode::start();
    let t = node.ticket().to_string();
    for op in ["put", "mixed", "batch"] {
        let o = run(
            &t,
            &[
                "bench",
                "--op",
                op,
                "--clients",
                "4",
                "--requests",
                "200",
                "--keys",
                "50",
                "--json",
            ],
        )
        .await;
        let v = json_of(&o);
        assert_eq!(v["op"], json!(op));
        assert_eq!(v["clients"], json!(4));
        assert_eq!(v["ops"], json!(200), "{v}");
        assert_eq!(v["errors"], json!(0));
        assert!(v["seconds"].as_f64().unwrap() > 0.0);
        assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0);
        let lat = &v["latency_us"];
        let (p50, p99, max) = (
            lat["p50"].as_u64().unwrap(),
            lat["p99"].as_u64().unwrap(),
            lat["max"].as_u64().unwrap(),
        );
        assert!(
            p50 <= lat["p90"].as_u64().unwrap() && p99 <= max && p50 > 0,
            "{lat}"
        );
    }
    // Open loop: 100 requests due over ~0.5 s.
    let o = run(
        &t,
        &[
            "bench",
            "--op",
            "get",
            "--clients",
            "2",
            "--requests",
            "100",
            "--rate",
            "200",
            "--keys",
            "10",
            "--json",
        ],
    )
    .await;
    let v = json_of(&o);
    assert_eq!(v["ops"], json!(100));
    assert!(v["seconds"].as_f64().unwrap() >= 0.45, "{v}");
}
