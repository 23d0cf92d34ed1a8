//! A running server: the node plus its QUIC endpoint. Shutdown order: stop accepting, let
//! in-flight requests finish within the grace period, close connections, flush the writer,
//! stop the indexer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kappakv_protocol::{NodeId, Ticket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Role, write_ticket};
use crate::config::Config;
use crate::health::Health;
use crate::net::endpoint::{EndpointError, accept_loop, bind};
use crate::node::{Node, StartError};

/// The server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The node.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The endpoint.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
}

/// A running server.
pub struct Server {
    node: Arc<Node>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    accept: tokio::task::JoinHandle<()>,
    health: Arc<Health>,
}

impl Server {
    /// Opens the node and starts serving. Writes `client.ticket` into the data dir.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        Self::start_observed(config, Health::new()).await
    }

    /// [`start`](Self::start), reporting the node's life into `health`: the start-up catch-up
    /// of the views, serving once the endpoint is up, stopping at shutdown.
    pub async fn start_observed(config: Config, health: Arc<Health>) -> Result<Self, ServeError> {
        Self::start_with_log_dir(config, health, None).await
    }

    /// [`start_observed`](Self::start_observed), with the node's writer appending through
    /// `log_dir` when it is given (see [`Node::open_with_log_dir`]): how tests inject disk
    /// faults into a running server.
    pub async fn start_with_log_dir(
        config: Config,
        health: Arc<Health>,
        log_dir: Option<Arc<dyn crate::log::LogDir>>,
    ) -> Result<Self, ServeError> {
        let node = Node::open_with_log_dir(config, &health, log_dir).await?;
        let endpoint = bind(&node)?;
        let addr = endpoint
            .local_addr()
            .map_err(|source| EndpointError::Bind {
                addr: node.config.listen,
                source,
            })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let replication = crate::node::replication::Replication::start(
            &node,
            endpoint.clone(),
            cancel.clone(),
            tracker.clone(),
        )?;
        if node.config.discovery == crate::config::DiscoveryMode::Local {
            crate::net::discovery::spawn(
                &node.config.swarm,
                node.node_id,
                addr,
                Duration::from_millis(node.config.discovery_interval_ms),
                replication.clone(),
                cancel.clone(),
                &tracker,
            );
        }
        node.set_replication(replication);
        let server = Self {
            accept: tokio::spawn(accept_loop(
                endpoint.clone(),
                node.clone(),
                cancel.clone(),
                tracker.clone(),
            )),
            node,
            endpoint,
            addr,
            cancel,
            tracker,
            health,
        };
        write_ticket(server.node.data_dir.path(), &server.ticket(Role::ReadWrite))
            .map_err(StartError::from)?;
        server.health.serving(&server.node);
        Ok(server)
    }

    /// The address the endpoint is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node.node_id
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// A ticket for this server, with the addresses it advertises ([`crate::net::advertised`]).
    pub fn ticket(&self, role: Role) -> Ticket {
        let addrs = crate::net::advertised(self.addr, &self.node.config.advertise);
        self.node.tokens.ticket(self.node.node_id, addrs, role)
    }

    /// Stops gracefully.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: no new connections");
        self.health.stopping();
        self.cancel.cancel();
        let _ = self.accept.await;
        self.tracker.close();
        let grace = Duration::from_millis(self.node.config.shutdown_grace_ms);
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "requests still running after the grace period; closing"
            );
        }
        self.endpoint
            .close(crate::net::close::SHUTDOWN.into(), b"node shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        drop(self.endpoint);
        self.node.shutdown().await;
        tracing::info!("stopped");
    }
}
