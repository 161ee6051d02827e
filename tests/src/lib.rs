//! Shared helpers of wasp's integration tests and benchmarks: the guest components built
//! by `build.rs`, a real server on `127.0.0.1:0`, and an HTTP client for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use wasp_gateway::{RuntimeConfig, Server, ServerConfig};

pub mod flood;
pub mod load;
pub mod process;

/// Readies a benchmark's plot at `path`: its directory made, and the font the plots use
/// (one that ships in a crate, so that no system font is needed) registered.
pub fn prepare_plot(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    plotters::style::register_font(
        "sans-serif",
        plotters::style::FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    )
    .map_err(|_| anyhow::anyhow!("the plot font did not load"))
}

/// Paths of the guest components, built once by `build.rs`.
pub mod guests {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

/// An HTTP response, read whole.
#[derive(Debug)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A keep-alive HTTP client for one server.
#[derive(Clone)]
pub struct TestClient {
    base: String,
    http: HyperClient<HttpConnector, Full<Bytes>>,
    key: Option<String>,
}

impl TestClient {
    /// A client for `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
            key: None,
        }
    }

    /// A client for `addr` that sends `key` as `Authorization: Bearer`.
    pub fn with_key(addr: SocketAddr, key: &str) -> Self {
        Self {
            key: Some(key.to_owned()),
            ..Self::new(addr)
        }
    }

    /// A client for the server at `addr` on `data_dir`, with the operator key its first
    /// start wrote there.
    pub fn operator(addr: SocketAddr, data_dir: &Path) -> Self {
        let key = operator_key(data_dir);
        crate::load::authorize(addr, &key);
        Self::with_key(addr, &key)
    }

    /// The API key it sends, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The same server with another key (`None`: no key).
    pub fn as_key(&self, key: Option<&str>) -> Self {
        Self {
            base: self.base.clone(),
            http: self.http.clone(),
            key: key.map(str::to_owned),
        }
    }

    /// Sends a request.
    pub async fn request(&self, method: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        self.request_with(method, path, &[], body).await
    }

    /// Sends a request with extra headers.
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        self.try_request_with(method, path, headers, body)
            .await
            .unwrap()
    }

    /// Sends a request; `Err` when the connection fails (the server died, say).
    pub async fn try_request_with(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let own_key = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        if let (Some(key), false) = (&self.key, own_key) {
            builder = builder.header("authorization", format!("Bearer {key}"));
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let response = self
            .http
            .request(builder.body(Full::new(body.into())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// GET.
    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, Bytes::new()).await
    }

    /// POST.
    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.request("POST", path, body).await
    }

    /// POST of a JSON body, as `application/json`.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.request_with(
            "POST",
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    /// Uploads a component file; returns `sha256:<hex>`.
    pub async fn upload(&self, wasm: &str) -> String {
        let bytes = std::fs::read(wasm).unwrap();
        let reply = self.request("PUT", "/api/v1/components", bytes).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        reply.json()["digest"].as_str().unwrap().to_owned()
    }

    /// Uploads the component at `wasm`, puts `{COMPONENT}` in `spec_toml` in its place,
    /// and deploys it with PUT.
    pub async fn deploy(&self, wasm: &str, spec_toml: &str) -> Reply {
        let digest = self.upload(wasm).await;
        let spec = spec_toml.replace("{COMPONENT}", &digest);
        let name = spec
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned())
            .unwrap();
        let path = format!(
            "/api/v1/endpoints/{}",
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        );
        self.request_with("PUT", &path, &[("content-type", "application/toml")], spec)
            .await
    }

    /// Deploys and asserts success.
    pub async fn deploy_ok(&self, wasm: &str, spec_toml: &str) -> Value {
        let reply = self.deploy(wasm, spec_toml).await;
        assert!(
            reply.status == 200 || reply.status == 201,
            "deploy failed: {} {}",
            reply.status,
            reply.text()
        );
        reply.json()
    }

    /// Makes an API key of `role` in `tenant` (with this client's key, an operator's or
    /// the tenant's admin's) and answers it.
    pub async fn make_key(&self, tenant: &str, role: &str) -> String {
        let made = self
            .post_json(
                "/api/v1/keys",
                &serde_json::json!({ "tenant": tenant, "role": role, "name": format!("{tenant} {role}") }),
            )
            .await;
        assert_eq!(made.status, 201, "{}", made.text());
        made.json()["key"].as_str().unwrap_or_default().to_owned()
    }

    /// Every request record of endpoint `name`, once `count` are written (panics after
    /// 10 s).
    pub async fn records(&self, name: &str, count: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let listing = self.get(&format!("/api/v1/endpoints/{name}/records")).await;
            assert_eq!(listing.status, 200, "{}", listing.text());
            let mut all = Vec::new();
            for file in listing.json()["files"].as_array().unwrap() {
                let file = file["name"].as_str().unwrap();
                let text = self
                    .get(&format!("/api/v1/endpoints/{name}/records/{file}"))
                    .await;
                assert_eq!(text.status, 200);
                assert_eq!(text.header("content-type"), Some("application/jsonl"));
                for line in text.text().lines() {
                    all.push(serde_json::from_str::<Value>(line).unwrap());
                }
            }
            if all.len() >= count {
                return all;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {count}",
                all.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// POSTs `body` to an endpoint's invoke route, with `path` below it.
    pub async fn invoke(&self, name: &str, path: &str, body: impl Into<Bytes>) -> Reply {
        let name = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
        self.post(&format!("/endpoints/{name}/invoke{path}"), body)
            .await
    }
}

/// A spec for one version with backend `none` whose component is `{COMPONENT}`, plus
/// `extra` TOML lines inside the version.
pub fn spec(name: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n{extra}\n[versions.processor]\ncomponent = \"{{COMPONENT}}\"\n"
    )
}

