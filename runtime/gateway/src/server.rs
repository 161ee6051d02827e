//! The listening server: accept loop, graceful shutdown, periodic upkeep.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;
use wasp_wasm::RuntimeConfig;

use crate::{Error, Gateway};

/// How long shutdown waits for in-flight requests.
const DRAIN: Duration = Duration::from_secs(30);
/// How often idle instances are trimmed and warm ones replenished.
const HOUSEKEEPING: Duration = Duration::from_secs(10);
/// How often the TLS certificate's files are looked at for a renewal.
const TLS_RELOAD: Duration = Duration::from_secs(5);
/// How often every version's autoscaler decides.
const AUTOSCALE: Duration = Duration::from_secs(1);

/// Most headers a request may carry; more is answered `431`.
const MAX_REQUEST_HEADERS: usize = 100;
/// Most bytes a request's head (request line and headers) may take; more is answered
/// `431`.
const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// What `wasp serve` is started with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// The data directory: store, components, compiled cache.
    pub data_dir: PathBuf,
    /// Engine settings (its cache directory is set from `data_dir`).
    pub runtime: RuntimeConfig,
    /// The model backends this build serves.
    pub backends: wasp_backend::Registry,
    /// Where named models are found; `<data_dir>/models` when `None`.
    pub models_dir: Option<PathBuf>,
    /// Limits of the HTTP server.
    pub http: HttpLimits,
    /// The GPUs workers may own (`--gpus`).
    pub gpus: Arc<wasp_scaling::Inventory>,
    /// Directories a batch may read its input from by path (`--batch-mount`).
    pub batch_mounts: Vec<PathBuf>,
    /// PEM files of CA certificates that webhook receivers' certificates may chain to,
    /// besides the system's trusted roots (`--webhook-ca`).
    pub webhook_ca: Vec<PathBuf>,
    /// Registries spoken to over plain HTTP when pulling processors published as OCI
    /// artifacts (`--insecure-registry`); loopback ones always are.
    pub insecure_registries: Vec<String>,
    /// Host directories the default tenant's processors may mount below (`--mount-root`);
    /// other tenants get what an operator grants them.
    pub mount_roots: Vec<PathBuf>,
    /// Addresses the default tenant's processors may be allowed to reach (`--allow-host`,
    /// `IP:PORT` or `IP:*`).
    pub allow_hosts: Vec<String>,
    /// The CLI's credentials file, into which the first start writes its operator key
    /// for the server's loopback URLs; `None` writes only `<data_dir>/operator.key`.
    pub credentials: Option<PathBuf>,
    /// Serve HTTPS with this certificate and key (`--tls-cert`, `--tls-key`), reloaded
    /// when the files change.
    pub tls: Option<crate::tls::TlsFiles>,
    /// The server sits behind a proxy that terminates TLS (`--behind-tls-proxy`): API keys
    /// are taken over plain HTTP from any address. Without it (and without `tls`), keys
    /// are refused over plain HTTP except from loopback clients.
    pub behind_tls_proxy: bool,
    /// Where jobs are kept when not in the data directory: a cluster's queue, shared by
    /// its nodes (`wasp serve --cluster`).
    pub jobs: Option<SharedQueue>,
}

/// A job queue that several servers share (a cluster's), for [`ServerConfig::jobs`].
#[derive(Clone)]
pub struct SharedQueue(pub Arc<dyn wasp_jobs::JobQueue>);

impl std::fmt::Debug for SharedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedQueue")
    }
}

/// The file in the data directory that holds the operator key the first start made.
pub const OPERATOR_KEY_FILE: &str = "operator.key";

