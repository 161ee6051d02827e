//! Endpoint specs: what a user deploys, as TOML (or the equivalent JSON).
//!
//! Every struct refuses unknown keys, so a typo is an error that names the key, and
//! [`EndpointSpec::validate`] checks what serde cannot (names, weights, bounds), naming the
//! offending field as a path such as `versions[1].weight`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest endpoint name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest version name, in characters.
pub const MAX_VERSION_NAME_CHARS: usize = 64;

/// A spec that could not be parsed or is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not valid TOML or JSON for a spec (the message names the key or line).
    #[error("invalid spec: {0}")]
    Parse(String),
    /// A field holds a value the runtime cannot accept.
    #[error("invalid spec: `{field}`: {message}")]
    Invalid {
        /// Path of the field, such as `versions[0].limits.timeout_ms`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl SpecError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field at fault, when the error names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Parse(_) => None,
            Self::Invalid { field, .. } => Some(field),
        }
    }
}

/// A deployable endpoint: a name and one or more versions sharing its traffic.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Unique name (UTF-8, at most 128 characters, no `/` or control characters).
    pub name: String,
    /// Free text shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The versions; traffic is split over them by `weight`.
    pub versions: Vec<VersionSpec>,
}

/// One deployable revision of an endpoint.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    /// Version name, unique within the endpoint (`v1`, `blue`).
    pub name: String,
    /// Share of the endpoint's traffic in percent; the weights of all versions sum to 100.
    /// May be left out when the endpoint has a single version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// What does the model work; `none` lets the processor answer alone.
    #[serde(default)]
    pub backend: BackendSpec,
    /// The Wasm processor; required when the backend is `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<ProcessorSpec>,
    /// Per-request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Worker scaling.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Dynamic batching in front of the backend.
    #[serde(default)]
    pub batching: BatchingSpec,
}

/// Dynamic batching: concurrent requests merged into one forward pass.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSpec {
    /// Most rows (sequences) in one forward pass; 1 turns batching off.
    pub max_batch: u32,
    /// Longest a request waits for others to join its batch, in milliseconds.
    pub max_batch_delay_ms: u64,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_batch_delay_ms: 2,
        }
    }
}

/// The backend of a version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendSpec {
    /// No model: the processor's `handle` answers each request.
    #[default]
    None,
    /// A native candle model.
    Candle(CandleBackend),
    /// An OCI container that listens on one HTTP port.
    Container(ContainerBackend),
}

impl BackendSpec {
    /// The `kind` key of this backend.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Candle(_) => "candle",
            Self::Container(_) => "container",
        }
    }
}

/// A native candle model backend.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleBackend {
    /// A local directory with config.json and weights (model.safetensors or
    /// pytorch_model.bin), or the name of one in the server's models directory.
    pub model: String,
    /// What the model does: `embeddings` or `generate`.
    pub task: String,
    /// `cpu`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_device() -> String {
    "auto".to_owned()
}

/// An OCI container backend.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerBackend {
    /// Image reference.
    pub image: String,
    /// Start command; the image's entrypoint when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Shell that runs `command`.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// The one HTTP port the container listens on.
    pub port: u16,
    /// Environment variables of the container.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A persistent volume to mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Where the volume is mounted in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// HTTP path polled to decide that the container is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<String>,
}

fn default_shell() -> String {
    "/bin/sh".to_owned()
}

/// The Wasm processor of a version and what it is granted.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSpec {
    /// The component: a path (resolved and uploaded by the CLI) or `sha256:<hex>` of an
    /// uploaded component.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"))]
    pub component: ComponentRef,
    /// Configuration, read by the processor through the `config` import (and visible as
    /// its WASI environment). The host's own environment is never passed.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host directories the processor may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Socket addresses the processor may connect to, as `IP:PORT` or `IP:*`. Empty means
    /// no network at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
}

/// A read-only directory mount.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Directory on the host.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub host: PathBuf,
    /// Absolute path the processor sees it at.
    pub guest: String,
}

/// Where a processor component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentRef {
    /// Content address of an uploaded component: 64 lower-case hex digits of its SHA-256.
    Digest(String),
    /// A file, relative to the spec's directory.
    Path(PathBuf),
}

