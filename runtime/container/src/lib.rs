//! The container backend of wasp: each worker is one container that answers HTTP on one
//! port, started through a [`Driver`] — an existing container engine, or the `process`
//! driver that runs the same contract as a local, unsandboxed process.
//!
//! A worker is ready once its readiness probe answers 2xx (its load returns only then, so
//! the gateway's worker states gate traffic on it); a container that exits or never becomes
//! ready fails the worker with its last output lines. A liveness probe, when set, restarts
//! the container after `failure_threshold` failures in a row, with backoff, and says why in
//! the endpoint's logs. Stopping sends SIGTERM, waits the grace period, then SIGKILL.
//!
//! A processor's model input reaches the container as a KServe v2 JSON inference request
//! (`inference_path`), and the container's KServe v2 answer comes back as the model output.
#![deny(missing_docs)]

mod driver;
mod engine;
mod http;
mod process;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tokio::sync::watch;
use wasp_backend::{Backend, BackendError, BackendFactory, LoadContext, Result};
use wasp_core::kserve::{tensor_from_object, tensor_object};
use wasp_core::{BackendSpec, ContainerBackend, ModelInput, ModelOutput, Probe};

pub use driver::{Driver, Instance, Launch, Lines, Login, registry_of};
pub use engine::EngineDriver;
pub use process::ProcessDriver;

use crate::http::Http;

/// Lines of output quoted when a container fails to start.
const QUOTED_LINES: usize = 10;

/// Longest pause between restarts of a failing container.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Serves `backend.kind = "container"`.
pub struct ContainerFactory {
    driver: Arc<dyn Driver>,
    volume_roots: Vec<PathBuf>,
    http: Http,
    launched: AtomicU64,
    /// The workers this factory loaded (those still alive can be upgraded).
    workers: Mutex<Vec<std::sync::Weak<Worker>>>,
    /// Stops under way (a dropped worker's container being given its grace period).
    stopping: Stopping,
}

/// The threads stopping containers, to wait for at shutdown.
type Stopping = Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>;

impl ContainerFactory {
    /// A factory that starts containers through `driver` and allows host-path volumes
    /// only below `volume_roots`.
    pub fn new(driver: Arc<dyn Driver>, volume_roots: Vec<PathBuf>) -> Self {
        Self {
            driver,
            volume_roots,
            http: Http::new(),
            launched: AtomicU64::new(0),
            workers: Mutex::new(Vec::new()),
            stopping: Stopping::default(),
        }
    }

