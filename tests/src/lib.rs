//! Shared helpers for kappakv's integration tests: nodes on 127.0.0.1 in temporary data dirs,
//! either in-process ([`TestNode`]) or as a real `kappakv serve` child process
//! ([`ProcessNode`]) that can be stopped with SIGTERM or killed with SIGKILL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kappakv_client::Client;
use kappakv_protocol::Ticket;
use kappakv_server::auth::Role;
use kappakv_server::{Config, Server};

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

/// The path of a workspace binary (`kappakv`, `kappactl`), built if it is missing.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target dir")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        let package = if name == "kappactl" {
            "kappakv-client"
        } else {
            "kappakv-server"
        };
        let status = Command::new(env!("CARGO"))
            .args(["build", "--locked", "-p", package, "--bin", name])
            .status()?;
        if !status.success() {
            bail!("building {name} failed");
        }
    }
    Ok(path)
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
    /// Starts `kappakv serve` on `data_dir` at `addr`, waiting until it answers.
    pub async fn start(data_dir: &Path, addr: SocketAddr) -> Result<Self> {
        let child = Command::new(binary("kappakv")?)
            .args(["serve", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut node = Self {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            addr,
        };
        node.wait_ready().await?;
        Ok(node)
    }

    async fn wait_ready(&mut self) -> Result<()> {
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
    pub fn ticket(&self) -> Result<Ticket> {
        let text = std::fs::read_to_string(self.data_dir.join("client.ticket"))?;
        Ok(text.trim().parse()?)
    }

    /// A connected client.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.ticket()?).await?)
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