impl ComponentRef {
    /// Parses `sha256:<hex>` as a digest and anything else as a path.
    pub fn parse(s: &str) -> Self {
        match s.strip_prefix("sha256:") {
            Some(hex) => Self::Digest(hex.to_owned()),
            None => Self::Path(PathBuf::from(s)),
        }
    }
}

impl fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digest(hex) => write!(f, "sha256:{hex}"),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl Serialize for ComponentRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ComponentRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// Per-request limits of a version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deadline of one processor call, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory cap of one processor instance, in MiB.
    pub memory_mib: u32,
    /// Most processor instances alive at once (and so most requests in a processor at once).
    pub max_instances: u32,
    /// Most requests waiting for an instance; beyond it the gateway answers 429.
    pub max_queue: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 5_000,
            memory_mib: 128,
            max_instances: 32,
            max_queue: 256,
            max_body_bytes: 10 * 1024 * 1024,
        }
    }
}

/// Worker scaling of a version (defaults from the managed services users know).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingSpec {
    /// Workers always running (0 allows scale to zero). For backend `none` these are
    /// warm processor instances.
    pub min_workers: u32,
    /// Most workers.
    pub max_workers: u32,
    /// In-flight requests per worker above which the version scales up.
    pub target_concurrency: u32,
    /// GPUs each worker owns (1–8); absent for CPU workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus_per_worker: Option<u32>,
    /// Seconds between two scale-up actions.
    pub scale_up_cooldown_s: u64,
    /// Seconds between two scale-down actions.
    pub scale_down_cooldown_s: u64,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 1,
            target_concurrency: 100,
            gpus_per_worker: None,
            scale_up_cooldown_s: 300,
            scale_down_cooldown_s: 300,
        }
    }
}

