//! The `engine` driver: containers through the Docker Engine API of whichever engine the
//! operator runs — Docker, or Podman's compatible service (`podman system service`) — on a
//! unix socket. Each worker is one container, labelled with its endpoint, version and the
//! server that owns it, its port published on 127.0.0.1 only.
//!
//! The calls are few and small, so they are plain blocking HTTP/1.1 over a fresh
//! connection each (`Connection: close`); only a container's log stream stays open.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;

use serde_json::{Value, json};
use wasp_backend::BackendError;
use wasp_core::ContainerBackend;

use crate::driver::{Driver, Instance, Launch, Lines, Login};

/// The API version asked for (Docker 20.10; Podman's compatible service answers it).
const API: &str = "/v1.41";

/// Longest answer read from the engine for a control call.
const MAX_ANSWER: usize = 16 << 20;

/// Talks to a container engine's Docker-compatible API.
pub struct EngineDriver {
    socket: PathBuf,
    /// The `wasp.owner` label of this server's containers.
    owner: String,
    /// Held while this driver lives (see [`crate::driver::lock_state_dir`]).
    _lock: Option<Arc<std::fs::File>>,
    /// Ids of the images this server pulled with a registry login, and where that list is
    /// kept (`<state dir>/private-images`).
    private: Arc<PrivateImages>,
}

/// The images pulled with a registry login. The engine keeps one copy of an image for
/// everyone, so such an image is pulled again, with the deployer's own login or none,
/// before each container is made from it: the registry, not the engine's cache, decides
/// who may run it.
struct PrivateImages {
    ids: Mutex<BTreeSet<String>>,
    file: PathBuf,
}

impl PrivateImages {
    fn load(file: PathBuf) -> Self {
        let ids = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            ids: Mutex::new(ids),
            file,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    fn insert(&self, id: &str) -> std::io::Result<()> {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if ids.insert(id.to_owned()) {
            let text: String = ids.iter().map(|i| format!("{i}\n")).collect();
            wasp_core::files::write_atomic(&self.file, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The `X-Registry-Auth` header of a pull with `login`: base64url of its JSON.
fn registry_auth(login: &Login, registry: &str) -> String {
    let json = json!({
        "username": login.username,
        "password": login.password,
        "serveraddress": registry,
    });
    base64::engine::general_purpose::URL_SAFE.encode(json.to_string())
}

/// Tries of a container's removal that the engine refuses.
const REMOVE_ATTEMPTS: u32 = 20;
/// The wait between them.
const REMOVE_RETRY: Duration = Duration::from_millis(250);

/// An engine answer.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The engine's own words for a failure (`{"message": ...}`), or the body.
    fn message(&self) -> String {
        match self.json()["message"].as_str() {
            Some(m) => m.to_owned(),
            None => String::from_utf8_lossy(&self.body[..self.body.len().min(512)]).into_owned(),
        }
    }
}

fn unavailable(socket: &std::path::Path, e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!(
        "the container engine at unix://{} does not answer: {e}",
        socket.display()
    ))
}

/// Reads an HTTP/1.1 response head; returns the status and whether the body is chunked
/// (else its length, if given).
fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, bool, Option<usize>)> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked") {
                chunked = true;
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().ok();
            }
        }
    }
    Ok((status, chunked, length))
}

/// A chunked body as a reader of its content.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            let size = line.trim().split(';').next().unwrap_or_default();
            self.left = usize::from_str_radix(size, 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let want = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
            return Ok(0);
        }
        self.left -= n;
        if self.left == 0 {
            let mut crlf = String::new();
            self.inner.read_line(&mut crlf)?;
        }
        Ok(n)
    }
}

impl EngineDriver {
    /// A driver for the engine at `socket` (`unix:///run/podman/podman.sock` or a plain
    /// path) whose server state (its lock, its owner id) is in `state_dir`. Fails when
    /// another live server holds `state_dir`.
    pub fn open(socket: &str, state_dir: &std::path::Path) -> std::io::Result<Self> {
        let lock = crate::driver::lock_state_dir(state_dir)?;
        let owner = crate::driver::owner_id(state_dir)?;
        Ok(Self {
            socket: PathBuf::from(socket.strip_prefix("unix://").unwrap_or(socket)),
            owner,
            _lock: Some(Arc::new(lock)),
            private: Arc::new(PrivateImages::load(state_dir.join("private-images"))),
        })
    }