    /// Stops every container this factory started, each with its grace period, then
    /// removes whatever this server still owns, and returns once all are gone (blocking:
    /// call it at shutdown, off the async workers).
    pub fn stop_all(&self) {
        let workers: Vec<Arc<Worker>> = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .filter_map(|w| w.upgrade())
            .collect();
        let mut running = Vec::new();
        for worker in &workers {
            let _ = worker.stop.send(true);
            let previous = std::mem::replace(
                &mut *worker.state.lock().unwrap_or_else(|e| e.into_inner()),
                State::Stopped,
            );
            if let State::Running(instance) = previous {
                instance.terminate();
                running.push((instance, Duration::from_secs(worker.spec.grace_period_s)));
            }
        }
        let mut threads: Vec<_> = running
            .into_iter()
            .map(|(instance, grace)| {
                std::thread::spawn(move || finish_stop(instance.as_ref(), grace))
            })
            .collect();
        threads.extend(
            self.stopping
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..),
        );
        for thread in threads {
            let _ = thread.join();
        }
        // Whatever a worker dropped while this ran left behind (its stopping thread not yet
        // listed), and anything else this server owns: gone before the server is.
        let swept = self.driver.reclaim();
        if swept > 0 {
            tracing::warn!("removed {swept} containers at shutdown that had not stopped yet");
        }
    }

    /// Stops what an earlier run of the server left behind; see [`Driver::reclaim`].
    pub fn reclaim(&self) -> usize {
        self.driver.reclaim()
    }

    fn check_volume(&self, volume: &str) -> Result<()> {
        let path = Path::new(volume);
        if !path.is_absolute() {
            let named = !volume.is_empty()
                && volume
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                && volume.as_bytes()[0].is_ascii_alphanumeric();
            return if named {
                Ok(())
            } else {
                Err(BackendError::bad_input(
                    format!("`{volume}` is neither an absolute host path nor a volume name"),
                    "volume",
                ))
            };
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(BackendError::bad_input(
                "a host path may not contain `..`",
                "volume",
            ));
        }
        if !self.volume_roots.iter().any(|root| path.starts_with(root)) {
            return Err(BackendError::bad_input(
                if self.volume_roots.is_empty() {
                    format!(
                        "{volume} is a host path, and this server allows none \
                         (`wasp serve --volume-root DIR` allows those below DIR)"
                    )
                } else {
                    format!(
                        "{volume} is outside the host paths this server allows ({})",
                        self.volume_roots
                            .iter()
                            .map(|r| r.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                "volume",
            ));
        }
        Ok(())
    }
}

fn container_spec(spec: &BackendSpec) -> Result<&ContainerBackend> {
    match spec {
        BackendSpec::Container(c) => Ok(c),
        other => Err(BackendError::Load(format!(
            "the container backend cannot load a `{}` backend",
            other.kind()
        ))),
    }
}

impl BackendFactory for ContainerFactory {
    fn kind(&self) -> &'static str {
        "container"
    }

    fn check(&self, spec: &BackendSpec) -> Result<()> {
        let spec = container_spec(spec)?;
        if let Some(volume) = &spec.volume {
            self.check_volume(volume)?;
        }
        self.driver.check(spec)
    }

    fn load(&self, spec: &BackendSpec, context: &LoadContext) -> Result<Arc<dyn Backend>> {
        let spec: ContainerBackend = container_spec(spec)?.clone();
        self.check(&BackendSpec::Container(Box::new(spec.clone())))?;
        let handle = Handle::try_current()
            .map_err(|e| BackendError::Load(format!("no async runtime to run on: {e}")))?;
        let n = self.launched.fetch_add(1, Ordering::Relaxed);
        let name = format!("wasp-{}-{}-{n}", context.endpoint, context.version).replace(
            |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "-",
        );
        let labels = BTreeMap::from([
            ("wasp.endpoint".to_owned(), context.endpoint.clone()),
            ("wasp.version".to_owned(), context.version.clone()),
        ]);
        let lines = Lines::new(context.log.clone());
        let (stop, stopped) = watch::channel(false);
        let worker = Arc::new(Worker {
            stopping: self.stopping.clone(),
            driver: self.driver.clone(),
            http: self.http.clone(),
            spec,
            name,
            labels,
            lines,
            state: Mutex::new(State::Restarting("starting".to_owned())),
            handle: handle.clone(),
            stop,
            registry_logins: context.registry_logins.clone(),
        });
        let instance = worker.launch()?;
        if let Err(e) = handle.block_on(worker.until_ready(instance.as_ref(), &stopped)) {
            worker.stop_instance(instance);
            return Err(BackendError::Load(e));
        }
        *worker.state.lock().unwrap_or_else(|e| e.into_inner()) =
            State::Running(Arc::from(instance));
        handle.spawn(worker.clone().watch(stopped));
        {
            let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
            workers.retain(|w| w.strong_count() > 0);
            workers.push(Arc::downgrade(&worker));
        }
        Ok(Arc::new(ContainerModel { worker }))
    }
}

enum State {
    Running(Arc<dyn Instance>),
    /// Not serving, and why.
    Restarting(String),
    Stopped,
}

/// One worker's container and what it needs to restart it.
struct Worker {
    /// Where its stopping thread is left for [`ContainerFactory::stop_all`] to wait for.
    stopping: Stopping,
    driver: Arc<dyn Driver>,
    http: Http,
    spec: ContainerBackend,
    name: String,
    labels: BTreeMap<String, String>,
    lines: Arc<Lines>,
    state: Mutex<State>,
    handle: Handle,
    stop: watch::Sender<bool>,
    /// The deploying tenant's registry logins, looked up at each launch.
    registry_logins: Option<wasp_backend::RegistryLogins>,
}

impl Worker {
    /// Where the running container answers; why it cannot now, if it cannot.
    fn address(&self) -> Result<SocketAddr> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running(instance) => Ok(instance.address()),
            State::Restarting(reason) => Err(BackendError::Unavailable(format!(
                "the container is restarting: {reason}"
            ))),
            State::Stopped => Err(BackendError::Unavailable("the container stopped".into())),
        }
    }

    fn launch(&self) -> Result<Box<dyn Instance>> {
        self.driver.launch(Launch {
            name: self.name.clone(),
            labels: self.labels.clone(),
            spec: self.spec.clone(),
            lines: self.lines.clone(),
            login: self
                .registry_logins
                .as_ref()
                .and_then(|logins| logins(crate::driver::registry_of(&self.spec.image)))
                .map(|(username, password)| crate::driver::Login { username, password }),
        })
    }

    fn last_lines(&self) -> String {
        let tail = self.lines.tail(QUOTED_LINES);
        if tail.is_empty() {
            "it wrote nothing".to_owned()
        } else {
            format!("its last lines:\n{tail}")
        }
    }

    async fn probe(&self, address: SocketAddr, probe: &Probe) -> std::result::Result<(), String> {
        let answer = self
            .http
            .get(
                address,
                &probe.path,
                Duration::from_millis(probe.timeout_ms),
            )
            .await?;
        if (200..300).contains(&answer.status) {
            Ok(())
        } else {
            Err(format!("{} answered {}", probe.path, answer.status))
        }
    }

    /// Waits until the readiness probe passes; fails when the container exits, the start
    /// timeout passes, or the worker is stopped.
    async fn until_ready(
        &self,
        instance: &dyn Instance,
        stopped: &watch::Receiver<bool>,
    ) -> std::result::Result<(), String> {
        let probe = &self.spec.readiness;
        let deadline = Instant::now() + Duration::from_secs(self.spec.start_timeout_s);
        tokio::time::sleep(Duration::from_millis(probe.initial_delay_ms)).await;
        loop {
            if *stopped.borrow() {
                return Err("stopped before it was ready".to_owned());
            }
            if let Some(status) = instance.exited() {
                return Err(format!(
                    "the container exited ({status}) before it was ready; {}",
                    self.last_lines()
                ));
            }
            let last = match self.probe(instance.address(), probe).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "the container was not ready after {} s (readiness probe: {last}); {}",
                    self.spec.start_timeout_s,
                    self.last_lines()
                ));
            }
            tokio::time::sleep(Duration::from_millis(probe.period_ms)).await;
        }
    }

    /// SIGTERM, up to the grace period for it to exit, then SIGKILL; then removal.
    fn stop_instance(&self, instance: Box<dyn Instance>) {
        stop_gracefully(
            instance.as_ref(),
            Duration::from_secs(self.spec.grace_period_s),
        );
    }

    /// Watches the running container: restarts it when it exits or fails its liveness
    /// probe `failure_threshold` times in a row, until the worker stops.
    async fn watch(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let period = self
            .spec
            .liveness
            .as_ref()
            .map_or(Duration::from_millis(500), |p| {
                Duration::from_millis(p.period_ms)
            });
        let mut failures = 0u32;
        let mut restarts = 0u32;
        let mut healthy_since = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stopped.changed() => return,
            }
            if *stopped.borrow() {
                return;
            }
            let Some(instance) = self.running() else {
                return;
            };
            let reason = if let Some(status) = instance.exited() {
                Some(format!("the container exited ({status})"))
            } else if let Some(probe) = &self.spec.liveness {
                match self.probe(instance.address(), probe).await {
                    Ok(()) => {
                        failures = 0;
                        None
                    }
                    Err(e) => {
                        failures += 1;
                        (failures >= probe.failure_threshold).then(|| {
                            format!("the liveness probe failed {failures} times in a row ({e})")
                        })
                    }
                }
            } else {
                None
            };
            let Some(reason) = reason else { continue };
            failures = 0;
            if healthy_since.elapsed() > MAX_BACKOFF * 2 {
                restarts = 0;
            }
            if !self
                .restart(instance, reason, &mut restarts, &mut stopped)
                .await
            {
                return;
            }
            healthy_since = Instant::now();
        }
    }

    fn running(&self) -> Option<Arc<dyn Instance>> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running(instance) => Some(instance.clone()),
            _ => None,
        }
    }

    /// Replaces a failed container, with backoff between attempts. False when the worker
    /// stopped meanwhile.
    async fn restart(
        self: &Arc<Self>,
        old: Arc<dyn Instance>,
        reason: String,
        restarts: &mut u32,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*state, State::Stopped) {
                return false;
            }
            *state = State::Restarting(reason.clone());
        }
        tracing::warn!(name = %self.name, "restarting: {reason}");
        let grace = Duration::from_secs(self.spec.grace_period_s);
        let _ = tokio::task::spawn_blocking(move || stop_gracefully(old.as_ref(), grace)).await;
        loop {
            let backoff = Duration::from_secs(1u64 << (*restarts).min(6)).min(MAX_BACKOFF);
            *restarts += 1;
            self.lines.push(
                true,
                format!(
                    "wasp: restarting the container in {} s (restart {}): {reason}",
                    backoff.as_secs(),
                    *restarts
                ),
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped.changed() => return false,
            }
            let this = self.clone();
            let launched = tokio::task::spawn_blocking(move || this.launch()).await;
            let instance = match launched {
                Ok(Ok(instance)) => instance,
                Ok(Err(e)) => {
                    self.lines.push(true, format!("wasp: cannot restart: {e}"));
                    continue;
                }
                Err(e) => {
                    self.lines.push(true, format!("wasp: cannot restart: {e}"));
                    continue;
                }
            };
            match self.until_ready(instance.as_ref(), stopped).await {
                Ok(()) => {
                    let instance: Arc<dyn Instance> = Arc::from(instance);
                    let installed = {
                        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        let stopped = matches!(*state, State::Stopped);
                        if !stopped {
                            *state = State::Running(instance.clone());
                        }
                        !stopped
                    };
                    if !installed {
                        let _ = tokio::task::spawn_blocking(move || {
                            stop_gracefully(instance.as_ref(), grace)
                        })
                        .await;
                        return false;
                    }
                    self.lines
                        .push(false, "wasp: the container is ready again".to_owned());
                    return true;
                }
                Err(e) => {
                    self.lines.push(true, format!("wasp: {e}"));
                    let _ = tokio::task::spawn_blocking(move || {
                        stop_gracefully(instance.as_ref(), grace)
                    })
                    .await;
                    if *stopped.borrow() {
                        return false;
                    }
                }
            }
        }
    }
}