/// A model router for processors run outside a server (benchmarks): every model is missing.
pub struct NoModels;

impl wasp_wasm::ModelRouter for NoModels {
    fn infer(
        &self,
        _caller: std::sync::Arc<str>,
        model: String,
        _input: wasp_wasm::ModelInput,
    ) -> wasp_wasm::BoxFuture<'static, Result<Vec<wasp_wasm::ModelOutput>, wasp_wasm::GuestError>>
    {
        Box::pin(async move {
            Err(wasp_wasm::GuestError::new(
                wasp_wasm::ErrorCode::NotFound,
                format!("model not found: `{model}`"),
            ))
        })
    }
}

/// The backends of the real binary, with containers run by the `process` driver (records
/// in `DATA_DIR/containers`) and volumes allowed below the temporary directory and the
/// models directory.
pub fn backends(data_dir: &Path) -> wasp_backend::Registry {
    let driver = wasp_container::ProcessDriver::new(data_dir.join("containers")).unwrap();
    backends_with(std::sync::Arc::new(driver))
}

/// The backends of the real binary, with containers run by `driver`.
pub fn backends_with(driver: std::sync::Arc<dyn wasp_container::Driver>) -> wasp_backend::Registry {
    let mut registry = wasp_backend::Registry::new();
    registry.register(std::sync::Arc::new(wasp_candle::CandleFactory));
    let containers = wasp_container::ContainerFactory::new(
        driver,
        vec![
            std::env::temp_dir(),
            models_dir().canonicalize().unwrap_or_else(|_| models_dir()),
        ],
    );
    containers.reclaim();
    registry.register(std::sync::Arc::new(containers));
    registry
}

/// Where the tests find named models: `WASP_MODELS_DIR`, else `target/models` (where
/// `./x test` has `scripts/fetch-model` put all-MiniLM-L6-v2).
pub fn models_dir() -> PathBuf {
    std::env::var_os("WASP_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/models"))
}