impl EndpointSpec {
    /// Parses and validates a TOML spec.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a JSON spec.
    pub fn from_json(text: &[u8]) -> Result<Self, SpecError> {
        let spec: Self =
            serde_json::from_slice(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The weight of version `index`, after defaults.
    pub fn weight(&self, index: usize) -> u32 {
        match self.versions.get(index) {
            Some(v) => v
                .weight
                .unwrap_or(if self.versions.len() == 1 { 100 } else { 0 }),
            None => 0,
        }
    }

    /// Checks what the types alone cannot: names, weights, bounds and requirements.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name, MAX_NAME_CHARS)?;
        if self.versions.is_empty() {
            return Err(SpecError::invalid(
                "versions",
                "at least one version is required",
            ));
        }
        let mut total = 0u64;
        for (i, version) in self.versions.iter().enumerate() {
            let at = |field: &str| format!("versions[{i}].{field}");
            check_name(&at("name"), &version.name, MAX_VERSION_NAME_CHARS)?;
            if self.versions[..i].iter().any(|v| v.name == version.name) {
                return Err(SpecError::invalid(
                    at("name"),
                    format!("version `{}` appears twice", version.name),
                ));
            }
            match version.weight {
                Some(w) if w > 100 => {
                    return Err(SpecError::invalid(
                        at("weight"),
                        "must be between 0 and 100",
                    ));
                }
                None if self.versions.len() > 1 => {
                    return Err(SpecError::invalid(
                        at("weight"),
                        "required when an endpoint has more than one version",
                    ));
                }
                _ => {}
            }
            total += u64::from(self.weight(i));
            version.validate(&at)?;
        }
        if total != 100 {
            return Err(SpecError::invalid(
                "versions[].weight",
                format!("weights must sum to 100, not {total}"),
            ));
        }
        Ok(())
    }
}

impl VersionSpec {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
        if matches!(self.backend, BackendSpec::None) && self.processor.is_none() {
            return Err(SpecError::invalid(
                at("processor"),
                "a version with backend `none` needs a processor to answer requests",
            ));
        }
        if let Some(processor) = &self.processor {
            if let ComponentRef::Digest(hex) = &processor.component
                && (hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            {
                return Err(SpecError::invalid(
                    at("processor.component"),
                    "a digest is `sha256:` and 64 lower-case hex digits",
                ));
            }
            for (j, mount) in processor.mounts.iter().enumerate() {
                if !mount.guest.starts_with('/') {
                    return Err(SpecError::invalid(
                        at(&format!("processor.mounts[{j}].guest")),
                        "must be an absolute path",
                    ));
                }
            }
            for (j, addr) in processor.allow_hosts.iter().enumerate() {
                if parse_allow_host(addr).is_none() {
                    return Err(SpecError::invalid(
                        at(&format!("processor.allow_hosts[{j}]")),
                        format!("`{addr}` is not `IP:PORT` or `IP:*`"),
                    ));
                }
            }
        }
        let limits = &self.limits;
        if !(1..=600_000).contains(&limits.timeout_ms) {
            return Err(SpecError::invalid(
                at("limits.timeout_ms"),
                "must be between 1 and 600000",
            ));
        }
        if !(1..=4096).contains(&limits.memory_mib) {
            return Err(SpecError::invalid(
                at("limits.memory_mib"),
                "must be between 1 and 4096",
            ));
        }
        if !(1..=1024).contains(&limits.max_instances) {
            return Err(SpecError::invalid(
                at("limits.max_instances"),
                "must be between 1 and 1024",
            ));
        }
        if limits.max_body_bytes == 0 {
            return Err(SpecError::invalid(
                at("limits.max_body_bytes"),
                "must be positive",
            ));
        }
        if !(1..=4096).contains(&self.batching.max_batch) {
            return Err(SpecError::invalid(
                at("batching.max_batch"),
                "must be between 1 and 4096",
            ));
        }
        if self.batching.max_batch_delay_ms > 10_000 {
            return Err(SpecError::invalid(
                at("batching.max_batch_delay_ms"),
                "must be at most 10000",
            ));
        }
        if let BackendSpec::Candle(candle) = &self.backend {
            if !matches!(candle.task.as_str(), "embeddings") {
                return Err(SpecError::invalid(
                    at("backend.task"),
                    format!("`{}` is not a candle task (embeddings)", candle.task),
                ));
            }
            if self.processor.is_none() {
                return Err(SpecError::invalid(
                    at("processor"),
                    "a candle backend needs a processor that turns requests into tensors",
                ));
            }
        }
        let scaling = &self.scaling;
        if scaling.max_workers == 0 {
            return Err(SpecError::invalid(
                at("scaling.max_workers"),
                "must be at least 1",
            ));
        }
        if scaling.min_workers > scaling.max_workers {
            return Err(SpecError::invalid(
                at("scaling.min_workers"),
                format!(
                    "{} is more than max_workers ({})",
                    scaling.min_workers, scaling.max_workers
                ),
            ));
        }
        if matches!(self.backend, BackendSpec::None) && scaling.min_workers > limits.max_instances {
            return Err(SpecError::invalid(
                at("scaling.min_workers"),
                "warm instances cannot exceed limits.max_instances",
            ));
        }
        if scaling.target_concurrency == 0 {
            return Err(SpecError::invalid(
                at("scaling.target_concurrency"),
                "must be at least 1",
            ));
        }
        if let Some(gpus) = scaling.gpus_per_worker
            && !(1..=8).contains(&gpus)
        {
            return Err(SpecError::invalid(
                at("scaling.gpus_per_worker"),
                "must be between 1 and 8",
            ));
        }
        Ok(())
    }
}

/// Parses an allow-list entry: `IP:PORT` or `IP:*` (IPv6 in brackets). Returns the address
/// and the port, `None` standing for any port.
pub fn parse_allow_host(entry: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    let (host, port) = entry.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = host.parse().ok()?;
    let port = match port {
        "*" => None,
        p => Some(p.parse().ok()?),
    };
    Some((ip, port))
}

fn check_name(field: &str, name: &str, max: usize) -> Result<(), SpecError> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(SpecError::invalid(field, "must not be empty"));
    }
    if chars > max {
        return Err(SpecError::invalid(
            field,
            format!("is {chars} characters long; the limit is {max}"),
        ));
    }
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(SpecError::invalid(
            field,
            "must not contain `/` or control characters",
        ));
    }
    if name.trim() != name {
        return Err(SpecError::invalid(
            field,
            "must not start or end with whitespace",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "redact"
        [[versions]]
        name = "v1"
        processor = { component = "pii_redact.wasm" }
    "#;

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = EndpointSpec::from_toml(MINIMAL).unwrap();
        assert_eq!(spec.weight(0), 100);
        assert_eq!(spec.versions[0].backend, BackendSpec::None);
        assert_eq!(spec.versions[0].limits.timeout_ms, 5_000);
        assert_eq!(spec.versions[0].scaling.min_workers, 1);
        assert_eq!(spec.versions[0].scaling.target_concurrency, 100);
        assert_eq!(spec.versions[0].scaling.scale_up_cooldown_s, 300);
        assert_eq!(
            spec.versions[0].processor.as_ref().unwrap().component,
            ComponentRef::Path("pii_redact.wasm".into())
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("name = \"v1\"", "name = \"v1\"\nwieght = 3");
        let err = EndpointSpec::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `wieght`"), "{err}");
    }

    #[test]
    fn names_are_checked() {
        let long = "é".repeat(129);
        let err = EndpointSpec::from_toml(&MINIMAL.replace("redact", &long)).unwrap_err();
        assert_eq!(err.field(), Some("name"));
        let ok = "é".repeat(128);
        assert!(EndpointSpec::from_toml(&MINIMAL.replace("redact", &ok)).is_ok());
        let err = EndpointSpec::from_toml(&MINIMAL.replace("redact", "a/b")).unwrap_err();
        assert_eq!(err.field(), Some("name"));
    }

    #[test]
    fn weights_must_sum_to_100() {
        let text = r#"
            name = "e"
            [[versions]]
            name = "a"
            weight = 60
            processor = { component = "a.wasm" }
            [[versions]]
            name = "b"
            weight = 30
            processor = { component = "b.wasm" }
        "#;
        let err = EndpointSpec::from_toml(text).unwrap_err();
        assert!(err.to_string().contains("sum to 100, not 90"), "{err}");
        assert!(EndpointSpec::from_toml(&text.replace("30", "40")).is_ok());
        let err = EndpointSpec::from_toml(&text.replace("weight = 30\n", "")).unwrap_err();
        assert_eq!(err.field(), Some("versions[1].weight"));
        let err =
            EndpointSpec::from_toml(&text.replace("name = \"b\"", "name = \"a\"")).unwrap_err();
        assert_eq!(err.field(), Some("versions[1].name"));
    }

    #[test]
    fn bounds_are_checked() {
        let with = |extra: &str| format!("{MINIMAL}\n{extra}");
        let err = EndpointSpec::from_toml(&with("[versions.limits]\ntimeout_ms = 0")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].limits.timeout_ms"));
        let err =
            EndpointSpec::from_toml(&with("[versions.scaling]\ngpus_per_worker = 9")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].scaling.gpus_per_worker"));
        let err =
            EndpointSpec::from_toml(&with("[versions.scaling]\nmin_workers = 3")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].scaling.min_workers"));
    }

    #[test]
    fn none_backend_needs_a_processor() {
        let err = EndpointSpec::from_toml("name = \"x\"\n[[versions]]\nname = \"v\"").unwrap_err();
        assert_eq!(err.field(), Some("versions[0].processor"));
    }

    #[test]
    fn digests_and_allow_list_are_checked() {
        let err =
            EndpointSpec::from_toml(&MINIMAL.replace("pii_redact.wasm", "sha256:abc")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].processor.component"));
        assert_eq!(
            parse_allow_host("127.0.0.1:*"),
            Some(("127.0.0.1".parse().unwrap(), None))
        );
        assert_eq!(
            parse_allow_host("[::1]:443"),
            Some(("::1".parse().unwrap(), Some(443)))
        );
        assert_eq!(parse_allow_host("example.com:80"), None);
    }

    #[test]
    fn json_round_trip() {
        let spec = EndpointSpec::from_toml(MINIMAL).unwrap();
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(EndpointSpec::from_json(&json).unwrap(), spec);
    }
}
