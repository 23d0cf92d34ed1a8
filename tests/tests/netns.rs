//! Replication under real network faults: three `kappakv serve` processes, each in its own
//! network namespace, joined by veth pairs to a bridge in a fourth namespace (the hub), with the
//! faults made by nftables rules on that bridge (`tc netem` is not there on every kernel):
//!
//! - a full partition of one node,
//! - a one-way cut: one node hears the others but is not heard,
//! - 10% random loss on every link.
//!
//! The same network carries the local discovery test: nodes that share a swarm secret find
//! each other by multicast on the bridge; a node with another secret joins none of them.
//!
//! During each fault, clients on every side write: unique keys, the same keys from both sides of
//! the cut, and values that a later write supersedes. After the heal, within 10 s, the three
//! nodes hold the same log entries and the same kv view, every acknowledged write is there,
//! the concurrent writes are siblings, and no node ever shows a superseded value again.
//!
//! It needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2 and nftables (`apt-get install -y
//! nftables`). Without them each test says what is missing and passes without running.
//!
//! Nothing is added to the machine's own namespace: the bridge and the rules live in the hub,
//! and the test's clients reach each node from a thread that has entered the node's namespace,
//! so the subnet cannot clash with the machine's networks. Namespace names carry the test
//! process's id; those of a test process that is gone are removed at the next start.

#![cfg(target_os = "linux")]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::StreamExt as _;
use kappakv_client::{Client, ScanOptions};
use kappakv_protocol::{
    Context, EntryId, KeyVersions, NodeId, PeerOrigin, PeerStatus, Status, Ticket,
};
use kappakv_server::log::LogReader;
use kappakv_tests::binary;

/// The nodes' subnet. It exists only inside this test's namespaces.
const SUBNET: &str = "10.77.0";
const PORT: u16 = 7700;
const NAMES: [&str; 3] = ["a", "b", "c"];
/// Prefix of every namespace this test creates.
const NS_PREFIX: &str = "kvnetns";
/// The promise under test: after a heal, views and logs are equal within this long.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);
/// Unique-key writers per node during a fault, and the pause between a writer's writes.
const WRITERS_PER_NODE: usize = 2;
const WRITE_EVERY: Duration = Duration::from_millis(20);
/// Only to avoid hanging: a node that is not up by then has failed to start.
const START_DEADLINE: Duration = Duration::from_secs(30);

/// The tests share the machine's two cores; one cluster at a time keeps their timing honest.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn addr_of(i: usize) -> SocketAddr {
    format!("{SUBNET}.{}:{PORT}", i + 1)
        .parse()
        .expect("a valid address")
}

fn ip_of(i: usize) -> String {
    format!("{SUBNET}.{}", i + 1)
}