/// An embeddings endpoint over all-MiniLM-L6-v2 (found by name in the models directory)
/// with the `text-embeddings` processor, whose component is `{COMPONENT}`; `extra` TOML
/// lines go inside the version, before its processor table.
pub fn minilm_spec(name: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
[[versions]]
name = "v1"
backend = {{ kind = "candle", model = "all-MiniLM-L6-v2", task = "embeddings", device = "cpu" }}
{extra}
[versions.processor]
component = "{{COMPONENT}}"
mounts = [{{ host = {host:?}, guest = "/model" }}]
"#,
        host = minilm_dir().display().to_string()
    )
}

/// A text-generation endpoint over SmolLM2-135M-Instruct (found by name in the models
/// directory) with the `chat` processor, whose component is `{COMPONENT}`: at most
/// `sequences` decoded together, the processor's context cut to 512 tokens (so that a
/// prompt too long is quick to reach), 64 tokens by default.
pub fn smollm2_spec(name: &str, sequences: u32) -> String {
    format!(
        r#"name = "{name}"
[[versions]]
name = "v1"
backend = {{ kind = "candle", model = "SmolLM2-135M-Instruct", task = "generate", device = "cpu", max_sequences = {sequences}, kv_cache_mib = 256 }}
[versions.processor]
component = "{{COMPONENT}}"
mounts = [{{ host = {host:?}, guest = "/model" }}]
env = {{ CONTEXT_LENGTH = "512", DEFAULT_MAX_TOKENS = "64" }}
[versions.limits]
timeout_ms = 10000
"#,
        host = smollm2_dir().display().to_string()
    )
}

/// An embeddings endpoint whose model runs in a container: the KServe v2 model server
/// `model_server` (tests/src/bin/model-server.rs, run by the process driver) over
/// all-MiniLM-L6-v2, with `server_args` on its command line, `backend` extra keys of the
/// backend table and `extra` TOML lines inside the version; the `text-embeddings`
/// processor's component is `{COMPONENT}`.
pub fn model_server_spec(
    model_server: &str,
    name: &str,
    server_args: &str,
    backend: &str,
    extra: &str,
) -> String {
    format!(
        r#"name = "{name}"
[[versions]]
name = "v1"
[versions.backend]
kind = "container"
image = "local/model-server"
command = "exec {model_server} --model {model} {server_args}"
port = 8080
grace_period_s = 10
{backend}
{extra}
[versions.processor]
component = "{{COMPONENT}}"
mounts = [{{ host = {host:?}, guest = "/model" }}]
"#,
        model = minilm_dir().display(),
        host = minilm_dir().display().to_string()
    )
}

/// The socket of the Podman service `scripts/toolchain engine` starts
/// (`WASP_TEST_ENGINE` overrides it), if it answers; `None` (and a line saying what is
/// skipped) otherwise, except under CI (`CI` set), where no engine is a failure.
pub fn test_engine(skipping: &str) -> Option<String> {
    let socket = std::env::var("WASP_TEST_ENGINE").unwrap_or_else(|_| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/tools/podman/podman.sock")
            .display()
            .to_string()
    });
    let answers = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    // CI installs and starts the engine (`./x test` runs `scripts/toolchain all`): there,
    // a missing engine is a failure, not a skip.
    assert!(
        answers || std::env::var_os("CI").is_none(),
        "no container engine answers at {socket}, and CI must run {skipping}: \
         see target/tools/podman/service.log (`scripts/toolchain engine`)"
    );
    if !answers {
        eprintln!(
            "SKIPPED {skipping}: no container engine answers at {socket} \
             (`scripts/toolchain engine` starts one, as root)"
        );
    }
    answers.then_some(socket)
}

