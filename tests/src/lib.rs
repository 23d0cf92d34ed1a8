//! Shared helpers for kappakv's integration tests: nodes on 127.0.0.1 in temporary data dirs,
//! either in-process ([`TestNode`]) or as a real `kappakv serve` child process
//! ([`ProcessNode`]) that can be stopped with SIGTERM or killed with SIGKILL.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kappakv_client::Client;
use kappakv_protocol::Ticket;
use kappakv_server::auth::Role;
use kappakv_server::{Config, Server};

pub mod raw;

/// A configuration for a test node: its data dir, an ephemeral loopback port.
pub fn test_config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    }
}

/// A node running inside the test process.
pub struct TestNode {
    /// The running server.
    pub server: Server,
    /// Keeps the data dir alive.
    pub dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node in a fresh temporary data dir.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let server = Server::start(test_config(dir.path())).await?;
        Ok(Self { server, dir })
    }

    /// Starts a node with `edit` applied to its configuration.
    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = test_config(dir.path());
        edit(&mut config);
        let server = Server::start(config).await?;
        Ok(Self { server, dir })
    }

    /// The read-write ticket.
    pub fn ticket(&self) -> Ticket {
        self.server.ticket(Role::ReadWrite)
    }

    /// A connected read-write client.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.ticket()).await?)
    }

    /// A connected read-only client.
    pub async fn read_only_client(&self) -> Result<Client> {
        Ok(Client::connect(&self.server.ticket(Role::ReadOnly)).await?)
    }
}

/// The path of a workspace binary (`kappakv`, `kappactl`), built (or brought up to date) with
/// `cargo build` the first time a test process asks for it, so tests never run a stale binary.
pub fn binary(name: &str) -> Result<PathBuf> {
    let package = if name == "kappactl" {
        "kappactl"
    } else {
        "kappakv-server"
    };
    built(&["-p", package, "--bin", name], Path::new(name))
}

/// The path of an example of the client library (`client/examples/NAME.rs`), built like
/// [`binary`].
pub fn example(name: &str) -> Result<PathBuf> {
    built(
        &["-p", "kappakv-client", "--example", name],
        &Path::new("examples").join(name),
    )
}

/// Runs `cargo build ARGS` the first time a test process asks for these args, and returns
/// `path` under the profile's target dir.
fn built(args: &[&str], path: &Path) -> Result<PathBuf> {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary> or target/<profile>/<bin> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|dir| {
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent()
            } else {
                Some(dir)
            }
        })
        .context("test binary has no target dir")?;
    let key = args.join(" ");
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.contains(&key) {
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args(["build", "--locked"]).args(args);
        // `cargo test` runs this process with the variables it gives build scripts
        // (`CARGO_MANIFEST_DIR`, `CARGO_PKG_NAME`, `OUT_DIR`…). Some build scripts (ring's)
        // rerun when those differ, so passing them on would rebuild half the dependency tree
        // here and again at the next plain `cargo build`.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let cargo_setting = [
                "CARGO_HOME",
                "CARGO_TARGET_DIR",
                "CARGO_BUILD_",
                "CARGO_PROFILE_",
                "CARGO_NET_",
                "CARGO_HTTP_",
                "CARGO_REGISTR",
                "CARGO_TERM_",
                "CARGO_INCREMENTAL",
                "CARGO_UNSTABLE_",
                "CARGO_ENCODED_RUSTFLAGS",
            ]
            .iter()
            .any(|p| key.starts_with(p));
            if (key.starts_with("CARGO_") && !cargo_setting) || key == "OUT_DIR" {
                cargo.env_remove(&*key);
            }
        }
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cargo.arg("--release");
        }
        if !cargo.status()?.success() {
            bail!("`cargo build {key}` failed");
        }
        built.push(key);
    }
    Ok(profile_dir.join(path))
}