/// Prints past the test harness's capture, so a skip is visible in a plain `cargo test` run.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// Runs a short set-up command to its end.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {program} {args:?}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// Runs a set-up command; fails with its standard error unless it succeeds.
fn must(program: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let out = run(program, args, stdin)?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The namespaces, the bridge and the fault table. Dropping it deletes the namespaces, which
/// takes the veth pairs and the bridge with them.
struct Net {
    hub: String,
    nodes: Vec<String>,
    /// Every namespace created so far, deleted on drop whatever step failed.
    created: Vec<String>,
}

/// Why the test cannot run here.
struct Skip(String);

impl Net {
    /// Checks the tools and rights, then builds the network. `Err(Skip)` means this machine
    /// cannot run the test; any failure after the checks is a real error.
    fn create(tag: &str) -> Result<std::result::Result<Self, Skip>> {
        if run("ip", &["-V"], None).is_err() {
            return Ok(Err(Skip("iproute2's `ip` is not installed".into())));
        }
        if !run("nft", &["--version"], None).is_ok_and(|o| o.status.success()) {
            return Ok(Err(Skip(
                "`nft` is not installed (apt-get install -y nftables)".into(),
            )));
        }
        remove_leftovers();
        let base = format!("{NS_PREFIX}-{}-{tag}", std::process::id());
        let mut net = Self {
            hub: format!("{base}-hub"),
            nodes: NAMES.iter().map(|n| format!("{base}-{n}")).collect(),
            created: Vec::new(),
        };
        let hub = net.hub.clone();
        let out = run("ip", &["netns", "add", &hub], None)?;
        if !out.status.success() {
            return Ok(Err(Skip(format!(
                "cannot create a network namespace (root, or CAP_SYS_ADMIN and CAP_NET_ADMIN, \
                 is needed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        net.created.push(hub.clone());
        must(
            "ip",
            &["-n", &hub, "link", "add", "br0", "type", "bridge"],
            None,
        )?;
        // Multicast (local discovery) floods the bridge, whatever IGMP says.
        must(
            "ip",
            &[
                "-n",
                &hub,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
            None,
        )?;
        must("ip", &["-n", &hub, "link", "set", "br0", "up"], None)?;
        let table = "table bridge kvfault {\n  chain forward {\n    \
                     type filter hook forward priority 0; policy accept;\n  }\n}\n";
        let out = run(
            "ip",
            &["netns", "exec", &hub, "nft", "-f", "-"],
            Some(table),
        )?;
        if !out.status.success() {
            return Ok(Err(Skip(format!(
                "nftables cannot filter bridged packets here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))));
        }
        for (i, ns) in net.nodes.clone().iter().enumerate() {
            must("ip", &["netns", "add", ns], None)?;
            net.created.push(ns.clone());
            let port = format!("v{}", NAMES[i]);
            must(
                "ip",
                &[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", ns,
                ],
                None,
            )?;
            must(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "br0", "up"],
                None,
            )?;
            let cidr = format!("{}/24", ip_of(i));
            must("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"], None)?;
            must("ip", &["-n", ns, "link", "set", "eth0", "up"], None)?;
            must("ip", &["-n", ns, "link", "set", "lo", "up"], None)?;
        }
        Ok(Ok(net))
    }

    /// Replaces the fault rules on the bridge with `rules`, atomically.
    fn set_faults(&self, rules: &[String]) -> Result<()> {
        let mut script = String::from("flush chain bridge kvfault forward\n");
        for rule in rules {
            writeln!(script, "add rule bridge kvfault forward {rule}")?;
        }
        must(
            "ip",
            &["netns", "exec", &self.hub, "nft", "-f", "-"],
            Some(&script),
        )
    }

    fn heal(&self) -> Result<()> {
        self.set_faults(&[])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = run("ip", &["netns", "del", ns], None);
        }
    }
}

/// Removes the namespaces of test processes that are gone (killed before their clean-up ran),
/// and stops the nodes still running in them.
fn remove_leftovers() {
    let Ok(out) = run("ip", &["netns", "list"], None) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(pids) = run("ip", &["netns", "pids", name], None) {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run("kill", &["-KILL", pid], None);
            }
        }
        let _ = run("ip", &["netns", "del", name], None);
    }
}

/// Runs `f` on a new thread inside the network namespace `ns`, on a runtime of its own, so every
/// socket it opens is in that namespace. Starts at once; the returned future waits for it.
fn in_ns<T, F, Fut>(ns: &str, f: F) -> impl Future<Output = Result<T>> + use<T, F, Fut>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let path = Path::new("/run/netns").join(ns);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            let result = (|| {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("entering {}", path.display()))?;
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(f())
            })();
            let _ = tx.send(result);
        });
    async move {
        spawned?;
        rx.await
            .context("the namespace thread ended without an answer")?
    }
}

/// A child process, killed when dropped.
struct Proc(Option<Child>);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `kappakv serve` inside a namespace.
struct NsNode {
    name: &'static str,
    ns: String,
    addr: SocketAddr,
    data_dir: PathBuf,
    /// Its standard error, shown when it fails.
    log: PathBuf,
    process: Proc,
    ticket: Ticket,
}

impl NsNode {
    async fn start(i: usize, ns: &str, dir: &Path) -> Result<Self> {
        Self::start_with(i, ns, dir, &[]).await
    }

    /// [`start`](Self::start) with settings in `env` (`KAPPAKV_*`).
    async fn start_with(i: usize, ns: &str, dir: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let name = NAMES[i];
        let data_dir = dir.join(name);
        let log = dir.join(format!("{name}.log"));
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        let addr = addr_of(i);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(binary("kappakv")?)
            .args(["serve", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", &addr.to_string()]);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KAPPAKV_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(env.iter().copied());
        // `ip netns exec` execs the program in place, so the child's pid is the node's.
        let mut process = Proc(Some(
            cmd.env("KAPPAKV_ADMIN_LISTEN", "off")
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?)
                .spawn()?,
        ));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = process.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("node {name} exited early with {status}: {}", log_text());
            }
            if let Ok(text) = std::fs::read_to_string(data_dir.join("client.ticket"))
                && let Ok(ticket) = text.trim().parse::<Ticket>()
                && with_client(ns, &ticket, |_| async { Ok(()) }).await.is_ok()
            {
                return Ok(Self {
                    name,
                    ns: ns.to_string(),
                    addr,
                    data_dir,
                    log,
                    process,
                    ticket,
                });
            }
            if Instant::now() > deadline {
                bail!("node {name} did not answer: {}", log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn node_id(&self) -> NodeId {
        self.ticket.node_id
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `f` with a client connected from inside the node's namespace.
    fn client<T, F, Fut>(&self, f: F) -> impl Future<Output = Result<T>> + use<T, F, Fut>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>>,
    {
        with_client(&self.ns, &self.ticket, f)
    }

    /// Stops the node with SIGTERM, as an operator would.
    async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.process.0.take() else {
            return Ok(());
        };
        must("kill", &["-TERM", &child.id().to_string()], None)?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = child.try_wait()? {
                ensure!(
                    status.success(),
                    "node {} stopped with {status}: {}",
                    self.name,
                    self.log_text()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("node {} did not stop on SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Runs `f` with a client of `ticket`, connected from inside the namespace `ns`.
fn with_client<T, F, Fut>(
    ns: &str,
    ticket: &Ticket,
    f: F,
) -> impl Future<Output = Result<T>> + use<T, F, Fut>
where
    T: Send + 'static,
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T>>,
{
    let ticket = ticket.clone();
    in_ns(ns, move || async move {
        let client = Client::connect(&ticket).await?;
        let out = f(client.clone()).await;
        client.close().await;
        out
    })
}

/// Three peered nodes on the namespaced network. Fields drop in order: the nodes are killed
/// before their namespaces go, and the data dirs last.
struct Cluster {
    nodes: Vec<NsNode>,
    net: Net,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// The cluster, or `None` (with the reason printed) where this machine cannot run it.
    async fn start(tag: &str) -> Result<Option<Self>> {
        let net = match Net::create(tag)? {
            Ok(net) => net,
            Err(Skip(why)) => {
                say(&format!("netns test {tag} skipped: {why}"));
                return Ok(None);
            }
        };
        let dir = tempfile::tempdir()?;
        let mut cluster = Self {
            nodes: Vec::new(),
            net,
            dir,
        };
        for i in 0..NAMES.len() {
            let node = NsNode::start(i, &cluster.net.nodes[i], cluster.dir.path()).await?;
            cluster.nodes.push(node);
        }
        for i in 0..NAMES.len() {
            let others: Vec<(NodeId, SocketAddr)> = (0..NAMES.len())
                .filter(|&j| j != i)
                .map(|j| (cluster.nodes[j].node_id(), cluster.nodes[j].addr))
                .collect();
            cluster.nodes[i]
                .client(move |c| async move {
                    for (id, addr) in others {
                        c.peer_add(id, addr.to_string()).await?;
                    }
                    Ok(())
                })
                .await?;
        }
        Ok(Some(cluster))
    }

    /// Every node's status and full scan, read at once.
    async fn observe(&self) -> Result<Vec<(Status, Vec<KeyVersions>)>> {
        let reads: Vec<_> = self
            .nodes
            .iter()
            .map(|n| {
                n.client(|c| async move {
                    let status = c.status().await?;
                    let items: Vec<_> = c.scan(ScanOptions::all()).collect().await;
                    let view = items.into_iter().collect::<Result<Vec<_>, _>>()?;
                    Ok((status, view))
                })
            })
            .collect();
        let mut out = Vec::new();
        for read in reads {
            out.push(read.await?);
        }
        Ok(out)
    }

    /// Polls until the three nodes have equal logs and views, failing at `deadline`. Every
    /// observation along the way is checked against `watched`: once a node has shown a value
    /// that supersedes another, it must never show the superseded one again.
    async fn converge(
        &self,
        deadline: Instant,
        watched: &[Superseded],
    ) -> Result<Vec<(Status, Vec<KeyVersions>)>> {
        let mut seen_newer = vec![BTreeSet::<usize>::new(); self.nodes.len()];
        loop {
            let observed = self.observe().await?;
            for (n, (_, view)) in observed.iter().enumerate() {
                for (w, sup) in watched.iter().enumerate() {
                    let values = values_of(view, &sup.key);
                    let newer = values.iter().any(|v| sup.by.contains(v));
                    let older = values.contains(&sup.value);
                    ensure!(
                        !(older && (newer || seen_newer[n].contains(&w))),
                        "node {}: superseded value {:?} of {:?} shows again: {values:?}",
                        NAMES[n],
                        String::from_utf8_lossy(&sup.value),
                        sup.key
                    );
                    if newer {
                        seen_newer[n].insert(w);
                    }
                }
            }
            if equal(&observed) {
                return Ok(observed);
            }
            if Instant::now() > deadline {
                let heads: Vec<String> = observed
                    .iter()
                    .zip(NAMES)
                    .map(|((s, v), n)| {
                        format!(
                            "{n}: log {} indexed {} keys {} vv {:?}",
                            s.log_lsn,
                            s.indexed_lsn,
                            v.len(),
                            s.version_vector
                        )
                    })
                    .collect();
                bail!(
                    "logs and views not equal {CONVERGE_WITHIN:?} after the heal: {}",
                    heads.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every node, then reads every log: the same entries, each verified.
    async fn stop_and_compare_logs(&mut self) -> Result<usize> {
        for node in &mut self.nodes {
            node.stop().await?;
        }
        let mut logs = Vec::new();
        for node in &self.nodes {
            let summary = kappakv_server::commands::verify::run(&node.data_dir)
                .with_context(|| format!("verifying node {}'s log", node.name))?;
            ensure!(
                summary.authors == 3,
                "node {}: every node wrote, so every log has three authors: {summary}",
                node.name
            );
            let reader = LogReader::open(&node.data_dir.join("log"))?;
            let mut ids = BTreeSet::new();
            for item in reader.iter(0, reader.last_lsn()?)? {
                ids.insert(item?.1.id);
            }
            logs.push(ids);
        }
        for (i, ids) in logs.iter().enumerate().skip(1) {
            ensure!(
                *ids == logs[0],
                "logs of {} and {} differ: {} and {} entries, {} only in one",
                NAMES[0],
                NAMES[i],
                logs[0].len(),
                ids.len(),
                logs[0].symmetric_difference(ids).count()
            );
        }
        Ok(logs[0].len())
    }
}

/// Equal version vectors and log lengths, views caught up, equal full scans.
fn equal(observed: &[(Status, Vec<KeyVersions>)]) -> bool {
    let (first_status, first_view) = &observed[0];
    observed.iter().all(|(s, v)| {
        s.indexed_lsn == s.log_lsn
            && s.log_lsn == first_status.log_lsn
            && sorted(&s.version_vector) == sorted(&first_status.version_vector)
            && v == first_view
    })
}

fn sorted(vv: &[(NodeId, u64)]) -> Vec<(NodeId, u64)> {
    let mut vv = vv.to_vec();
    vv.sort_unstable();
    vv
}

fn seq_of(status: &Status, author: NodeId) -> u64 {
    status
        .version_vector
        .iter()
        .find(|(a, _)| *a == author)
        .map_or(0, |(_, s)| *s)
}

fn values_of(view: &[KeyVersions], key: &str) -> BTreeSet<Vec<u8>> {
    view.iter()
        .find(|kv| kv.key == key.as_bytes())
        .map(|kv| kv.values.iter().filter_map(|v| v.value.clone()).collect())
        .unwrap_or_default()
}

/// A value that other writes superseded and must never show again once they have.
struct Superseded {
    key: String,
    value: Vec<u8>,
    by: BTreeSet<Vec<u8>>,
}

/// A write the node acknowledged.
#[derive(Debug)]
struct Acked {
    key: String,
    value: Vec<u8>,
    id: EntryId,
}

/// One fault and the writes that show what it must not break.
struct Scenario {
    name: &'static str,
    /// How long the fault lasts, with writes on every side (`KAPPAKV_NETNS_FAULT_SECS`
    /// overrides it, for long runs).
    fault_for: Duration,
    /// nftables statements for the bridge's forward chain.
    rules: Vec<String>,
    /// `(first, second)`: `first` writes a key, then `second` writes the same key without a
    /// context. The fault keeps the first write from `second`, so the two are concurrent and
    /// must end as siblings.
    blind: Vec<(usize, usize)>,
    /// `(from, to)`: `from` writes a value; once `to` reads it, `to` overwrites it. The fault
    /// leaves that path open, so the overwrite supersedes it.
    overwrite: Vec<(usize, usize)>,
    /// `(observer, author)`: at the end of the fault, `observer` lacks `author`'s latest
    /// writes, which shows that the rules were in force.
    cut_off: Vec<(usize, usize)>,
}

/// Writes unique keys from `node` until `stop`: what was acknowledged, and how many failed.
fn unique_writer(
    node: &NsNode,
    writer: usize,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicUsize>,
) -> impl Future<Output = Result<Vec<Acked>>> + use<> {
    let name = node.name;
    node.client(move |c| async move {
        let mut acked = Vec::new();
        let mut i = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let key = format!("u/{name}{writer}/{i:05}");
            let value = format!("{name}{writer}-{i}").into_bytes();
            match c.put(&key, &value).await {
                Ok(w) => acked.push(Acked {
                    key,
                    value,
                    id: w.id,
                }),
                // Not acknowledged: it may or may not be there, and nothing is checked of it.
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            i += 1;
            tokio::time::sleep(WRITE_EVERY).await;
        }
        Ok(acked)
    })
}

/// A plain put of `value` at `key` on `node`.
async fn put(node: &NsNode, key: &str, value: &str) -> Result<Acked> {
    let (key, value) = (key.to_string(), value.as_bytes().to_vec());
    node.client(move |c| async move {
        let w = c.put(&key, &value).await?;
        Ok(Acked {
            key,
            value,
            id: w.id,
        })
    })
    .await
}

/// Sets a flag when dropped: the writers stop on every path out of a scenario.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

async fn run_scenario(scenario: Scenario) -> Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(mut cluster) = Cluster::start(scenario.name).await? else {
        return Ok(());
    };
    let name = scenario.name;
    exercise(&mut cluster, scenario).await.map_err(|e| {
        let logs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("--- node {}:\n{}", n.name, n.log_text()))
            .collect();
        e.context(format!(
            "{name} failed; the nodes' warnings:\n{}",
            logs.join("\n")
        ))
    })
}

async fn exercise(cluster: &mut Cluster, scenario: Scenario) -> Result<()> {
    let nodes = &cluster.nodes;
    let ids: Vec<NodeId> = nodes.iter().map(NsNode::node_id).collect();

    // Before the fault: a value every node has, which each node then overwrites with its
    // context during the fault, so the three overwrites are siblings whatever the network did.
    let base = put(&nodes[0], "ctx", "base").await?;
    cluster
        .converge(Instant::now() + START_DEADLINE, &[])
        .await
        .context("before the fault")?;

    let nodes = &cluster.nodes;
    cluster.net.set_faults(&scenario.rules)?;
    let fault_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_writers = StopOnDrop(stop.clone());
    let failed = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = nodes
        .iter()
        .flat_map(|n| (0..WRITERS_PER_NODE).map(move |w| (n, w)))
        .map(|(n, w)| unique_writer(n, w, stop.clone(), failed.clone()))
        .collect();

    let mut expected: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut scripted: Vec<Acked> = Vec::new();
    let mut watched: Vec<Superseded> = Vec::new();

    let base_context = Context(vec![base.id]);
    let overwrites: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (ctx, value) = (base_context.clone(), format!("from {}", n.name));
            n.client(move |c| async move {
                let w = c.put_with("ctx", &value, &ctx).await?;
                Ok(Acked {
                    key: "ctx".into(),
                    value: value.into_bytes(),
                    id: w.id,
                })
            })
        })
        .collect();
    for w in overwrites {
        scripted.push(w.await?);
    }
    let froms: BTreeSet<Vec<u8>> = NAMES
        .iter()
        .map(|n| format!("from {n}").into_bytes())
        .collect();
    expected.insert("ctx".into(), froms.clone());
    watched.push(Superseded {
        key: "ctx".into(),
        value: b"base".to_vec(),
        by: froms,
    });

    // On every node, a value superseded by that node's next write.
    for n in nodes {
        let key = format!("local/{}", n.name);
        scripted.push(put(n, &key, "first").await?);
        scripted.push(put(n, &key, "second").await?);
        expected.insert(key.clone(), BTreeSet::from([b"second".to_vec()]));
        watched.push(Superseded {
            key,
            value: b"first".to_vec(),
            by: BTreeSet::from([b"second".to_vec()]),
        });
    }

    for &(first, second) in &scenario.blind {
        let key = format!("blind/{}{}", NAMES[first], NAMES[second]);
        let (v1, v2) = (
            format!("{} first", NAMES[first]),
            format!("{} second", NAMES[second]),
        );
        scripted.push(put(&nodes[first], &key, &v1).await?);
        scripted.push(put(&nodes[second], &key, &v2).await?);
        expected.insert(key, BTreeSet::from([v1.into_bytes(), v2.into_bytes()]));
    }

    for &(from, to) in &scenario.overwrite {
        let key = format!("over/{}{}", NAMES[from], NAMES[to]);
        scripted.push(put(&nodes[from], &key, "old").await?);
        let k = key.clone();
        let reached = nodes[to].client(move |c| async move {
            kappakv_tests::eventually("the value to cross the open path", || async {
                Ok(c.get(&k).await?.values.len() == 1)
            })
            .await
        });
        reached.await?;
        scripted.push(put(&nodes[to], &key, "new").await?);
        expected.insert(key.clone(), BTreeSet::from([b"new".to_vec()]));
        watched.push(Superseded {
            key,
            value: b"old".to_vec(),
            by: BTreeSet::from([b"new".to_vec()]),
        });
    }

    let fault_for = std::env::var("KAPPAKV_NETNS_FAULT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(scenario.fault_for, Duration::from_secs);
    if let Some(rest) = fault_for.checked_sub(fault_started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut unique = Vec::new();
    for w in writers {
        unique.extend(w.await?);
    }

    // The fault was in force: the cut-off side lacks what it cannot have heard.
    let statuses = cluster.observe().await?;
    for &(observer, author) in &scenario.cut_off {
        let (has, wrote) = (
            seq_of(&statuses[observer].0, ids[author]),
            seq_of(&statuses[author].0, ids[author]),
        );
        ensure!(
            has < wrote,
            "{}: during the fault {} already has {} of {}'s {wrote} entries",
            scenario.name,
            NAMES[observer],
            has,
            NAMES[author]
        );
    }

    cluster.net.heal()?;
    let healed = Instant::now();
    let observed = cluster
        .converge(healed + CONVERGE_WITHIN, &watched)
        .await
        .with_context(|| format!("{}: after the heal", scenario.name))?;
    let took = healed.elapsed();

    let (_, view) = &observed[0];
    let by_key: BTreeMap<&[u8], &KeyVersions> =
        view.iter().map(|kv| (kv.key.as_slice(), kv)).collect();
    for a in &unique {
        let kv = by_key
            .get(a.key.as_bytes())
            .with_context(|| format!("{}: acknowledged write {a:?} is missing", scenario.name))?;
        ensure!(
            kv.values.len() == 1
                && kv.values[0].id == a.id
                && kv.values[0].value == Some(a.value.clone()),
            "{}: acknowledged write {a:?} reads as {kv:?}",
            scenario.name
        );
    }
    for a in &scripted {
        let kv = by_key
            .get(a.key.as_bytes())
            .with_context(|| format!("{}: key of {a:?} is missing", scenario.name))?;
        let want = &expected[&a.key];
        if want.contains(&a.value) {
            ensure!(
                kv.values.iter().any(|v| v.id == a.id),
                "{}: acknowledged write {a:?} is not among {kv:?}",
                scenario.name
            );
        }
    }
    for (key, want) in &expected {
        let got = values_of(view, key);
        ensure!(
            got == *want,
            "{}: {key} reads {got:?}, expected {want:?}",
            scenario.name
        );
    }
    for (status, _) in &observed {
        ensure!(status.equivocations == 0, "{status:?}");
    }

    let entries = cluster.stop_and_compare_logs().await?;
    say(&format!(
        "netns {}: {} writes acknowledged during the fault ({} unique-key, {} scripted), {} \
         failed; equal logs ({entries} entries) and views ({} keys) {:.2} s after the heal",
        scenario.name,
        unique.len() + scripted.len(),
        unique.len(),
        scripted.len(),
        failed.load(Ordering::Relaxed),
        view.len(),
        took.as_secs_f64()
    ));
    Ok(())
}

#[tokio::test]
async fn a_partitioned_node_converges_after_the_heal() -> Result<()> {
    // C is cut off from A and B, both ways; A and B still talk.
    let c = ip_of(2);
    run_scenario(Scenario {
        name: "partition",
        // Longer than a peer connection's idle timeout, so the nodes must dial again.
        fault_for: Duration::from_secs(10),
        rules: vec![format!("ip saddr {c} drop"), format!("ip daddr {c} drop")],
        blind: vec![(0, 2), (2, 1)],
        overwrite: vec![(0, 1)],
        cut_off: vec![(2, 0), (2, 1), (0, 2), (1, 2)],
    })
    .await
}

#[tokio::test]
async fn a_node_that_hears_but_is_not_heard_converges_after_the_heal() -> Result<()> {
    // A's packets are dropped on their way to B and C; theirs reach A.
    let a = ip_of(0);
    run_scenario(Scenario {
        name: "one-way",
        // Shorter than the idle timeout: the connections live through it.
        fault_for: Duration::from_secs(4),
        rules: vec![format!("ip saddr {a} drop")],
        blind: vec![(0, 1), (0, 2)],
        overwrite: vec![(1, 2), (2, 1)],
        cut_off: vec![(1, 0), (2, 0)],
    })
    .await
}

#[tokio::test]
async fn ten_percent_loss_on_every_link_converges() -> Result<()> {
    run_scenario(Scenario {
        name: "loss",
        fault_for: Duration::from_secs(4),
        rules: vec!["meta l4proto udp numgen random mod 10 < 1 drop".into()],
        blind: Vec::new(),
        overwrite: vec![(0, 2), (2, 1)],
        cut_off: Vec::new(),
    })
    .await
}

/// Each node's peers, read from inside its namespace.
async fn peer_lists(nodes: &[NsNode]) -> Result<Vec<Vec<PeerStatus>>> {
    let mut lists = Vec::new();
    for node in nodes {
        lists.push(
            node.client(|c| async move { Ok(c.peer_list().await?) })
                .await?,
        );
    }
    Ok(lists)
}

/// Polls `check` every 100 ms until it holds, for at most `within`.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn local_discovery_joins_the_nodes_of_one_swarm_only() -> Result<()> {
    let _one_at_a_time = SERIAL.lock().await;
    let net = match Net::create("discovery")? {
        Ok(net) => net,
        Err(Skip(why)) => {
            say(&format!("netns test discovery skipped: {why}"));
            return Ok(());
        }
    };
    let dir = tempfile::tempdir()?;
    // A and B share a swarm; C has one of its own.
    let secrets = [
        "5a1f0c3e9b7d24e8a6c0f1b3d5e7092a",
        "5a1f0c3e9b7d24e8a6c0f1b3d5e7092a",
        "c0ffee00c0ffee00c0ffee00c0ffee00",
    ];
    let mut nodes = Vec::new();
    for (i, secret) in secrets.iter().enumerate() {
        let env = [
            ("KAPPAKV_DISCOVERY", "local"),
            ("KAPPAKV_SWARM", *secret),
            ("KAPPAKV_DISCOVERY_INTERVAL_MS", "200"),
        ];
        nodes.push(NsNode::start_with(i, &net.nodes[i], dir.path(), &env).await?);
    }
    let ids: Vec<NodeId> = nodes.iter().map(NsNode::node_id).collect();
    let logs = |nodes: &[NsNode]| {
        nodes
            .iter()
            .map(|n| format!("--- node {}:\n{}", n.name, n.log_text()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let found = wait_for(
        "a and b find each other",
        Duration::from_secs(20),
        || async {
            let lists = peer_lists(&nodes[..2]).await?;
            Ok((0..2).all(|i| {
                matches!(&lists[i][..], [p] if p.node_id == ids[1 - i]
                && p.origin == PeerOrigin::Discovered
                && p.connected
                && p.addr.as_deref() == Some(&nodes[1 - i].addr.to_string()))
            }))
        },
    )
    .await;
    found.with_context(|| logs(&nodes))?;

    nodes[0]
        .client(|c| async move { Ok(c.put("found", "by multicast").await?) })
        .await?;
    wait_for("b holds a's write", Duration::from_secs(10), || async {
        nodes[1]
            .client(|c| async move { Ok(c.get("found").await?.value().is_some()) })
            .await
    })
    .await?;

    // Ten announcements later, C is on no list and has none.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lists = peer_lists(&nodes).await?;
    ensure!(lists[2].is_empty(), "c found peers: {:?}", lists[2]);
    for list in &lists[..2] {
        ensure!(
            list.iter().all(|p| p.node_id != ids[2]),
            "c was taken into another swarm: {list:?}"
        );
    }

    // B stops; A drops it once it has stayed gone for 15 intervals.
    nodes[1].stop().await?;
    wait_for("a drops b", Duration::from_secs(20), || async {
        Ok(peer_lists(&nodes[..1]).await?[0].is_empty())
    })
    .await
    .with_context(|| logs(&nodes))?;
    Ok(())
}
