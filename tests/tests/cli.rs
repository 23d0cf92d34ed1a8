//! The `kappakv` command line as an operator meets it: `verify` on a damaged log, an unknown
//! index for `rebuild-indexes`, `config show`, and a setting outside its rule.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use kappakv_tests::{TestNode, command, free_udp_port, run};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A data dir whose log holds `entries` entries, written by an in-process node that was then
/// shut down.
async fn data_dir_with_log(entries: usize) -> anyhow::Result<tempfile::TempDir> {
    let TestNode { server, dir } = TestNode::start().await?;
    let client =
        kappakv_client::Client::connect(&server.ticket(kappakv_server::auth::Role::ReadWrite))
            .await?;
    for i in 0..entries {
        client.put(format!("k{i}"), format!("value {i}")).await?;
    }
    client.close().await;
    server.shutdown().await;
    Ok(dir)
}

/// `kappakv ARGS`, with `env` set and nothing else inherited from `KAPPAKV_*`.
async fn kappakv(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = command("kappakv")?;
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd, TIMEOUT).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Byte offsets of the records of a segment: `u32 length | u32 crc32c | payload`, with
/// little-endian integers.
fn record_offsets(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at + 8 <= segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().expect("4 bytes")) as usize;
        offsets.push((at, len));
        at += 8 + len;
    }
    assert_eq!(at, segment.len(), "the segment is whole records");
    offsets
}

#[tokio::test]
async fn verify_and_serve_name_the_segment_and_offset_of_a_flipped_byte() -> anyhow::Result<()> {
    let dir = data_dir_with_log(20).await?;
    let ok = kappakv(&["verify", "--data-dir", path_arg(dir.path())], &[]).await?;
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    let segment: PathBuf = dir.path().join("log/00000000000000000000.log");
    let mut bytes = std::fs::read(&segment)?;
    let records = record_offsets(&bytes);
    assert_eq!(records.len(), 20);
    let damaged = 9;
    let (offset, len) = records[damaged];
    bytes[offset + 8 + len / 2] ^= 0x40;
    std::fs::write(&segment, &bytes)?;

    let out = kappakv(&["verify", "--data-dir", path_arg(dir.path())], &[]).await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "verify accepted a damaged log");
    assert!(
        stderr.contains(path_arg(&segment)),
        "names the segment file: {stderr}"
    );
    assert!(
        stderr.contains(&format!("offset {offset} ")),
        "names the damaged record's offset {offset}: {stderr}"
    );
    assert!(
        stderr.contains(&format!("lsn {}", damaged + 1)),
        "names its LSN: {stderr}"
    );
    assert!(
        !stderr.contains("torn tail"),
        "records follow it: not a torn tail: {stderr}"
    );

    // The node refuses to start on it rather than skip or truncate the damage.
    let listen = format!("127.0.0.1:{}", free_udp_port()?);
    let serve = kappakv(
        &[
            "serve",
            "--data-dir",
            path_arg(dir.path()),
            "--listen",
            &listen,
        ],
        &[("KAPPAKV_ADMIN_LISTEN", "off")],
    )
    .await?;
    let stderr = text(&serve.stderr);
    assert!(!serve.status.success(), "serve started on a damaged log");
    assert!(
        stderr.contains(path_arg(&segment)) && stderr.contains(&format!("offset {offset}")),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&segment)?,
        bytes,
        "nothing was truncated or repaired"
    );
    Ok(())
}

#[tokio::test]
async fn rebuild_indexes_of_an_unknown_index_lists_the_known_ones() -> anyhow::Result<()> {
    let dir = data_dir_with_log(3).await?;
    let out = kappakv(
        &[
            "rebuild-indexes",
            "--data-dir",
            path_arg(dir.path()),
            "--index",
            "nosuch",
        ],
        &[],
    )
    .await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("nosuch"), "{stderr}");
    for view in kappakv_indexes::default_views() {
        assert!(
            stderr.contains(view.name()),
            "lists the index `{}`: {stderr}",
            view.name()
        );
    }
    Ok(())
}

/// Every setting's name.
fn setting_names() -> anyhow::Result<BTreeSet<String>> {
    let serde_json::Value::Object(settings) =
        serde_json::to_value(kappakv_server::Config::default())?
    else {
        anyhow::bail!("the configuration is not a map");
    };
    Ok(settings.keys().cloned().collect())
}