/// SIGTERM, then up to `grace` for the container to exit, then SIGKILL; then removal.
fn stop_gracefully(instance: &dyn Instance, grace: Duration) {
    if instance.exited().is_none() {
        instance.terminate();
    }
    finish_stop(instance, grace);
}

/// Up to `grace` for a container told to stop to exit, then SIGKILL; then removal.
fn finish_stop(instance: &dyn Instance, grace: Duration) {
    if instance.exited().is_none() {
        let deadline = Instant::now() + grace;
        while instance.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if instance.exited().is_none() {
            instance.kill();
        }
    }
    instance.remove();
}

/// A loaded container worker, as the gateway's batcher sees it.
struct ContainerModel {
    worker: Arc<Worker>,
}

impl Drop for ContainerModel {
    fn drop(&mut self) {
        // The worker is drained (no request in flight): stop its container without holding
        // up whoever dropped it.
        let _ = self.worker.stop.send(true);
        let previous = std::mem::replace(
            &mut *self.worker.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Stopped,
        );
        if let State::Running(instance) = previous {
            // SIGTERM now, so that even a server on its way out has asked.
            instance.terminate();
            let grace = Duration::from_secs(self.worker.spec.grace_period_s);
            let name = self.worker.name.clone();
            let thread = std::thread::spawn(move || {
                finish_stop(instance.as_ref(), grace);
                tracing::info!(%name, "container stopped");
            });
            let mut stopping = self
                .worker
                .stopping
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            stopping.retain(|t| !t.is_finished());
            stopping.push(thread);
        }
    }
}

