//! The admin HTTP listener (loopback by default, port 7701): `/metrics` in the Prometheus text
//! format, `/healthz` (alive, log writable) and `/readyz` (serving, views caught up).
//!
//! It starts before the node opens, so that a node rebuilding its views at start answers
//! `/healthz` 200 and `/readyz` 503 while it does. It serves plain HTTP/1.1 with no
//! authentication: keep it on loopback or behind a firewall.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, Verdict};

/// The admin listener could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Binding the TCP socket.
    #[error("cannot listen for admin HTTP on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// What the handlers read.
#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    /// `None` when no recorder is installed: `/metrics` then answers 404.
    metrics: Option<PrometheusHandle>,
    ready_lag_max: u64,
}

/// A bound admin listener, not serving yet.
pub struct AdminListener {
    listener: tokio::net::TcpListener,
}

impl AdminListener {
    /// Binds `addr`.
    pub async fn bind(addr: SocketAddr) -> Result<Self, AdminError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires. `ready_lag_max` is how many entries the views may be behind
    /// the log for `/readyz` to answer 200.
    pub async fn serve(
        self,
        health: Arc<Health>,
        metrics: Option<PrometheusHandle>,
        ready_lag_max: u64,
        cancel: CancellationToken,
    ) {
        let state = AdminState {
            health,
            metrics,
            ready_lag_max,
        };
        let app = Router::new()
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(state);
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "admin listener failed");
        }
    }
}

fn verdict(v: Verdict) -> Response {
    let status = if v.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", v.reason)).into_response()
}

async fn healthz(State(state): State<AdminState>) -> Response {
    verdict(state.health.liveness())
}

async fn readyz(State(state): State<AdminState>) -> Response {
    verdict(state.health.readiness(state.ready_lag_max))
}

async fn metrics_page(State(state): State<AdminState>) -> Response {
    let Some(handle) = state.metrics else {
        return (StatusCode::NOT_FOUND, "no metrics recorder installed\n").into_response();
    };
    if let Some(node) = state.health.node() {
        // Lists the log directory.
        let _ = tokio::task::spawn_blocking(move || crate::telemetry::refresh(&node)).await;
    }
    let body = tokio::task::spawn_blocking(move || handle.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