/// An embeddings endpoint whose model is the image `image` of the model server (see
/// [`model_server_image`]) run by a container engine, the models directory mounted at
/// `/models`; `backend` holds extra keys of the backend table and `extra` TOML lines after
/// it; the `text-embeddings` processor's component is `{COMPONENT}`.
pub fn model_image_spec(name: &str, image: &str, backend: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n[versions.backend]\n\
         kind = \"container\"\nimage = \"{image}\"\nport = 8080\n\
         volume = {models:?}\nmount_path = \"/models\"\n{backend}\n{extra}\n\
         [versions.processor]\ncomponent = \"{{COMPONENT}}\"\n\
         mounts = [{{ host = {host:?}, guest = \"/model\" }}]\n",
        models = models_dir()
            .canonicalize()
            .unwrap_or_else(|_| models_dir())
            .display()
            .to_string(),
        host = minilm_dir().display().to_string()
    )
}

/// A minimal image of the model server at `model_server` (the `model-server` binary),
/// imported into the engine as `localhost/wasp-model-server:test` (see
/// [`image_from_binary`]), its entrypoint serving `/models/all-MiniLM-L6-v2` on port 8080.
pub fn model_server_image(model_server: &str) -> String {
    image_from_binary(
        model_server,
        "localhost/wasp-model-server:test",
        &[
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
            "--model",
            "/models/all-MiniLM-L6-v2",
        ],
    )
}

/// A minimal image made offline from one program: `binary` as `/<its name>` and the shared
/// libraries it links (as `ldd` lists them) in an otherwise empty root, imported into the
/// engine as `tag`, with that program and `args` as its entrypoint. Returns `tag`.
pub fn image_from_binary(binary: &str, tag: &str, args: &[&str]) -> String {
    let root = tempfile::tempdir().unwrap();
    let name = Path::new(binary)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    std::fs::copy(binary, root.path().join(&name)).unwrap();
    let ldd = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
            let target = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(path, &target).unwrap();
        }
    }
    let tar = root.path().with_extension("tar");
    assert!(
        std::process::Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap()
            .success()
    );
    let entrypoint: Vec<String> = std::iter::once(format!("/{name}"))
        .chain(args.iter().map(|a| (*a).to_owned()))
        .collect();
    let change = format!("ENTRYPOINT {}", serde_json::to_string(&entrypoint).unwrap());
    podman(&["import", "--change", &change, tar.to_str().unwrap(), tag]);
    let _ = std::fs::remove_file(&tar);
    // The image this tag named before, now untagged.
    podman(&["image", "prune", "-f"]);
    tag.to_owned()
}

/// Runs the podman CLI (the engine's own tool, for what an image's author does by hand);
/// panics with its error output when it fails.
pub fn podman(args: &[&str]) {
    let out = std::process::Command::new("podman")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The all-MiniLM-L6-v2 directory; panics with the command that fetches it when missing.
pub fn minilm_dir() -> PathBuf {
    let dir = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").exists(),
        "{} is missing: run `scripts/fetch-model {}` (./x test does)",
        dir.display(),
        models_dir().display()
    );
    dir
}

/// The SmolLM2-135M-Instruct directory (model.gguf, tokenizer.json, tokenizer_config.json);
/// panics with the command that fetches it when missing.
pub fn smollm2_dir() -> PathBuf {
    let dir = models_dir().join("SmolLM2-135M-Instruct");
    assert!(
        dir.join("model.gguf").exists() && dir.join("tokenizer_config.json").exists(),
        "{} is missing: run `scripts/fetch-model {}` (./x test does)",
        dir.display(),
        models_dir().display()
    );
    dir
}

/// The operator key the first start of a server on `data_dir` wrote there.
pub fn operator_key(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join(wasp_gateway::OPERATOR_KEY_FILE))
        .unwrap()
        .trim()
        .to_owned()
}