/// The KServe v2 request body for a model input.
fn request_body(input: &ModelInput) -> Result<Bytes> {
    let inputs = input
        .tensors
        .iter()
        .map(|t| {
            tensor_object(t).ok_or_else(|| {
                BackendError::bad_input(
                    format!(
                        "tensor `{}` ({:?}) has no KServe v2 JSON encoding",
                        t.name, t.dtype
                    ),
                    t.name.clone(),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut body = json!({ "inputs": inputs });
    if let Some(parameters) = &input.parameters
        && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(parameters)
    {
        body["parameters"] = Value::Object(map);
    }
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| BackendError::Inference(format!("cannot encode the request: {e}")))
}

/// A quote of a body for an error message: the first 512 bytes, as text.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    text.trim().to_owned()
}

/// The model output in a container's KServe v2 answer.
fn parse_answer(status: u16, body: &[u8]) -> Result<ModelOutput> {
    if (400..500).contains(&status) {
        return Err(BackendError::BadInput {
            message: format!(
                "the container refused the input ({status}): {}",
                quote(body)
            ),
            field: None,
        });
    }
    if !(200..300).contains(&status) {
        return Err(BackendError::Inference(format!(
            "the container answered {status}: {}",
            quote(body)
        )));
    }
    let bad = |why: String| {
        BackendError::Inference(format!(
            "the container's answer is not a KServe v2 response: {why}"
        ))
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let outputs = value["outputs"]
        .as_array()
        .ok_or_else(|| bad("no `outputs` list".into()))?;
    let tensors = outputs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            tensor_from_object(out).map_err(|(field, e)| bad(format!("outputs[{i}].{field}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = match &value["parameters"] {
        Value::Null => None,
        other => Some(other.to_string()),
    };
    Ok(ModelOutput {
        tensors,
        metadata,
        index: 0,
        last: true,
    })
}

impl Backend for ContainerModel {
    fn infer_batch(&self, inputs: &[ModelInput]) -> Result<Vec<ModelOutput>> {
        let worker = &self.worker;
        let address = worker.address()?;
        let bodies = inputs
            .iter()
            .map(request_body)
            .collect::<Result<Vec<_>>>()?;
        let path = worker.spec.inference_path.as_str();
        // One request per input, all at once: the container batches them if it can.
        let calls = bodies.into_iter().map(|body| {
            let http = worker.http.clone();
            async move {
                let answer = http
                    .post_json(address, path, body, Duration::from_secs(600))
                    .await
                    .map_err(|e| {
                        BackendError::Unavailable(format!("the container did not answer: {e}"))
                    })?;
                parse_answer(answer.status, &answer.body)
            }
        });
        worker
            .handle
            .block_on(futures_util::future::join_all(calls))
            .into_iter()
            .collect()
    }

    fn forwards(&self) -> bool {
        true
    }

    fn forward(&self, request: wasp_backend::RawRequest) -> wasp_backend::Forwarded {
        let worker = self.worker.clone();
        Box::pin(async move {
            let address = worker.address()?;
            worker
                .http
                .forward(address, request, Duration::from_secs(600))
                .await
                .map_err(|e| {
                    BackendError::Unavailable(format!("the container did not answer: {e}"))
                })
        })
    }

    fn unhealthy(&self) -> Option<String> {
        match &*self.worker.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running(_) => None,
            State::Restarting(reason) => Some(format!("the container is restarting: {reason}")),
            State::Stopped => Some("the container stopped".into()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} ({} driver)",
            self.worker.spec.image,
            self.worker.driver.name()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasp_core::Tensor;

    #[test]
    fn inputs_go_out_as_kserve_and_answers_come_back() {
        let input = ModelInput {
            tensors: vec![Tensor::from_i64("input_ids", vec![1, 3], &[101, 7, 102])],
            parameters: Some(r#"{"normalize":true}"#.into()),
        };
        let body: Value = serde_json::from_slice(&request_body(&input).unwrap()).unwrap();
        assert_eq!(body["inputs"][0]["datatype"], "INT64");
        assert_eq!(body["inputs"][0]["shape"], json!([1, 3]));
        assert_eq!(body["inputs"][0]["data"], json!([101, 7, 102]));
        assert_eq!(body["parameters"]["normalize"], true);

        let answer = br#"{"model_name":"m","outputs":[{"name":"embedding","shape":[1,2],
            "datatype":"FP32","data":[[0.5,-1.0]]}],"parameters":{"tokens":3}}"#;
        let out = parse_answer(200, answer).unwrap();
        assert_eq!(out.tensors[0].to_f32().unwrap(), [0.5, -1.0]);
        assert_eq!(out.metadata.as_deref(), Some(r#"{"tokens":3}"#));
        assert!(out.last);
    }

    #[test]
    fn bad_answers_are_clear_errors() {
        assert!(matches!(
            parse_answer(422, b"bad shape"),
            Err(BackendError::BadInput { .. })
        ));
        let e = parse_answer(500, b"boom").unwrap_err().to_string();
        assert!(e.contains("500") && e.contains("boom"), "{e}");
        let e = parse_answer(200, b"{}").unwrap_err().to_string();
        assert!(e.contains("outputs"), "{e}");
        let e = parse_answer(
            200,
            br#"{"outputs":[{"name":"y","shape":[3],"datatype":"FP32","data":[1]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("outputs[0].data"), "{e}");
    }

    #[test]
    fn volumes_stay_inside_the_allowed_roots() {
        let driver = Arc::new(ProcessDriver::new(tempfile::tempdir().unwrap().keep()).unwrap());
        let factory = ContainerFactory::new(driver, vec![PathBuf::from("/srv/models")]);
        assert!(factory.check_volume("/srv/models/minilm").is_ok());
        assert!(factory.check_volume("models-cache").is_ok());
        for bad in ["/", "/etc", "/srv/models/../../etc", "../x", "-rf", ""] {
            assert!(factory.check_volume(bad).is_err(), "{bad}");
        }
    }
}