    /// The same engine and owner, for one container's own calls.
    fn handle(&self) -> Self {
        Self {
            socket: self.socket.clone(),
            owner: self.owner.clone(),
            _lock: None,
            private: self.private.clone(),
        }
    }

    /// Whether the engine answers.
    pub fn ping(&self) -> Result<(), BackendError> {
        let answer = self.call("GET", "/_ping", None)?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(unavailable(
                &self.socket,
                format!("ping answered {}", answer.status),
            ))
        }
    }

    /// Opens a request and returns the response head and a reader of its body.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
        auth: Option<&str>,
    ) -> Result<(u16, Box<dyn Read + Send>), BackendError> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| unavailable(&self.socket, e))?;
        stream
            .set_read_timeout(timeout)
            .map_err(|e| unavailable(&self.socket, e))?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {API}{path} HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            payload.len()
        );
        if body.is_some() {
            request.push_str("Content-Type: application/json\r\n");
        }
        if let Some(auth) = auth {
            request.push_str(&format!("X-Registry-Auth: {auth}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&payload);
        (&stream)
            .write_all(request.as_bytes())
            .map_err(|e| unavailable(&self.socket, e))?;
        let mut reader = BufReader::new(stream);
        let (status, chunked, length) =
            read_head(&mut reader).map_err(|e| unavailable(&self.socket, e))?;
        let body: Box<dyn Read + Send> = if chunked {
            Box::new(Chunked {
                inner: reader,
                left: 0,
                done: false,
            })
        } else if let Some(n) = length {
            Box::new(reader.take(n as u64))
        } else {
            Box::new(reader)
        };
        Ok((status, body))
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, BackendError> {
        self.call_with(method, path, body, None)
    }

    /// Removes a container (by id or name), killing it if it runs. An engine that refuses
    /// for now (the container is still being created or started, say, which takes longer
    /// on a loaded machine) is asked again, for up to 5 s; one that says it has no such
    /// container is done. Whether it is gone.
    fn remove_container(&self, id: &str) -> bool {
        for attempt in 0..REMOVE_ATTEMPTS {
            match self.call("DELETE", &format!("/containers/{id}?force=true"), None) {
                Ok(answer) if answer.status < 300 || answer.status == 404 => return true,
                Ok(answer) if attempt + 1 == REMOVE_ATTEMPTS => {
                    tracing::warn!(
                        id,
                        status = answer.status,
                        "the engine would not remove a container: {}",
                        String::from_utf8_lossy(&answer.body)
                    );
                }
                Err(e) if attempt + 1 == REMOVE_ATTEMPTS => {
                    tracing::warn!(id, "cannot remove a container: {e}");
                }
                _ => {}
            }
            std::thread::sleep(REMOVE_RETRY);
        }
        false
    }

    fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        auth: Option<&str>,
    ) -> Result<Answer, BackendError> {
        let (status, reader) =
            self.request(method, path, body, Some(Duration::from_secs(600)), auth)?;
        let mut bytes = Vec::new();
        reader
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut bytes)
            .map_err(|e| unavailable(&self.socket, e))?;
        Ok(Answer {
            status,
            body: bytes,
        })
    }

    /// The id of the image `encoded` names, if the engine has it.
    fn image_id(&self, encoded: &str) -> Result<Option<String>, BackendError> {
        let answer = self.call("GET", &format!("/images/{encoded}/json"), None)?;
        Ok((answer.status == 200)
            .then(|| answer.json()["Id"].as_str().map(str::to_owned))
            .flatten())
    }

    /// Makes sure the image is there, pulling it as `pull` says (with `login`, if the
    /// deployer has one for its registry). An image this server pulled with a login is
    /// pulled again whatever `pull` says, so that the registry decides whether this
    /// deployer may have it.
    fn ensure_image(
        &self,
        spec: &ContainerBackend,
        login: Option<&Login>,
    ) -> Result<(), BackendError> {
        let image = &spec.image;
        let encoded = percent(image);
        let id = self.image_id(&encoded)?;
        let private = id.as_deref().is_some_and(|id| self.private.contains(id));
        match (spec.pull.as_str(), id.is_some()) {
            _ if private => {}
            ("never", false) => {
                return Err(BackendError::bad_input(
                    format!("image `{image}` is not in the engine, and `pull` is `never`"),
                    "image",
                ));
            }
            ("missing", true) | ("never", true) => return Ok(()),
            _ => {}
        }
        let registry = crate::driver::registry_of(image);
        let auth = login.map(|l| registry_auth(l, registry));
        let answer = self.call_with(
            "POST",
            &format!("/images/create?fromImage={encoded}"),
            None,
            auth.as_deref(),
        )?;
        // The engine streams progress; an error shows as a status or an `error` line.
        let text = String::from_utf8_lossy(&answer.body);
        let failed = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|v| v["error"].as_str().map(str::to_owned));
        let refused = ["unauthorized", "authentication", "denied"]
            .iter()
            .any(|w| text.to_ascii_lowercase().contains(w));
        let hint = if !refused {
            String::new()
        } else if login.is_none() && private {
            format!(
                " (the image came from a registry login; this endpoint's tenant has none for \
                 `{registry}`: PUT /api/v1/registries/{registry})"
            )
        } else if login.is_none() {
            format!(" (a private image needs a login: PUT /api/v1/registries/{registry})")
        } else {
            String::new()
        };
        match (answer.status, failed) {
            (200, None) => {}
            (_, Some(e)) => {
                return Err(BackendError::Load(format!(
                    "cannot pull `{image}`: {e}{hint}"
                )));
            }
            (status, None) => {
                return Err(BackendError::Load(format!(
                    "cannot pull `{image}` ({status}): {}{hint}",
                    answer.message()
                )));
            }
        }
        if login.is_some()
            && let Some(id) = self.image_id(&encoded)?
        {
            self.private.insert(&id).map_err(|e| {
                BackendError::Load(format!("cannot record `{image}` as private: {e}"))
            })?;
        }
        Ok(())
    }

    /// Follows a container's output into `lines` (stdout and stderr, multiplexed in
    /// 8-byte-headed frames as the API sends them without a TTY).
    fn follow_logs(&self, id: &str, lines: Arc<Lines>) {
        let Ok((200, mut body)) = self.request(
            "GET",
            &format!("/containers/{id}/logs?follow=true&stdout=true&stderr=true"),
            None,
            None,
            None,
        ) else {
            return;
        };
        std::thread::spawn(move || {
            let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
            let mut header = [0u8; 8];
            while body.read_exact(&mut header).is_ok() {
                let stream = usize::from(header[0] == 2);
                let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                let mut frame = vec![0u8; size as usize];
                if body.read_exact(&mut frame).is_err() {
                    break;
                }
                let buf = &mut partial[stream];
                buf.extend_from_slice(&frame);
                while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&line);
                    lines.push(stream == 1, text.trim_end_matches(['\n', '\r']).to_owned());
                }
            }
            for (stream, rest) in partial.iter().enumerate() {
                if !rest.is_empty() {
                    lines.push(stream == 1, String::from_utf8_lossy(rest).into_owned());
                }
            }
        });
    }
}