/// A [`Command`] for a workspace binary that inherits no `KAPPAKV_*` variable from the test's
/// environment, so the settings a test gives are the only ones.
pub fn command(name: &str) -> Result<Command> {
    let mut cmd = Command::new(binary(name)?);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("KAPPAKV_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    Ok(cmd)
}

/// Runs `cmd` to its end, capturing standard output and error; kills it and fails if it is
/// still running after `timeout`.
pub async fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // Drained on threads so that a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let join = |t: std::thread::JoinHandle<Vec<u8>>| t.join().unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// A `kappakv serve` child process on a data dir that outlives it.
pub struct ProcessNode {
    child: Option<Child>,
    /// The data dir.
    pub data_dir: PathBuf,
    /// The address it listens on.
    pub addr: SocketAddr,
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> Result<u16> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(sock.local_addr()?.port())
}

impl ProcessNode {
    /// Starts `kappakv serve` on `data_dir` at `addr`, waiting until it answers. Its log
    /// (warnings and errors only) goes to the test's standard error.
    pub async fn start(data_dir: &Path, addr: SocketAddr) -> Result<Self> {
        let mut cmd = serve_command(data_dir, addr)?;
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
        Self::spawn(cmd, data_dir, addr).await
    }

    /// Like [`ProcessNode::start`], but the node logs at `info` level and its standard error is
    /// appended to the file `log`.
    pub async fn start_logged(data_dir: &Path, addr: SocketAddr, log: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = serve_command(data_dir, addr)?;
        cmd.env("RUST_LOG", "info,quinn=warn")
            .env("NO_COLOR", "1")
            .stderr(file);
        Self::spawn(cmd, data_dir, addr).await
    }

    /// Spawns `cmd`, a `kappakv serve` that uses `data_dir` and listens on `addr`, and waits
    /// until a client can connect with the ticket it writes.
    pub async fn spawn(mut cmd: Command, data_dir: &Path, addr: SocketAddr) -> Result<Self> {
        let child = cmd.stdout(Stdio::null()).spawn()?;
        let mut node = Self {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            addr,
        };
        node.wait_ready().await?;
        Ok(node)
    }

    /// Starts `kappakv serve` on a new temporary data dir and free loopback ports, with the
    /// settings `settings` (names without the `KAPPAKV_` prefix, as in the config file) and
    /// errors only in its log. Returns the data dir's owner, the node and its admin address.
    pub async fn start_with_settings(
        settings: &[(&str, &str)],
    ) -> Result<(tempfile::TempDir, Self, SocketAddr)> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let mut cmd = serve_command(&data_dir, addr)?;
        cmd.env("KAPPAKV_ADMIN_LISTEN", admin.to_string())
            .env("RUST_LOG", "error")
            .stderr(Stdio::inherit());
        for (k, v) in settings {
            cmd.env(format!("KAPPAKV_{}", k.to_uppercase()), v);
        }
        let node = Self::spawn(cmd, &data_dir, addr).await?;
        Ok((dir, node, admin))
    }

    /// Starts `kappakv serve` on `data_dir` at `addr` with the settings `settings` (names
    /// without the `KAPPAKV_` prefix), warnings and errors in its log.
    pub async fn start_in(
        data_dir: &Path,
        addr: SocketAddr,
        settings: &[(&str, String)],
    ) -> Result<Self> {
        let mut cmd = serve_command(data_dir, addr)?;
        cmd.env("RUST_LOG", "warn").stderr(Stdio::inherit());
        for (k, v) in settings {
            cmd.env(format!("KAPPAKV_{}", k.to_uppercase()), v);
        }
        Self::spawn(cmd, data_dir, addr).await
    }

    /// Starts `kappakv serve` on `data_dir` at `addr` with its admin HTTP listener on
    /// `admin`, waiting until it answers.
    pub async fn start_with_admin(
        data_dir: &Path,
        addr: SocketAddr,
        admin: SocketAddr,
    ) -> Result<Self> {
        let mut node = Self::spawn_unready(data_dir, addr, admin)?;
        node.wait_ready().await?;
        Ok(node)
    }

    /// Like [`ProcessNode::start_with_admin`], but returns as soon as the process is spawned,
    /// before it opens its log or catches up its indexes; [`ProcessNode::wait_ready`] waits.
    pub fn spawn_unready(data_dir: &Path, addr: SocketAddr, admin: SocketAddr) -> Result<Self> {
        let mut cmd = serve_command(data_dir, addr)?;
        cmd.env("RUST_LOG", "warn")
            .env("KAPPAKV_ADMIN_LISTEN", admin.to_string())
            .stderr(Stdio::inherit());
        let child = cmd.stdout(Stdio::null()).spawn()?;
        Ok(Self {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            addr,
        })
    }

    /// Waits until a client can connect with the ticket the node wrote.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("kappakv serve exited early with {status}");
            }
            if let Ok(ticket) = self.ticket()
                && Client::connect(&ticket).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kappakv serve did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ticket the node wrote.
    ///
    /// Tests send traffic only to loopback: the machine's other addresses, which the ticket of
    /// a node on a wildcard address lists, are left out.
    pub fn ticket(&self) -> Result<Ticket> {
        let text = std::fs::read_to_string(self.data_dir.join("client.ticket"))?;
        let mut ticket: Ticket = text.trim().parse()?;
        ticket
            .addrs
            .retain(|a| a.ip().is_none_or(|ip| ip.ip().is_loopback()));
        Ok(ticket)
    }

    /// A connected client.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.ticket()?).await?)
    }

    /// The process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's resident memory now and at its peak, from `/proc/PID/status`.
    pub fn memory(&self) -> Result<Memory> {
        let pid = self.pid().context("the node is stopped")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |field: &str| -> Result<u64> {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
            Ok(line.trim().trim_end_matches("kB").trim().parse()?)
        };
        Ok(Memory {
            rss: kib("VmRSS:")? * 1024,
            peak: kib("VmHWM:")? * 1024,
        })
    }

    /// Resets the peak resident memory to the current one (`/proc/PID/clear_refs`), so that
    /// [`Memory::peak`] measures from now on. Returns false where the kernel does not allow it;
    /// the peak then counts from the start of the process, which still bounds it from above.
    pub fn reset_peak_memory(&self) -> bool {
        self.pid()
            .is_some_and(|pid| std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }

    /// Sends `signal` and waits for the process to exit; returns its exit code (None if killed).
    pub fn stop_with(&mut self, signal: i32) -> Result<Option<i32>> {
        let mut child = self.child.take().context("already stopped")?;
        let pid = libc::pid_t::try_from(child.id())?;
        if signal == libc::SIGKILL {
            child.kill()?;
        } else {
            let rc = send_signal(pid, signal);
            if rc != 0 {
                bail!("kill({pid}, {signal}) failed");
            }
        }
        let status = child.wait()?;
        Ok(status.code())
    }
}