/// Limits of the HTTP server, against slow or greedy clients.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Longest any request may take before it is answered 504 (`request_timeout`).
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers before the connection closes.
    pub header_read_timeout: Duration,
    /// Most open connections; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// How long a kept-alive connection may sit with no request before it is closed. One
    /// that never sends a request gets `header_read_timeout`; and since the wait for the
    /// next request's headers counts against `header_read_timeout` too, the shorter of the
    /// two closes an idle connection.
    pub idle_timeout: Duration,
    /// Most open connections from one client address; more are closed at once.
    pub max_connections_per_client: usize,
    /// Most requests in flight from one client address; more are answered `429`.
    pub max_requests_per_client: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(30),
            max_connections_per_client: 512,
            max_requests_per_client: 512,
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    tls: Option<Arc<crate::tls::Reloading>>,
    gateway: Arc<Gateway>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    /// The HTTP listener's accept loop, then any added by [`Server::serve_h2`].
    accept: Vec<JoinHandle<()>>,
    upkeep: JoinHandle<()>,
}

/// The whole API as one call, for another protocol's front end (gRPC) to serve through:
/// every request gets the HTTP API's authentication, tenancy, limits, records and
/// timeouts.
#[derive(Clone)]
pub struct Api {
    shared: Arc<Shared>,
}

impl Api {
    /// Answers one request as the HTTP server would. The request should carry the
    /// client's address as a [`ClientAddr`] extension; one without it is taken as from
    /// beyond loopback.
    pub async fn call(
        &self,
        request: axum::http::Request<axum::body::Body>,
    ) -> axum::response::Response {
        let peer = request
            .extensions()
            .get::<ClientAddr>()
            .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |a| a.0);
        self.shared.answer(request, peer).await
    }
}

/// The first start of a data directory makes an operator key, and writes it where the
/// operator finds it: `<data_dir>/operator.key`, and the CLI's credentials file for the
/// server's loopback URLs.
fn first_operator_key(
    gateway: &Gateway,
    data_dir: &std::path::Path,
    credentials: Option<&std::path::Path>,
    addr: SocketAddr,
    scheme: &str,
) -> Result<(), Error> {
    let (key, token) = gateway.directory.create_key(
        &gateway.store,
        crate::tenants::DEFAULT,
        crate::tenants::Role::Operator,
        "first operator key",
        None,
    )?;
    let path = data_dir.join(OPERATOR_KEY_FILE);
    wasp_core::files::write_atomic_with(&path, |file| {
        use std::io::Write;
        wasp_core::credentials::restrict(file)?;
        writeln!(file, "{token}")
    })
    .map_err(|e| Error::io("writing the operator key", Some(path.clone()), e))?;
    tracing::info!(key = %key.id, path = %path.display(), "made the first operator key");
    if let Some(credentials) = credentials
        && (addr.ip().is_loopback() || addr.ip().is_unspecified())
    {
        for host in ["127.0.0.1", "localhost"] {
            let url = format!("{scheme}://{host}:{}", addr.port());
            if let Err(e) = wasp_core::credentials::Credentials::store(credentials, &url, &token) {
                tracing::warn!("cannot write the operator key for the CLI: {e}");
            }
        }
    }
    Ok(())
}