/// The engine's create request for `spec`, and the port key (`8080/tcp`) it publishes.
fn create_body(spec: &ContainerBackend, labels: &BTreeMap<String, String>) -> (Value, String) {
    let port = format!("{}/tcp", spec.port);
    let mut host = json!({
        "PortBindings": { &port: [{ "HostIp": "127.0.0.1", "HostPort": "" }] },
    });
    if let Some(mib) = spec.memory_mib {
        host["Memory"] = json!(u64::from(mib) << 20);
    }
    if let Some(cpus) = spec.cpus {
        host["NanoCpus"] = json!((cpus * 1e9) as u64);
    }
    if let (Some(volume), Some(path)) = (&spec.volume, &spec.mount_path) {
        host["Binds"] = json!([format!("{volume}:{path}")]);
    }
    if !spec.gpus.is_empty() {
        // The engine's GPU runtime shows the container these devices only (numbered from
        // 0 inside), as `docker run --gpus '"device=1,3"'` does.
        host["DeviceRequests"] = json!([{
            "Driver": "nvidia",
            "DeviceIDs": spec.gpus.iter().map(u32::to_string).collect::<Vec<_>>(),
            "Capabilities": [["gpu"]],
        }]);
    }
    let mut body = json!({
        "Image": spec.image,
        "Env": spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "ExposedPorts": { &port: {} },
        "Labels": labels,
        "HostConfig": host,
    });
    if let Some(command) = &spec.command {
        body["Entrypoint"] = json!([spec.shell, "-c"]);
        body["Cmd"] = json!([command]);
    }
    (body, port)
}

