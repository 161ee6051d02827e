//! The listening server: accept loop, graceful shutdown, periodic upkeep.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use wasp_wasm::RuntimeConfig;

use crate::{Error, Gateway};

/// How long shutdown waits for in-flight requests.
const DRAIN: Duration = Duration::from_secs(30);
/// How often idle instances are trimmed and warm ones replenished.
const HOUSEKEEPING: Duration = Duration::from_secs(10);
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
    /// Host directories the default tenant's processors may mount below (`--mount-root`);
    /// other tenants get what an operator grants them.
    pub mount_roots: Vec<PathBuf>,
    /// Addresses the default tenant's processors may be allowed to reach (`--allow-host`,
    /// `IP:PORT` or `IP:*`).
    pub allow_hosts: Vec<String>,
    /// The CLI's credentials file, into which the first start writes its operator key
    /// for the server's loopback URLs; `None` writes only `<data_dir>/operator.key`.
    pub credentials: Option<PathBuf>,
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
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(30),
            max_connections: 10_000,
        }
    }
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
    upkeep: JoinHandle<()>,
}

/// The first start of a data directory makes an operator key, and writes it where the
/// operator finds it: `<data_dir>/operator.key`, and the CLI's credentials file for the
/// server's loopback URLs.
fn first_operator_key(
    gateway: &Gateway,
    data_dir: &std::path::Path,
    credentials: Option<&std::path::Path>,
    addr: SocketAddr,
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
            let url = format!("http://{host}:{}", addr.port());
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
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        if !gateway.directory.has_keys() {
            first_operator_key(
                &gateway,
                &config.data_dir,
                config.credentials.as_deref(),
                addr,
            )?;
        }
        let (stop, stopped) = watch::channel(false);
        let app = crate::api::app(gateway.clone(), config.http.request_timeout);
        let accept = tokio::spawn(accept_loop(listener, app, config.http, stopped));
        let keeper = gateway.clone();
        let upkeep = tokio::spawn(async move {
            let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
            let mut autoscale = tokio::time::interval(AUTOSCALE);
            autoscale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut expire = tokio::time::interval(crate::jobs::EXPIRE_EVERY);
            housekeeping.tick().await;
            loop {
                tokio::select! {
                    _ = housekeeping.tick() => keeper.housekeep().await,
                    _ = autoscale.tick() => keeper.autoscale(),
                    _ = expire.tick() => keeper.expire_jobs().await,
                }
            }
        });
        tracing::info!(%addr, data_dir = %config.data_dir.display(), "wasp is serving");
        Ok(Self {
            addr,
            gateway,
            stop,
            accept,
            upkeep,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The registry behind the server (for in-process deploys).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Stops accepting, lets in-flight requests and running jobs finish (up to 30 s each),
    /// and closes the store.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        self.upkeep.abort();
        let _ = self.upkeep.await;
        // Jobs running now may finish (no new ones start); what is left after the drain
        // time is queued again at the next start.
        self.gateway.running.drain(DRAIN).await;
        self.gateway.close();
        tracing::info!("wasp stopped");
    }
}

async fn accept_loop(
    listener: TcpListener,
    app: crate::api::App,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
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
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = service_fn(move |request| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(app.serve(request).await) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_headers(MAX_REQUEST_HEADERS)
                    .max_buf_size(MAX_REQUEST_HEAD_BYTES)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some requests were still running after {DRAIN:?}");
    }
}