impl Server {
    /// Opens the data directory (loading every stored endpoint), binds, and serves.
    pub async fn start(config: ServerConfig) -> Result<Self, Error> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::OpenStore(format!(
                "cannot create the data directory {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let models_dir = config
            .models_dir
            .clone()
            .unwrap_or_else(|| config.data_dir.join("models"));
        let gateway = Gateway::open(
            &config.data_dir,
            config.runtime,
            config.backends,
            models_dir,
            config.gpus.clone(),
            &config.webhook_ca,
            &config.insecure_registries,
            config.jobs.map(|q| q.0),
        )
        .await?;
        for (k, entry) in config.allow_hosts.iter().enumerate() {
            if wasp_core::spec::parse_allow_host(entry).is_none() {
                return Err(Error::Setting(format!(
                    "--allow-host `{entry}` (#{}) is not IP:PORT or IP:*",
                    k + 1
                )));
            }
        }
        gateway
            .directory
            .set_default_policy(crate::tenants::AccessPolicy {
                mount_roots: config.mount_roots.clone(),
                allow_hosts: config.allow_hosts.clone(),
            });
        let mounts = config
            .batch_mounts
            .iter()
            .map(|m| {
                m.canonicalize()
                    .map_err(|e| Error::Setting(format!("--batch-mount {}: {e}", m.display())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        *gateway
            .batches
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = mounts;
        let (listener, addr) = bind(config.listen).await?;
        let tls = match config.tls {
            Some(files) => Some(Arc::new(crate::tls::Reloading::new(files)?)),
            None => None,
        };
        let tls_on = tls.is_some();
        if !gateway.directory.has_keys() {
            first_operator_key(
                &gateway,
                &config.data_dir,
                config.credentials.as_deref(),
                addr,
                if tls_on { "https" } else { "http" },
            )?;
        }
        let acceptor = match &tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(
                tls.server_config(&[b"http/1.1"])?,
            )),
            None => None,
        };
        // Keys in clear text over a network are refused unless a proxy encrypts them.
        let plain_keys_refused =
            tls.is_none() && !config.behind_tls_proxy && !addr.ip().is_loopback();
        if plain_keys_refused {
            tracing::warn!(%addr, "serving plain HTTP beyond loopback: API keys are refused except from loopback clients (serve with --tls-cert/--tls-key, or pass --behind-tls-proxy)");
        }
        let (stop, stopped) = watch::channel(false);
        let app = crate::api::app(
            gateway.clone(),
            config.http.request_timeout,
            plain_keys_refused,
        );
        let shared = Arc::new(Shared {
            app,
            limits: config.http,
            clients: Arc::default(),
        });
        let accept = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            acceptor,
            Arc::new(Http1(shared.clone())),
            stopped,
        ));
        let keeper = gateway.clone();
        let reloading = tls.clone();
        let upkeep = tokio::spawn(async move {
            let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
            let mut autoscale = tokio::time::interval(AUTOSCALE);
            autoscale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut expire = tokio::time::interval(crate::jobs::EXPIRE_EVERY);
            let mut certificate = tokio::time::interval(TLS_RELOAD);
            let mut webhooks = tokio::time::interval(crate::webhooks::RESUME_EVERY);
            let mut history = tokio::time::interval(crate::history::INTERVAL);
            history.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // Resumed once already, at start.
            webhooks.tick().await;
            housekeeping.tick().await;
            loop {
                tokio::select! {
                    _ = certificate.tick(), if tls.is_some() => {
                        if let Some(tls) = &tls {
                            tls.refresh();
                        }
                    }
                    _ = housekeeping.tick() => keeper.housekeep().await,
                    _ = autoscale.tick() => keeper.autoscale(),
                    _ = expire.tick() => keeper.expire_jobs().await,
                    _ = webhooks.tick() => keeper.resume_webhooks().await,
                    _ = history.tick() => keeper.record_history(),
                }
            }
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "wasp is serving");
        Ok(Self {
            addr,
            tls: reloading,
            gateway,
            shared,
            stop,
            accept: vec![accept],
            upkeep,
        })
    }

    /// The API as one call, for another protocol's front end.
    pub fn api(&self) -> Api {
        Api {
            shared: self.shared.clone(),
        }
    }

    /// Serves `service` over HTTP/2 (over TLS with ALPN `h2` when the server has a
    /// certificate) on another address, with the HTTP server's connection limits, until
    /// the server stops: how gRPC is served. Each request carries the client's
    /// [`ClientAddr`]. Answers the bound address.
    pub async fn serve_h2<S, B>(
        &mut self,
        listen: SocketAddr,
        service: S,
    ) -> Result<SocketAddr, Error>
    where
        S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (listener, addr) = bind(listen).await?;
        let acceptor = match &self.tls {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(
                tls.server_config(&[b"h2"])?,
            )),
            None => None,
        };
        let serve = Arc::new(H2 {
            shared: self.shared.clone(),
            service,
        });
        self.accept.push(tokio::spawn(accept_loop(
            listener,
            self.shared.clone(),
            acceptor,
            serve,
            self.stop.subscribe(),
        )));
        tracing::info!(%addr, "serving HTTP/2 (gRPC)");
        Ok(addr)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's URL: `https://` when it serves TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The registry behind the server (for in-process deploys).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, lets in-flight requests and running jobs finish (up to 30 s each),
    /// and closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for accept in self.accept {
            let _ = accept.await;
        }
        self.upkeep.abort();
        let _ = self.upkeep.await;
        // Jobs running now may finish (no new ones start); what is left after the drain
        // time is queued again at the next start.
        self.gateway.running.drain(DRAIN).await;
        self.gateway.close();
        tracing::info!("wasp stopped");
    }
}