/// Percent-encodes a path segment or query value.
fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Driver for EngineDriver {
    fn name(&self) -> &'static str {
        "engine"
    }

    fn check(&self, _spec: &ContainerBackend) -> Result<(), BackendError> {
        Ok(())
    }

    fn launch(&self, launch: Launch) -> Result<Box<dyn Instance>, BackendError> {
        let spec = &launch.spec;
        self.ensure_image(spec, launch.login.as_ref())?;
        let mut labels = launch.labels.clone();
        labels.insert("wasp.owner".into(), self.owner.clone());
        let (body, port) = create_body(spec, &labels);
        let name = percent(&launch.name);
        // A container of that name left from before (this server's own, by its name):
        // gone first.
        self.remove_container(&name);
        let created = self.call(
            "POST",
            &format!("/containers/create?name={name}"),
            Some(&body),
        )?;
        if created.status != 201 {
            let message = created.message();
            return Err(if created.status == 404 {
                BackendError::bad_input(format!("image `{}`: {message}", spec.image), "image")
            } else {
                BackendError::Load(format!(
                    "the engine refused the container ({}): {message}",
                    created.status
                ))
            });
        }
        let id = created.json()["Id"].as_str().unwrap_or_default().to_owned();
        let container = Container {
            engine: self.handle(),
            id: id.clone(),
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        let started = self.call("POST", &format!("/containers/{id}/start"), None)?;
        if !matches!(started.status, 204 | 304) {
            container.remove();
            return Err(BackendError::Load(format!(
                "the engine could not start the container ({}): {}",
                started.status,
                started.message()
            )));
        }
        self.follow_logs(&id, launch.lines.clone());
        let inspected = self
            .call("GET", &format!("/containers/{id}/json"), None)?
            .json();
        let host_port = inspected["NetworkSettings"]["Ports"][&port][0]["HostPort"]
            .as_str()
            .and_then(|p| p.parse::<u16>().ok());
        let Some(host_port) = host_port else {
            let state = inspected["State"]["Status"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned();
            // It may have exited at once: let the readiness wait say so, with its lines.
            if state == "exited" {
                return Ok(Box::new(container));
            }
            container.remove();
            return Err(BackendError::Load(format!(
                "the engine published no host port for {port} (container {state})"
            )));
        };
        tracing::info!(name = %launch.name, id = %id, host_port, "started container");
        Ok(Box::new(Container {
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, host_port)),
            ..container
        }))
    }

    fn reclaim(&self) -> usize {
        let filters =
            percent(&json!({ "label": [format!("wasp.owner={}", self.owner)] }).to_string());
        let Ok(answer) = self.call(
            "GET",
            &format!("/containers/json?all=true&filters={filters}"),
            None,
        ) else {
            return 0;
        };
        let mut found = 0;
        for c in answer.json().as_array().into_iter().flatten() {
            if let Some(id) = c["Id"].as_str() {
                tracing::warn!(id, "removing a container a previous run left behind");
                if self.remove_container(id) {
                    found += 1;
                }
            }
        }
        found
    }
}

/// One engine container.
struct Container {
    engine: EngineDriver,
    id: String,
    address: SocketAddr,
}

impl Container {
    fn signal(&self, signal: &str) {
        let _ = self.engine.call(
            "POST",
            &format!("/containers/{}/kill?signal={signal}", self.id),
            None,
        );
    }
}

impl Instance for Container {
    fn address(&self) -> SocketAddr {
        self.address
    }

    fn exited(&self) -> Option<String> {
        let answer = match self
            .engine
            .call("GET", &format!("/containers/{}/json", self.id), None)
        {
            Ok(a) => a,
            Err(e) => return Some(e.to_string()),
        };
        if answer.status == 404 {
            return Some("removed from the engine".into());
        }
        let state = answer.json()["State"].clone();
        match state["Status"].as_str() {
            Some("exited" | "dead" | "stopped") => Some(format!(
                "exit status {}{}",
                state["ExitCode"],
                if state["OOMKilled"] == true {
                    ", out of memory"
                } else {
                    ""
                }
            )),
            _ => None,
        }
    }

