//! The request path as a `tower::Service`: load shedding (an overloaded node answers `Busy` at
//! once), a global concurrency limit, and a per-request timeout around the handlers.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kappakv_protocol::{ErrorCode, Request, Response};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder};

use crate::auth::Role;
use crate::handlers::{self, Reply};
use crate::node::Node;

/// One request with the role of the connection it came on.
#[derive(Debug)]
pub struct Call {
    /// The request.
    pub request: Request,
    /// What the connection may do.
    pub role: Role,
}

/// The handler at the bottom of the stack.
#[derive(Clone)]
pub struct Handler {
    node: Arc<Node>,
}

impl Service<Call> for Handler {
    type Response = Reply;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Reply, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let node = self.node.clone();
        Box::pin(async move { Ok(handlers::handle(&node, call.request, call.role).await) })
    }
}

/// The whole stack, cloned once per stream; clones share the concurrency limit.
pub type RequestService = BoxCloneService<Call, Reply, BoxError>;

/// Builds the stack over `node`.
pub fn stack(node: Arc<Node>) -> RequestService {
    let limit = node.config.max_concurrent_requests;
    let timeout = node.config.request_timeout();
    let svc = ServiceBuilder::new()
        .load_shed()
        .concurrency_limit(limit)
        .timeout(timeout)
        .service(Handler { node });
    BoxCloneService::new(svc)
}

/// The wire error for a failure of the stack itself.
pub fn stack_error(err: &BoxError) -> Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        Response::Error {
            code: ErrorCode::Busy,
            message: "node is at capacity; retry shortly".into(),
        }
    } else if err.is::<tower::timeout::error::Elapsed>() {
        Response::Error {
            code: ErrorCode::Timeout,
            message: "request timed out on the node; retry".into(),
        }
    } else {
        Response::Error {
            code: ErrorCode::Internal,
            message: format!("request failed: {err}"),
        }
    }
}