/// Resident memory of a process, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// Resident now (`VmRSS`).
    pub rss: u64,
    /// The highest resident since the start or the last reset (`VmHWM`).
    pub peak: u64,
}

/// Bytes as MiB, for messages.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// `kappakv serve --data-dir DATA_DIR --listen ADDR`, without the admin HTTP listener (its
/// default address is one fixed port for the whole machine).
pub fn serve_command(data_dir: &Path, addr: SocketAddr) -> Result<Command> {
    let mut cmd = command("kappakv")?;
    cmd.args(["serve", "--data-dir"])
        .arg(data_dir)
        .args(["--listen", &addr.to_string()])
        .env("KAPPAKV_ADMIN_LISTEN", "off");
    Ok(cmd)
}

/// Sends a signal with the `kill` command, so this crate needs no unsafe code.
fn send_signal(pid: libc::pid_t, signal: i32) -> i32 {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
    i32::from(!status.is_ok_and(|s| s.success()))
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free TCP port on loopback.
pub fn free_tcp_port() -> Result<u16> {
    let sock = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(sock.local_addr()?.port())
}

/// `GET path` over HTTP/1.1 on a fresh connection to `addr`: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("HTTP response without a header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .context("HTTP response without a status")?
        .parse()?;
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk header")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("short chunk end")?;
    }
}

/// The value of the sample `series` (a metric name, with its labels as rendered, such as
/// `kappakv_requests_total{type="write",outcome="ok"}`) in a Prometheus text page; 0 when
/// absent (a counter never incremented is not rendered).
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Polls `check` every 20 ms until it holds, failing after 20 s with `what` in the message. An
/// error from `check` counts as "not yet".
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if check().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub mod bench;
pub mod crash;
pub mod crash_loop;