/// A real server on `127.0.0.1:0` with its own data directory.
pub struct TestServer {
    /// The running server.
    pub server: Server,
    /// A client for it.
    pub client: TestClient,
    /// Its data directory (removed on drop unless `keep`).
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server on a fresh data directory.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in(&path).await;
        server._dir = Some(dir);
        server
    }

    /// Also serves KServe v2 over gRPC (`wasp serve --grpc-listen`) on a free loopback
    /// port, and answers its address.
    pub async fn serve_grpc(&mut self) -> SocketAddr {
        let service = wasp_grpc::service(self.server.api());
        self.server
            .serve_h2(SocketAddr::from(([127, 0, 0, 1], 0)), service)
            .await
            .unwrap()
    }

    /// Starts a server on a fresh data directory with these HTTP limits.
    pub async fn start_with(http: wasp_gateway::HttpLimits) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in_with(&path, http).await;
        server._dir = Some(dir);
        server
    }

    /// Starts a server on `data_dir` (which the caller keeps).
    pub async fn start_in(data_dir: &Path) -> Self {
        Self::start_in_with(data_dir, wasp_gateway::HttpLimits::default()).await
    }

    /// Starts a server on a fresh data directory with this GPU inventory.
    pub async fn start_with_gpus(gpus: wasp_gateway::Inventory) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut server =
            Self::start_in_full(&path, wasp_gateway::HttpLimits::default(), gpus).await;
        server._dir = Some(dir);
        server
    }

    /// Starts a server on a fresh data directory whose container backends run through the
    /// container engine at `socket` (a Docker Engine API socket).
    pub async fn start_with_engine(socket: &str) -> Self {
        let socket = socket.to_owned();
        Self::start_configured(move |config| {
            // The default registry's process driver holds the state directory: let it go.
            config.backends = wasp_backend::Registry::new();
            let driver =
                wasp_container::EngineDriver::open(&socket, &config.data_dir.join("containers"))
                    .unwrap();
            config.backends = backends_with(std::sync::Arc::new(driver));
        })
        .await
    }

    /// Starts a server on a fresh data directory with the test settings changed by
    /// `configure`.
    pub async fn start_configured(configure: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in_configured(&path, configure).await;
        server._dir = Some(dir);
        server
    }

    async fn start_in_with(data_dir: &Path, http: wasp_gateway::HttpLimits) -> Self {
        Self::start_in_full(data_dir, http, wasp_gateway::Inventory::default()).await
    }

    async fn start_in_full(
        data_dir: &Path,
        http: wasp_gateway::HttpLimits,
        gpus: wasp_gateway::Inventory,
    ) -> Self {
        Self::start_in_configured(data_dir, |config| {
            config.http = http;
            config.gpus = std::sync::Arc::new(gpus);
        })
        .await
    }

    async fn start_in_configured(
        data_dir: &Path,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: data_dir.to_path_buf(),
            runtime: RuntimeConfig {
                max_total_instances: 200,
                // For profiling benchmarks: guest functions named for `perf`.
                perf_map: std::env::var_os("WASP_GUEST_PERF_MAP").is_some(),
                ..RuntimeConfig::default()
            },
            backends: backends(data_dir),
            models_dir: Some(models_dir()),
            http: wasp_gateway::HttpLimits::default(),
            gpus: std::sync::Arc::new(wasp_gateway::Inventory::default()),
            batch_mounts: vec![std::env::temp_dir()],
            webhook_ca: Vec::new(),
            insecure_registries: Vec::new(),
            // The default tenant may mount temporary directories and the models, and reach
            // loopback: what the tests' specs ask for.
            mount_roots: vec![std::env::temp_dir(), models_dir()],
            allow_hosts: vec!["127.0.0.1:*".into()],
            credentials: None,
            tls: None,
            behind_tls_proxy: false,
            jobs: None,
        };
        configure(&mut config);
        let server = Server::start(config).await.unwrap();
        let client = TestClient::operator(server.local_addr(), data_dir);
        Self {
            server,
            client,
            data_dir: data_dir.to_path_buf(),
            _dir: None,
        }
    }

    /// Shuts the server down gracefully.
    pub async fn stop(self) {
        self.server.shutdown().await;
    }
}