    fn terminate(&self) {
        self.signal("SIGTERM");
    }

    fn kill(&self) {
        self.signal("SIGKILL");
    }

    fn remove(&self) {
        self.engine.remove_container(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_name_their_registry_as_docker_does() {
        use crate::driver::registry_of;
        assert_eq!(registry_of("ghcr.io/org/model:1"), "ghcr.io");
        assert_eq!(registry_of("127.0.0.1:5556/wasp/m:test"), "127.0.0.1:5556");
        assert_eq!(registry_of("localhost/m"), "localhost");
        assert_eq!(registry_of("library/busybox"), "docker.io");
        assert_eq!(registry_of("busybox:1.36"), "docker.io");
    }

    #[test]
    fn the_registry_auth_header_is_base64url_json() {
        let login = Login {
            username: "robot".into(),
            password: "p?a>ss".into(),
        };
        let header = registry_auth(&login, "ghcr.io");
        assert!(!header.contains(['+', '/']));
        let decoded = base64::engine::general_purpose::URL_SAFE
            .decode(header)
            .unwrap();
        let value: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(
            value,
            json!({"username": "robot", "password": "p?a>ss", "serveraddress": "ghcr.io"})
        );
        // Never in a log line.
        assert!(!format!("{login:?}").contains("p?a>ss"));
    }

    #[test]
    fn images_pulled_with_a_login_stay_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("private-images");
        let private = PrivateImages::load(file.clone());
        assert!(!private.contains("sha256:aa"));
        private.insert("sha256:aa").unwrap();
        private.insert("sha256:aa").unwrap();
        assert!(private.contains("sha256:aa"));
        let again = PrivateImages::load(file);
        assert!(again.contains("sha256:aa"));
        assert!(!again.contains("sha256:bb"));
    }

    fn spec() -> ContainerBackend {
        serde_json::from_value(json!({
            "image": "registry.example/minilm:1", "port": 8080, "command": "serve --fast",
            "env": {"A": "1"}, "memory_mib": 512, "cpus": 1.5,
            "volume": "/srv/models", "mount_path": "/models"
        }))
        .unwrap()
    }

    #[test]
    fn the_create_request_says_what_the_spec_says() {
        let mut spec = spec();
        spec.gpus = vec![1, 3];
        let labels = BTreeMap::from([("wasp.endpoint".to_owned(), "e".to_owned())]);
        let (body, port) = create_body(&spec, &labels);
        assert_eq!(port, "8080/tcp");
        assert_eq!(body["Image"], "registry.example/minilm:1");
        assert_eq!(body["Entrypoint"], json!(["/bin/sh", "-c"]));
        assert_eq!(body["Cmd"], json!(["serve --fast"]));
        assert_eq!(body["Env"], json!(["A=1"]));
        assert_eq!(body["Labels"]["wasp.endpoint"], "e");
        let host = &body["HostConfig"];
        assert_eq!(host["PortBindings"]["8080/tcp"][0]["HostIp"], "127.0.0.1");
        assert_eq!(host["Memory"], 512u64 << 20);
        assert_eq!(host["NanoCpus"], 1_500_000_000u64);
        assert_eq!(host["Binds"], json!(["/srv/models:/models"]));
        assert_eq!(host["DeviceRequests"][0]["DeviceIDs"], json!(["1", "3"]));
        assert_eq!(host["DeviceRequests"][0]["Capabilities"], json!([["gpu"]]));
    }

    #[test]
    fn without_a_command_the_image_entrypoint_runs_and_no_gpu_is_asked() {
        let mut spec = spec();
        spec.command = None;
        let (body, _) = create_body(&spec, &BTreeMap::new());
        assert!(body.get("Entrypoint").is_none() && body.get("Cmd").is_none());
        assert!(body["HostConfig"].get("DeviceRequests").is_none());
    }

    #[test]
    fn chunked_answers_are_read_whole() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let mut reader = BufReader::new(&raw[..]);
        let (status, chunked, _) = read_head(&mut reader).unwrap();
        assert_eq!((status, chunked), (200, true));
        let mut body = String::new();
        Chunked {
            inner: reader,
            left: 0,
            done: false,
        }
        .read_to_string(&mut body)
        .unwrap();
        assert_eq!(body, "hello world");
    }
}