/// Binds `listen`, and answers the listener with the address it got.
async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let bound = |source| Error::Bind {
        addr: listen,
        source,
    };
    let listener = TcpListener::bind(listen).await.map_err(bound)?;
    let addr = listener.local_addr().map_err(bound)?;
    Ok((listener, addr))
}

/// The address a request came from (a request extension): per-client limits count by
/// it, and keys over plain HTTP are taken from loopback ones only.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// Open connections and requests in flight per client address.
#[derive(Default)]
struct Clients {
    by: Mutex<HashMap<IpAddr, (usize, usize)>>,
}

/// Holds one connection's or one request's place in [`Clients`].
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
    request: bool,
}

impl Clients {
    /// Takes a place for a connection (`request == false`) or a request, if the address
    /// has fewer than `max`.
    fn take(self: &Arc<Self>, ip: IpAddr, request: bool, max: usize) -> Option<ClientSlot> {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let entry = by.entry(ip).or_default();
        let count = if request { &mut entry.1 } else { &mut entry.0 };
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
            request,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut by = self.clients.by.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = by.get_mut(&self.ip) {
            let count = if self.request {
                &mut entry.1
            } else {
                &mut entry.0
            };
            *count = count.saturating_sub(1);
            if *entry == (0, 0) {
                by.remove(&self.ip);
            }
        }
    }
}

/// A connection's requests in flight and when it was last busy, for its idle timeout.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicUsize,
    last: Mutex<Instant>,
    /// Told when a request ends, so that the idle deadline is looked at again.
    ended: tokio::sync::Notify,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// When the connection would be closed as idle: `first` after it opened if it never
    /// sent a request, `idle` after its last answer otherwise; `None` while it serves.
    fn deadline(&self, first: Duration, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        Some(if self.served.load(Ordering::Acquire) == 0 {
            last + first
        } else {
            last + idle
        })
    }
}

/// What every connection shares.
struct Shared {
    app: crate::api::App,
    limits: HttpLimits,
    clients: Arc<Clients>,
}

impl Shared {
    /// Answers one request from `peer`, or 429 when the address has its most requests in
    /// flight.
    async fn answer<B>(
        &self,
        request: hyper::Request<B>,
        peer: SocketAddr,
    ) -> axum::response::Response
    where
        B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let slot = self
            .clients
            .take(peer.ip(), true, self.limits.max_requests_per_client);
        match slot {
            Some(_slot) => self.app.clone().serve(request).await,
            None => crate::api::ApiError::new(
                429,
                "too_many_requests_from_client",
                format!(
                    "this address has {} requests in flight, the most one address may",
                    self.limits.max_requests_per_client
                ),
            )
            .retry_after(Duration::from_secs(1))
            .into_response(),
        }
    }
}

/// How an accepted connection is served.
trait Serve: Send + Sync + 'static {
    /// Serves `io` from `peer` until it closes or the server stops.
    fn serve<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) -> impl std::future::Future<Output = ()> + Send
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
}

/// The HTTP API over HTTP/1.1.
struct Http1(Arc<Shared>);

impl Serve for Http1 {
    async fn serve<I>(self: Arc<Self>, io: I, peer: SocketAddr, stop: watch::Receiver<bool>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        connection(io, peer, &self.0, stop).await;
    }
}

