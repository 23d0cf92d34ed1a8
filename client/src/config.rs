//! Client settings and the builder that connects with them.

use std::time::Duration;

use kappakv_protocol::Ticket;
use kappakv_protocol::limits::MAX_SCAN_LIMIT;

use crate::client::Client;
use crate::error::ConnectError;

/// Keys a scan asks for per request unless told otherwise.
pub const DEFAULT_SCAN_PAGE: u32 = 1000;

const _: () = assert!(DEFAULT_SCAN_PAGE <= MAX_SCAN_LIMIT);

/// How a [`Client`] connects and how long it waits.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Longest wait for one address to complete the QUIC handshake and the hello.
    pub(crate) connect_timeout: Duration,
    /// Longest wait for the whole answer of one request (one page, for scans). Watches have none.
    pub(crate) request_timeout: Duration,
    /// How often to send keep-alive packets so that an idle connection stays open.
    pub(crate) keep_alive: Option<Duration>,
    /// After this long without a packet from the node the connection counts as lost.
    pub(crate) idle_timeout: Duration,
    /// Keys per scan request.
    pub(crate) scan_page: u32,
    /// Whether single-answer requests share the connection's pipeline.
    pub(crate) pipeline: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            keep_alive: Some(Duration::from_secs(5)),
            idle_timeout: Duration::from_secs(30),
            scan_page: DEFAULT_SCAN_PAGE,
            pipeline: true,
        }
    }
}

/// Builds a [`Client`] with settings other than the defaults.
///
/// ```no_run
/// # async fn demo(ticket: kappakv_protocol::Ticket) -> Result<(), kappakv_client::ConnectError> {
/// use std::time::Duration;
///
/// let client = kappakv_client::Client::builder(ticket)
///     .connect_timeout(Duration::from_secs(2))
///     .request_timeout(Duration::from_secs(10))
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    ticket: Ticket,
    options: ClientOptions,
}

impl ClientBuilder {
    /// A builder for `ticket` with default settings.
    pub fn new(ticket: Ticket) -> Self {
        Self {
            ticket,
            options: ClientOptions::default(),
        }
    }

    /// Longest wait for one address to answer (QUIC handshake and hello). Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.options.connect_timeout = timeout;
        self
    }

    /// Longest wait for the answer to one request (one page of a scan). Default 30 s.
    /// Watches are not limited.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.options.request_timeout = timeout;
        self
    }

    /// Keep-alive interval, `None` for none. Default 5 s.
    pub fn keep_alive(mut self, interval: Option<Duration>) -> Self {
        self.options.keep_alive = interval;
        self
    }

    /// How long a silent connection lives before it counts as lost. Default 30 s.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.options.idle_timeout = timeout;
        self
    }

    /// Keys per scan request, clamped to `1..=MAX_SCAN_LIMIT`. Default 1000.
    pub fn scan_page_size(mut self, keys: u32) -> Self {
        self.options.scan_page = keys.clamp(1, MAX_SCAN_LIMIT);
        self
    }

    /// Whether requests answered with one frame share one pipelined stream per connection
    /// (default), or each go on a QUIC stream of their own, as scans and watches do.
    pub fn pipeline(mut self, on: bool) -> Self {
        self.options.pipeline = on;
        self
    }

    /// Connects to the first address of the ticket that answers, and authenticates.
    pub async fn connect(self) -> Result<Client, ConnectError> {
        Client::connect_with(self.ticket, self.options).await
    }
}