#[tokio::test]
async fn config_show_lists_every_setting_with_its_source() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("kappakv.toml");
    std::fs::write(&file, "request_timeout_ms = 1234\nmax_connections = 5\n")?;
    let out = kappakv(
        &[
            "config",
            "show",
            "--config",
            path_arg(&file),
            "--listen",
            "127.0.0.1:7777",
        ],
        &[("KAPPAKV_MAX_CONNECTIONS", "7")],
    )
    .await?;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // `name = value  # source`
    let mut shown = BTreeMap::new();
    for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
        let (setting, source) = line
            .rsplit_once("  # ")
            .unwrap_or_else(|| panic!("no source on {line:?}"));
        let (name, value) = setting
            .split_once(" = ")
            .unwrap_or_else(|| panic!("not `name = value`: {line:?}"));
        shown.insert(name.to_string(), (value.to_string(), source.to_string()));
    }
    let names: BTreeSet<String> = shown.keys().cloned().collect();
    assert_eq!(names, setting_names()?, "every setting, once:\n{stdout}");

    let expect = [
        ("request_timeout_ms", "1234", "file"),
        ("max_connections", "7", "env"),
        ("listen", "\"127.0.0.1:7777\"", "flag"),
        ("data_dir", "\"kappakv.data\"", "default"),
    ];
    for (name, value, source) in expect {
        assert_eq!(
            shown[name],
            (value.to_string(), source.to_string()),
            "{name}:\n{stdout}"
        );
    }
    let sources: BTreeSet<&str> = shown.values().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        sources,
        BTreeSet::from(["default", "file", "env", "flag"]),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn an_invalid_setting_stops_serve_with_one_line_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_udp_port()?);
    let out = kappakv(
        &[
            "serve",
            "--data-dir",
            path_arg(&data_dir),
            "--listen",
            &listen,
        ],
        &[("KAPPAKV_MAX_CONNECTIONS", "0")],
    )
    .await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    let line = lines[0];
    assert!(
        line.contains("max_connections"),
        "names the setting: {line}"
    );
    assert!(line.contains("= 0"), "names the value: {line}");
    assert!(line.contains("at least 1"), "names the rule: {line}");
    assert!(
        !data_dir.exists(),
        "settings are checked before anything is created"
    );
    Ok(())
}

/// How many times `needle` occurs in `haystack`.
fn occurrences(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[tokio::test]
async fn a_failure_names_its_cause_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;

    // A port that is taken.
    let taken = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let listen = taken.local_addr()?.to_string();
    let out = kappakv(
        &[
            "serve",
            "--data-dir",
            path_arg(&dir.path().join("serve")),
            "--listen",
            &listen,
        ],
        &[("KAPPAKV_ADMIN_LISTEN", "off")],
    )
    .await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&listen), "{stderr}");
    assert_eq!(occurrences(&stderr, "in use"), 1, "{stderr}");

    // A data dir that does not exist.
    let missing = dir.path().join("missing");
    let out = kappakv(&["rebuild-indexes", "--data-dir", path_arg(&missing)], &[]).await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(occurrences(&stderr, "No such file"), 1, "{stderr}");
    Ok(())
}

#[tokio::test]
async fn logs_written_to_a_pipe_carry_no_colour_codes() -> anyhow::Result<()> {
    let dir = data_dir_with_log(3).await?;
    // Standard error is a pipe here: the lines a file or journald would keep.
    // A sync whose other side is gone at once: the node opens (logging at info), then fails.
    let out = kappakv(
        &["sync", "--stdio", "--data-dir", path_arg(dir.path())],
        &[("RUST_LOG", "info")],
    )
    .await?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("INFO"), "no log line to check: {stderr}");
    assert!(stderr.contains("sync failed"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "colour codes in {stderr:?}");
    Ok(())
}

#[tokio::test]
async fn both_binaries_print_completion_scripts_that_bash_parses() -> anyhow::Result<()> {
    for (binary, subcommand) in [("kappakv", "rebuild-indexes"), ("kappactl", "watch")] {
        let mut cmd = command(binary)?;
        cmd.args(["completions", "bash"]);
        let out = run(&mut cmd, TIMEOUT).await?;
        let script = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(script.contains(subcommand), "{binary}: {script}");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join(binary);
        std::fs::write(&path, &script)?;
        let mut bash = std::process::Command::new("bash");
        bash.arg("-n").arg(&path);
        let checked = run(&mut bash, TIMEOUT).await?;
        assert!(
            checked.status.success(),
            "bash -n: {}",
            text(&checked.stderr)
        );
    }
    Ok(())
}