/// The median and 99th percentile of a benchmark's samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// Median.
    pub p50: std::time::Duration,
    /// 99th percentile.
    pub p99: std::time::Duration,
}

/// Runs `f` a tenth of `iterations` times to warm up, then `iterations` times, timing each
/// run (for benchmarks).
pub async fn time<F, Fut>(iterations: usize, mut f: F) -> Summary
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..iterations / 10 {
        f().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = std::time::Instant::now();
        f().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len().max(1) - 1) as f64 * q) as usize];
    Summary {
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// A `nats-server` on a loopback port; killed when dropped.
pub struct NatsServer {
    child: std::process::Child,
    port: u16,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    store: PathBuf,
    jetstream: bool,
    /// More arguments (a cluster's routes, a configuration file).
    extra: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The nats-server `scripts/toolchain nats` installs, if it is there.
fn nats_binary() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/nats-server");
    let found = path.exists();
    assert!(
        found || std::env::var_os("CI").is_none(),
        "no nats-server at {}; CI installs it (scripts/toolchain nats)",
        path.display()
    );
    if !found {
        eprintln!("SKIPPED the cluster tests: no nats-server (scripts/toolchain nats installs it)");
    }
    found.then_some(path)
}

impl NatsServer {
    /// Starts one on a free loopback port (with JetStream on `store` if `jetstream`);
    /// `None` (saying so) when there is no nats-server, which under CI is a failure.
    pub fn start(store: &Path, jetstream: bool) -> Option<Self> {
        Self::start_on(store, jetstream, free_port(), Vec::new())
    }

    /// Starts one with JetStream that syncs every write to disk before it acknowledges
    /// it (`sync_interval: always`), as durable on one machine as the embedded store.
    pub fn start_syncing(store: &Path) -> Option<Self> {
        std::fs::create_dir_all(store).unwrap();
        let config = store.join("nats.conf");
        std::fs::write(&config, "jetstream {\n  sync_interval: always\n}\n").unwrap();
        let extra = vec!["-c".to_owned(), config.display().to_string()];
        Self::start_on(store, true, free_port(), extra)
    }

    /// Starts one with JetStream and `config` (nats-server's configuration format: logins,
    /// TLS) in a file.
    pub fn start_with_config(store: &Path, config: &str) -> Option<Self> {
        std::fs::create_dir_all(store).unwrap();
        let file = store.join("nats.conf");
        std::fs::write(&file, config).unwrap();
        let extra = vec!["-c".to_owned(), file.display().to_string()];
        Self::start_on(store, true, free_port(), extra)
    }

    /// Starts a NATS cluster of `size` servers with JetStream (each with its store below
    /// `store`), routed to each other; `None` as [`NatsServer::start`].
    pub fn start_cluster(store: &Path, size: usize) -> Option<Vec<Self>> {
        nats_binary()?;
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let all_routes = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let extra = vec![
                "--server_name".to_owned(),
                format!("n{i}"),
                "--cluster_name".to_owned(),
                "wasp".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".to_owned(),
                all_routes.clone(),
            ];
            let dir = store.join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            servers.push(Self::start_on(&dir, true, free_port(), extra)?);
        }
        Some(servers)
    }

    fn start_on(store: &Path, jetstream: bool, port: u16, extra: Vec<String>) -> Option<Self> {
        let binary = nats_binary()?;
        let mut command = std::process::Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(&extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if jetstream {
            command.arg("-js").arg("-sd").arg(store);
        }
        let child = command.spawn().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nats-server did not listen"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(Self {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store: store.to_owned(),
            jetstream,
            extra,
        })
    }

    /// Stops it and starts it again on the same port and store.
    pub fn restart(&mut self, down: std::time::Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        let again =
            Self::start_on(&self.store, self.jetstream, self.port, self.extra.clone()).unwrap();
        let old = std::mem::replace(self, again);
        std::mem::forget(old);
    }
}

impl NatsServer {
    /// Kills it (`SIGKILL`), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