/// A service over HTTP/2 (gRPC).
struct H2<S> {
    shared: Arc<Shared>,
    service: S,
}

impl<S, B> Serve for H2<S>
where
    S: tower::Service<hyper::Request<hyper::body::Incoming>, Response = hyper::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async fn serve<I>(self: Arc<Self>, io: I, peer: SocketAddr, mut stop: watch::Receiver<bool>)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = self.service.clone();
        let per_connection =
            service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ClientAddr(peer));
                service.clone().oneshot(request)
            });
        let limits = &self.shared.limits;
        let streams = u32::try_from(limits.max_requests_per_client).unwrap_or(u32::MAX);
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(streams.max(1))
            .max_header_list_size(u32::try_from(MAX_REQUEST_HEAD_BYTES).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(H2_KEEP_ALIVE))
            .keep_alive_timeout(H2_KEEP_ALIVE)
            .serve_connection(TokioIo::new(io), per_connection);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, "HTTP/2 connection ended: {e}");
                }
                return;
            }
            _ = stop.changed() => conn.as_mut().graceful_shutdown(),
        }
        if let Err(e) = conn.await {
            tracing::debug!(%peer, "HTTP/2 connection ended: {e}");
        }
    }
}

/// How often an HTTP/2 connection is pinged, and how long the answer may take before it
/// is closed as dead.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

async fn accept_loop<S: Serve>(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    serve: Arc<S>,
    mut stop: watch::Receiver<bool>,
) {
    let max = shared.limits.max_connections.max(1);
    let connections = Arc::new(Semaphore::new(max));
    loop {
        // At the connection limit, stop accepting until one closes.
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = shared.clients.take(
                    peer.ip(),
                    false,
                    shared.limits.max_connections_per_client,
                ) else {
                    tracing::debug!(%peer, "closed: the address has its most connections open");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (shared, stop, serve) = (shared.clone(), stop.clone(), serve.clone());
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve.serve(stream, peer, stop).await,
                        Some(acceptor) => {
                            let handshake = tokio::time::timeout(
                                shared.limits.header_read_timeout,
                                acceptor.accept(stream),
                            );
                            match handshake.await {
                                Ok(Ok(stream)) => serve.serve(stream, peer, stop).await,
                                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        }
                    }
                    drop(slot);
                    drop(permit);
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    // Every connection holds a permit: all of them back means all closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("some requests were still running after {DRAIN:?}");
    }
}

/// Serves one connection until it closes, is idle too long, or the server stops (then it
/// finishes the request under way and closes).
async fn connection<I>(
    io: I,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        served: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
        ended: tokio::sync::Notify::new(),
    });
    let service = {
        let (shared, activity) = (shared.clone(), activity.clone());
        service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let (shared, activity) = (shared.clone(), activity.clone());
            activity.in_flight.fetch_add(1, Ordering::AcqRel);
            request.extensions_mut().insert(ClientAddr(peer));
            async move {
                let response = shared.answer(request, peer).await;
                activity.touch();
                activity.served.fetch_add(1, Ordering::AcqRel);
                activity.in_flight.fetch_sub(1, Ordering::AcqRel);
                activity.ended.notify_one();
                Ok::<_, Infallible>(response)
            }
        })
    };
    let limits = &shared.limits;
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_REQUEST_HEADERS)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    loop {
        let idle_at = if closing {
            None
        } else {
            activity.deadline(limits.header_read_timeout, limits.idle_timeout)
        };
        // While a request runs, look again a little later.
        let wake = idle_at
            .unwrap_or_else(|| Instant::now() + limits.idle_timeout.min(Duration::from_secs(1)));
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
                return;
            }
            _ = stop.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.ended.notified(), if !closing => {}
            _ = tokio::time::sleep_until(wake.into()), if !closing => {
                if activity
                    .deadline(limits.header_read_timeout, limits.idle_timeout)
                    .is_some_and(|at| Instant::now() >= at)
                {
                    tracing::debug!(%peer, "closing an idle connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
