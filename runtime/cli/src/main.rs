//! `wasp`: runs the server (`wasp serve`) and speaks to its API (everything else).

mod build;
mod client;
mod output;
mod replay;
mod scaffold;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use wasp_core::{ComponentRef, EndpointSpec};
use wasp_gateway::{Server, ServerConfig};

use crate::client::Client;

/// WebAssembly-extensible serverless inference runtime.
#[derive(Parser)]
#[command(name = "wasp", version, about)]
struct Cli {
    /// Server to talk to (every command but `serve` and `processor`).
    #[arg(
        long,
        global = true,
        env = "WASP_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// A PEM file of a CA certificate that an https:// server's certificate may chain to,
    /// besides the system's roots (repeatable).
    #[arg(
        long = "ca-cert",
        global = true,
        env = "WASP_CA_CERT",
        value_name = "FILE"
    )]
    ca_certs: Vec<PathBuf>,
    /// How results are printed: `table` for people, or `json` (the API's JSON) for
    /// scripts. For `batch submit` and `batch output`, any other value is the file the
    /// output JSONL is written to.
    #[arg(
        long,
        short,
        global = true,
        default_value = "table",
        value_name = "FORMAT|FILE"
    )]
    output: String,
    /// Log format of `wasp serve`: `text` (ANSI colours only on a terminal) or `json` (one
    /// object per line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "WASP_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log formats of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// What a new processor instance does when the instance pool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PoolFull {
    /// Created on demand, outside the pool.
    Overflow,
    /// A request waits for a slot, up to its call timeout, then 503 server_full.
    Queue,
    /// Refused: 503 server_full.
    Fail,
}

impl From<PoolFull> for wasp_gateway::PoolFull {
    fn from(policy: PoolFull) -> Self {
        match policy {
            PoolFull::Overflow => Self::Overflow,
            PoolFull::Queue => Self::Queue,
            PoolFull::Fail => Self::Fail,
        }
    }
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Submits a job: its input is the request body the endpoint gets (JSON).
    Submit {
        /// Endpoint name.
        endpoint: String,
        /// The input, as JSON.
        #[arg(long, short)]
        data: String,
        /// Wait for the job to end (up to 90 s) and show it.
        #[arg(long)]
        wait: bool,
    },
    /// Lists jobs, the newest first.
    Ls {
        /// Only this endpoint's.
        #[arg(long)]
        endpoint: Option<String>,
        /// Only jobs in this state (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED,
        /// TIMED_OUT).
        #[arg(long)]
        status: Option<String>,
        /// Most jobs.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Shows a job: state, attempts, output or error, webhook deliveries.
    Show {
        /// Job id.
        id: String,
    },
    /// Cancels a queued or running job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Queues a failed, timed-out or cancelled job again.
    Retry {
        /// Job id.
        id: String,
    },
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Submits a JSONL file (one request body per line), shows its progress and writes
    /// the output (one line per input line, in order).
    Submit {
        /// Endpoint name.
        endpoint: String,
        /// The JSONL input (`-o FILE` writes the output JSONL there; default: standard
        /// output).
        input: PathBuf,
        /// Lines in flight at most.
        #[arg(long, default_value_t = 32)]
        concurrency: u32,
        /// The path below the invoke route each line is sent to.
        #[arg(long, default_value = "/")]
        path: String,
        /// Print the batch's id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Lists batches.
    Ls,
    /// Shows a batch's progress.
    Status {
        /// Batch id.
        id: String,
    },
    /// Pauses a running batch.
    Pause {
        /// Batch id.
        id: String,
    },
    /// Resumes a paused batch.
    Resume {
        /// Batch id.
        id: String,
    },
    /// Cancels a batch (the output keeps the lines done).
    Cancel {
        /// Batch id.
        id: String,
    },
    /// Writes a batch's output so far (to `-o FILE`, or standard output).
    Output {
        /// Batch id.
        id: String,
    },
}

// Parsed once at start: the size of `serve`'s flags costs nothing worth boxing them for.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Runs the server.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "WASP_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Also serve the KServe v2 gRPC protocol (`inference.GRPCInferenceService`, as
        /// Triton's clients call it) on this address, with the HTTP API's keys, limits and
        /// TLS certificate.
        #[arg(long, env = "WASP_GRPC_LISTEN", value_name = "ADDR")]
        grpc_listen: Option<SocketAddr>,
        /// Data directory: endpoint store, components, compiled cache.
        #[arg(long, env = "WASP_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
        /// Where named models are found (default: DATA_DIR/models).
        #[arg(long, env = "WASP_MODELS_DIR")]
        models_dir: Option<PathBuf>,
        /// Endpoint specs to deploy (or update) at start, in addition to stored ones.
        #[arg(long = "deploy", value_name = "SPEC")]
        deploy: Vec<PathBuf>,
        /// Allocate instances on demand instead of from the pooling allocator.
        #[arg(long)]
        no_pooling: bool,
        /// Most processor instances alive at once, all endpoints together, in the pool.
        #[arg(long, default_value_t = 1000)]
        max_instances: u32,
        /// What a new instance does when the pool's --max-instances slots are taken:
        /// `overflow` creates it on demand outside the pool (slower to create, as fast to
        /// call), `queue` makes a request wait for a slot (up to its call timeout), `fail`
        /// answers 503 server_full.
        #[arg(long, value_enum, default_value_t = PoolFull::Overflow)]
        pool_full: PoolFull,
        /// Memory of one pool slot, in MiB: the largest limits.memory_mib whose instances
        /// the pool holds (larger ones are created on demand, outside it). Default: 4096
        /// (no bounds checks in compiled code) while --max-instances slots of it fit in
        /// 32 TiB of address space, else the largest power of two down to 128 that fits.
        #[arg(long, value_name = "MIB")]
        slot_memory_mib: Option<u32>,
        /// Longest any request may take, in seconds, before it is answered 504.
        #[arg(long, default_value_t = 300)]
        request_timeout_s: u64,
        /// Longest a client may take to send a request's headers, in seconds.
        #[arg(long, default_value_t = 30)]
        header_read_timeout_s: u64,
        /// Most open client connections; further clients wait.
        #[arg(long, default_value_t = 10_000)]
        max_connections: usize,
        /// How long a kept-alive connection may sit idle before it is closed, in seconds
        /// (at most the header read timeout, which also bounds the wait for a request).
        #[arg(long, default_value_t = 30)]
        idle_timeout_s: u64,
        /// Most open connections from one client address; more are closed at once.
        #[arg(long, default_value_t = 512)]
        max_connections_per_client: usize,
        /// Most requests in flight from one client address; more are answered 429.
        #[arg(long, default_value_t = 512)]
        max_requests_per_client: usize,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key); a renewed file is
        /// picked up without a restart.
        #[arg(long, requires = "tls_key", value_name = "FILE")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert", value_name = "FILE")]
        tls_key: Option<PathBuf>,
        /// A proxy in front terminates TLS: take API keys over plain HTTP from any address
        /// (without it or --tls-cert, keys are taken over plain HTTP from loopback only).
        #[arg(long)]
        behind_tls_proxy: bool,
        /// GPUs workers may own: `auto` (what `nvidia-smi` lists), `none`, indices such as
        /// `0,1,3`, or `fake:N` (N simulated GPUs, for tests).
        #[arg(long, default_value = "auto")]
        gpus: String,
        /// A directory batch jobs may read their input from by path (repeatable).
        #[arg(long = "batch-mount", value_name = "DIR")]
        batch_mounts: Vec<PathBuf>,
        /// A host directory the default tenant's processors may mount below (repeatable);
        /// other tenants get what an operator grants them (`wasp tenant grant`).
        #[arg(long = "mount-root", value_name = "DIR")]
        mount_roots: Vec<PathBuf>,
        /// An address (`IP:PORT` or `IP:*`) the default tenant's processors may be allowed
        /// to reach (repeatable).
        #[arg(long = "allow-host", value_name = "IP:PORT")]
        allow_hosts: Vec<String>,
        /// Guest calls past their first 2 ms that run at once, shared fairly among tenants
        /// (0: one fewer than the cores, at least one).
        #[arg(long, default_value_t = 0)]
        cpu_turns: usize,
        /// Name compiled guest functions in `/tmp/perf-PID.map`, so that `perf report`
        /// shows time spent in processors by function.
        #[arg(long)]
        guest_perf_map: bool,
        /// A PEM file of CA certificates that webhook receivers' certificates may chain to,
        /// besides the system's trusted roots (repeatable).
        #[arg(long = "webhook-ca", value_name = "FILE")]
        webhook_ca: Vec<PathBuf>,
        /// A registry (host[:port]) spoken to over plain HTTP when pulling processors
        /// published as OCI artifacts (repeatable); loopback registries always are.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registries: Vec<String>,
        /// A host directory container backends may mount volumes from (repeatable); with
        /// none, only named engine volumes are allowed.
        #[arg(long = "volume-root", value_name = "DIR")]
        volume_roots: Vec<PathBuf>,
        /// Run container backends through this container engine's Docker API socket
        /// (`unix:///run/podman/podman.sock`, `unix:///var/run/docker.sock`).
        #[arg(long, env = "WASP_CONTAINER_ENGINE", value_name = "unix:///PATH")]
        container_engine: Option<String>,
        /// Without an engine, run container backends' commands as local, unsandboxed
        /// processes: only where everyone who may deploy may also run commands on this host.
        #[arg(long, conflicts_with = "container_engine")]
        process_containers: bool,
        /// Join a cluster on NATS JetStream: its servers, comma-separated
        /// (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`). Endpoints deployed on any node
        /// are served by all.
        #[arg(long, env = "WASP_CLUSTER", value_name = "URLS")]
        cluster: Option<String>,
        /// This node's name in the cluster (default: the host name).
        #[arg(long, env = "WASP_NODE_NAME", requires = "cluster")]
        node_name: Option<String>,
        /// NATS user name; the password is `WASP_CLUSTER_PASSWORD`.
        #[arg(long, env = "WASP_CLUSTER_USER", requires = "cluster")]
        cluster_user: Option<String>,
        /// NATS token (from the environment, so that it is not in `ps`).
        #[arg(
            long,
            env = "WASP_CLUSTER_TOKEN",
            hide_env_values = true,
            requires = "cluster"
        )]
        cluster_token: Option<String>,
        /// NATS nkey seed (`SU...`; from the environment, so that it is not in `ps`).
        #[arg(
            long,
            env = "WASP_CLUSTER_NKEY",
            hide_env_values = true,
            requires = "cluster"
        )]
        cluster_nkey: Option<String>,
        /// A NATS credentials file (a user JWT and its nkey seed, as `nsc` writes them).
        #[arg(long, value_name = "FILE", requires = "cluster")]
        cluster_creds: Option<PathBuf>,
        /// A PEM file of the CA the NATS servers' certificates chain to (TLS).
        #[arg(long, value_name = "FILE", requires = "cluster")]
        cluster_ca: Option<PathBuf>,
        /// Copies JetStream keeps of the cluster's buckets (the NATS cluster's size).
        #[arg(long, default_value_t = 1, requires = "cluster")]
        cluster_replicas: usize,
        /// Seconds the jobs of a node that stopped answering wait before another node runs
        /// them (JetStream's ack wait; a live node renews its leases as its jobs run).
        #[arg(
            long,
            default_value_t = 30,
            value_name = "SECONDS",
            requires = "cluster"
        )]
        cluster_job_lease: u64,
    },
    /// Deploys (creates or replaces) the endpoint a TOML spec describes, uploading the
    /// components it names by path.
    Deploy {
        /// The spec file.
        spec: PathBuf,
    },
    /// Lists endpoints.
    Ls,
    /// Shows an endpoint's status, versions and instances.
    Status {
        /// Endpoint name.
        name: String,
    },
    /// Removes an endpoint.
    Rm {
        /// Endpoint name.
        name: String,
    },
    /// Stops an endpoint: no instances, requests refused, spec and URL kept.
    Stop {
        /// Endpoint name.
        name: String,
    },
    /// Starts a stopped endpoint.
    Start {
        /// Endpoint name.
        name: String,
    },
    /// Prints an endpoint's processor logs.
    Logs {
        /// Endpoint name.
        name: String,
        /// Most records to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Prints an endpoint's scaling events: each change of its workers, the policy that
    /// made it, and why.
    Events {
        /// Endpoint name.
        name: String,
        /// Most events to print.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Lists, shows, cancels and retries async jobs.
    Jobs {
        #[command(subcommand)]
        action: JobsCommand,
    },
    /// Runs a JSONL file through an endpoint as a batch job, and follows batches.
    Batch {
        #[command(subcommand)]
        action: BatchCommand,
    },
    /// Sends a request to an endpoint and prints the response body.
    Invoke {
        /// Endpoint name.
        name: String,
        /// Request body (JSON, say).
        #[arg(long, short, conflicts_with = "file")]
        data: Option<String>,
        /// Read the request body from a file (`-` for standard input).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// Path below the invoke route.
        #[arg(long, default_value = "")]
        path: String,
    },
    /// The data directory's store: check it, back it up.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Stores an API key for `--server` in the credentials file (read from standard input,
    /// or WASP_API_KEY), after checking it with the server.
    Login,
    /// Shows the tenant and role of the key in use.
    Whoami,
    /// Lists the cluster's nodes: their API, endpoints, workers and GPUs (operator keys).
    Nodes,
    /// Tenants (operator keys).
    Tenant {
        #[command(subcommand)]
        action: TenantCommand,
    },
    /// API keys (admin and operator keys).
    Key {
        #[command(subcommand)]
        action: KeyCommand,
    },
    /// Your tenant's image registry logins, for container images (admin and operator keys).
    Registry {
        #[command(subcommand)]
        action: RegistryCommand,
    },
    /// Metered usage: requests, guest CPU time, model time, tokens, stored bytes (your
    /// tenant's; an operator's key sees every tenant's).
    Usage {
        /// Only this tenant (operator keys).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// An endpoint's request records (its spec's `records`): lists the files, or saves
    /// them all with --save.
    Records {
        /// Endpoint name.
        name: String,
        /// Write every record, oldest first, to this JSONL file (`-`: standard output).
        #[arg(long, value_name = "FILE")]
        save: Option<PathBuf>,
    },
    /// Sends recorded requests again to one version of an endpoint and reports where its
    /// answers differ from the recorded ones (exit status 1 when any do).
    Replay {
        /// Endpoint name.
        name: String,
        /// The version to send them to.
        #[arg(long)]
        version: String,
        /// The records, as `wasp records NAME --save FILE` writes them.
        #[arg(long, value_name = "FILE")]
        records: PathBuf,
        /// Numbers in JSON answers that differ by at most this much are the same.
        #[arg(long, default_value_t = 0.0)]
        tolerance: f64,
    },
    /// The audit log of control-plane changes (admin and operator keys).
    Audit {
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Prints a shell completion script (`wasp completions bash > /etc/bash_completion.d/wasp`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Processor development.
    Processor {
        #[command(subcommand)]
        command: ProcessorCommand,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Makes a tenant.
    Create {
        /// Its name: lowercase letters, digits and `-`, starting with a letter.
        name: String,
    },
    /// Lists tenants.
    Ls,
    /// Removes a tenant (it must have no endpoints) and its keys.
    Rm {
        /// Its name.
        name: String,
    },
    /// Sets what of the host a tenant's processors may reach (replacing the grant).
    Grant {
        /// Its name.
        name: String,
        /// A host directory its mounts may lie under (repeatable).
        #[arg(long = "mount-root", value_name = "DIR")]
        mount_roots: Vec<PathBuf>,
        /// An address (`IP:PORT` or `IP:*`) its `allow_hosts` may name (repeatable).
        #[arg(long = "allow-host", value_name = "IP:PORT")]
        allow_hosts: Vec<String>,
    },
    /// Sets what a tenant may hold (replacing its quota; a limit left out is unlimited).
    Quota {
        /// Its name.
        name: String,
        /// Endpoints.
        #[arg(long)]
        endpoints: Option<u64>,
        /// Versions over all its endpoints.
        #[arg(long)]
        versions: Option<u64>,
        /// Processor instances (the sum of `limits.max_instances`).
        #[arg(long)]
        instances: Option<u64>,
        /// Workers (the sum of `scaling.max_workers`).
        #[arg(long)]
        workers: Option<u64>,
        /// GPUs (the sum of max workers × GPUs per worker).
        #[arg(long)]
        gpus: Option<u64>,
        /// Processor memory in MiB (the sum of max instances × `limits.memory_mib`).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Bytes of uploaded components.
        #[arg(long)]
        stored_bytes: Option<u64>,
        /// Jobs waiting in its queues.
        #[arg(long)]
        queued_jobs: Option<u64>,
        /// Its weight in the sharing of the cores (1 to 1000; 1 by default).
        #[arg(long)]
        cpu_weight: Option<u32>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Makes a key and prints it (the only time it is shown).
    Create {
        /// What it may do: `invoker`, `admin` or `operator`.
        #[arg(long, default_value = "invoker")]
        role: String,
        /// Its tenant (the caller's by default).
        #[arg(long)]
        tenant: Option<String>,
        /// A label for people.
        #[arg(long)]
        name: Option<String>,
        /// Requests per second it may make, over every endpoint (a token bucket).
        #[arg(long)]
        rps: Option<f64>,
        /// Requests it may make at once after a quiet spell (one second's worth by
        /// default).
        #[arg(long, requires = "rps")]
        burst: Option<u32>,
        /// Most requests it may have in flight.
        #[arg(long)]
        max_concurrent: Option<u32>,
    },
    /// Lists keys (never the keys themselves).
    Ls {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a key at once.
    Revoke {
        /// Its id.
        id: String,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Sets the login to a registry; the password is read from standard input (one line).
    Login {
        /// The registry's host, as image references name it (`ghcr.io`, `host:5000`).
        registry: String,
        /// User name.
        #[arg(long, short)]
        username: String,
    },
    /// Lists the logins (never their passwords).
    Ls,
    /// Forgets the login to a registry.
    Logout {
        /// The registry's host.
        registry: String,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Checks a data directory no server is using: the database's integrity (repairing
    /// what can be repaired), every endpoint record, every component against its digest
    /// (removing corrupt ones), and leftovers of interrupted writes.
    Check {
        /// The data directory.
        #[arg(long, env = "WASP_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// Makes a consistent backup of a running server's store and the components its
    /// endpoints use, as a data directory that `wasp serve --data-dir PATH` serves.
    Backup {
        /// A new (or empty) directory.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProcessorCommand {
    /// Creates a new processor that builds as it is (`wasp processor build`).
    New {
        /// Its name (and directory, unless --dir is given).
        name: String,
        /// Its language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: build::Lang,
        /// Directory to create.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Path of the wasp-sdk crate to depend on (Rust; default: the SDK beside this
        /// build).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
    /// Builds a processor into a component with its language's toolchain and prints the
    /// component's path (nothing is rebuilt when no input changed).
    Build {
        /// The processor's directory (it holds Cargo.toml, app.py, app.js or app.c).
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Its language (default: from the files in DIR).
        #[arg(long, value_enum)]
        lang: Option<build::Lang>,
        /// The world to build (`full` exports every interface; calls left out answer 501).
        #[arg(long, default_value = "full")]
        world: String,
        /// Where to write the component (default: DIR/target/NAME.wasm).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The WIT contract (default: DIR/wit, else the one this wasp was built with).
        #[arg(long)]
        wit: Option<PathBuf>,
        /// The language's SDK (default: the copy in DIR, else the one this wasp was built
        /// with).
        #[arg(long)]
        sdk: Option<PathBuf>,
        /// The toolchains directory `scripts/toolchain` fills (default: WASP_TOOLCHAINS,
        /// else target/tools beside this build, else PATH).
        #[arg(long, env = "WASP_TOOLCHAINS")]
        toolchains: Option<PathBuf>,
    },
    /// Publishes a component to an OCI registry in the Wasm OCI layout (as `wkg oci push`
    /// does), for specs to name as `processor.component = "oci://REFERENCE"`; prints the
    /// reference pinned to what was pushed.
    Push {
        /// The component (`wasp processor build` prints its path).
        component: PathBuf,
        /// Where: `registry/repository[:tag]` (`ghcr.io/org/pii-redact:1.0`).
        reference: String,
        /// A user name for the registry; the password is read from standard input.
        #[arg(long, short)]
        username: Option<String>,
        /// A PEM file of CA certificates the registry's certificate may chain to, besides
        /// the system's roots (repeatable).
        #[arg(long = "ca-cert", value_name = "FILE")]
        ca_certs: Vec<PathBuf>,
        /// Speak plain HTTP to the registry (loopback registries always are).
        #[arg(long)]
        insecure: bool,
    },
}

/// Publishes `component` as `reference`; returns the pinned `oci://` reference.
fn push_processor(
    component: &std::path::Path,
    reference: &str,
    username: Option<&str>,
    ca_certs: &[PathBuf],
    insecure: bool,
) -> Result<String> {
    let reference =
        wasp_oci::Reference::parse(reference.strip_prefix("oci://").unwrap_or(reference))?;
    let bytes =
        std::fs::read(component).with_context(|| format!("cannot read {}", component.display()))?;
    // A component's preamble: the magic, version 0x0d and layer 1 (a core module is layer 0).
    if bytes.len() < 8 || bytes[..4] != *b"\0asm" || bytes[6..8] != [1, 0] {
        bail!(
            "{} is not a Wasm component (build one with `wasp processor build`)",
            component.display()
        );
    }
    let login = match username {
        Some(username) => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the registry password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            anyhow::ensure!(!password.is_empty(), "no password on standard input");
            Some(wasp_oci::Login {
                username: username.to_owned(),
                password,
            })
        }
        None => None,
    };
    let tls =
        wasp_gateway::tls_client_config(ca_certs).map_err(|e| anyhow::anyhow!("--ca-cert {e}"))?;
    let mut client = wasp_oci::Client::new(tls);
    if insecure {
        client = client.with_insecure(vec![reference.registry.clone()]);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let digest = runtime.block_on(client.push(&reference, bytes.into(), login.as_ref()))?;
    let pinned = wasp_oci::Reference {
        digest: Some(digest),
        ..reference
    };
    Ok(format!("oci://{pinned}"))
}

fn processor_command(command: &ProcessorCommand) -> Result<()> {
    match command {
        ProcessorCommand::New {
            name,
            lang,
            dir,
            sdk_path,
        } => {
            let dir = dir.clone().unwrap_or_else(|| PathBuf::from(name));
            let created = scaffold::new_processor(name, &dir, *lang, sdk_path.as_deref())?;
            println!("created processor `{name}` in {}", created.display());
            if *lang == build::Lang::Rust {
                println!(
                    "build it with: cd {} && cargo build --release",
                    created.display()
                );
            } else {
                println!("build it with: wasp processor build {}", created.display());
            }
        }
        ProcessorCommand::Build {
            dir,
            lang,
            world,
            out,
            wit,
            sdk,
            toolchains,
        } => {
            let options = build::BuildOptions {
                lang: *lang,
                world: world.clone(),
                out: out.clone(),
                wit: wit.clone(),
                sdk: sdk.clone(),
                toolchains: toolchains.clone(),
            };
            let component = build::build(dir, &options)?;
            println!("{}", component.display());
        }
        ProcessorCommand::Push {
            component,
            reference,
            username,
            ca_certs,
            insecure,
        } => {
            let pinned = push_processor(
                component,
                reference,
                username.as_deref(),
                ca_certs,
                *insecure,
            )?;
            println!("{pinned}");
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("WASP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    // A panic is a bug; it goes to the log like any other error, and the code that can
    // contain one (a storage engine reading a mangled file, say) reports it in its own words.
    std::panic::set_hook(Box::new(|info| tracing::error!(target: "panic", "{info}")));
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        clap_complete::generate(*shell, &mut Cli::command(), "wasp", &mut std::io::stdout());
        return Ok(());
    }
    if let Command::Processor { command } = &cli.command {
        return processor_command(command);
    }
    if let Command::Store {
        command: StoreCommand::Check { data_dir },
    } = &cli.command
    {
        return store_check(data_dir);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

/// The machine's GPUs as `nvidia-smi` lists them; none where it is missing or fails.
fn detect_gpus() -> wasp_gateway::Inventory {
    let listed = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let gpus: Vec<u32> = listed
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    wasp_gateway::Inventory::new(gpus, false)
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::new(&cli.server, api_key(&cli.server)?, &cli.ca_certs)?;
    let (format, file) = match cli.output.as_str() {
        "table" => (output::Format::Table, None),
        "json" => (output::Format::Json, None),
        other if matches!(cli.command, Command::Batch { .. }) => {
            (output::Format::Table, Some(PathBuf::from(other)))
        }
        other => anyhow::bail!("-o: `{other}` is not a format (table, json)"),
    };
    let print = output::Printer::new(format);
    match cli.command {
        Command::Serve {
            listen,
            grpc_listen,
            data_dir,
            models_dir,
            deploy,
            no_pooling,
            max_instances,
            pool_full,
            slot_memory_mib,
            request_timeout_s,
            header_read_timeout_s,
            max_connections,
            idle_timeout_s,
            max_connections_per_client,
            max_requests_per_client,
            tls_cert,
            tls_key,
            behind_tls_proxy,
            gpus,
            batch_mounts,
            mount_roots,
            allow_hosts,
            cpu_turns,
            guest_perf_map,
            webhook_ca,
            insecure_registries,
            volume_roots,
            container_engine,
            process_containers,
            cluster,
            node_name,
            cluster_user,
            cluster_token,
            cluster_nkey,
            cluster_creds,
            cluster_ca,
            cluster_replicas,
            cluster_job_lease,
        } => {
            let cluster = match cluster {
                Some(servers) => {
                    let user_password = match cluster_user {
                        Some(user) => Some((
                            user,
                            std::env::var("WASP_CLUSTER_PASSWORD")
                                .context("--cluster-user needs WASP_CLUSTER_PASSWORD")?,
                        )),
                        None => None,
                    };
                    let node = match node_name {
                        Some(n) => n,
                        None => std::fs::read_to_string("/etc/hostname")
                            .map(|h| h.trim().to_owned())
                            .unwrap_or_default(),
                    };
                    Some(wasp_cluster::ClusterConfig {
                        servers,
                        node,
                        url: String::new(),
                        user_password,
                        token: cluster_token,
                        nkey: cluster_nkey,
                        creds: cluster_creds,
                        ca: cluster_ca,
                        replicas: cluster_replicas,
                    })
                    .map(|config| {
                        (
                            config,
                            std::time::Duration::from_secs(cluster_job_lease.max(1)),
                        )
                    })
                }
                None => None,
            };
            let gpus = if gpus == "auto" {
                detect_gpus()
            } else {
                wasp_gateway::Inventory::parse(&gpus).map_err(|e| anyhow::anyhow!("--gpus: {e}"))?
            };
            let (registry, containers) = backends(
                &data_dir,
                container_engine.as_deref(),
                process_containers,
                volume_roots
                    .iter()
                    .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
                    .collect(),
            )?;
            let (cluster, jobs) = match cluster {
                Some((config, lease)) => {
                    let connection = wasp_cluster::connect(config).await?;
                    let jobs = connection.jobs(lease).await?;
                    (
                        Some(connection),
                        Some(wasp_gateway::SharedQueue(std::sync::Arc::new(jobs))),
                    )
                }
                None => (None, None),
            };
            let config = ServerConfig {
                jobs,
                listen,
                data_dir,
                runtime: wasp_gateway::RuntimeConfig {
                    pooling: !no_pooling,
                    max_total_instances: max_instances,
                    pool_full: pool_full.into(),
                    slot_memory_mib,
                    cpu_turns,
                    perf_map: guest_perf_map,
                    ..Default::default()
                },
                backends: registry,
                models_dir,
                http: wasp_gateway::HttpLimits {
                    request_timeout: std::time::Duration::from_secs(request_timeout_s),
                    header_read_timeout: std::time::Duration::from_secs(header_read_timeout_s),
                    max_connections,
                    idle_timeout: std::time::Duration::from_secs(idle_timeout_s),
                    max_connections_per_client,
                    max_requests_per_client,
                },
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| wasp_gateway::TlsFiles { cert, key }),
                behind_tls_proxy,
                gpus: std::sync::Arc::new(gpus),
                batch_mounts,
                webhook_ca,
                insecure_registries,
                mount_roots: mount_roots
                    .iter()
                    .map(|r| r.canonicalize().unwrap_or_else(|_| r.clone()))
                    .collect(),
                allow_hosts,
                credentials: wasp_core::credentials::default_path(),
            };
            serve(config, grpc_listen, deploy, containers, cluster).await
        }
        Command::Deploy { spec } => {
            let (spec, components) = load_spec(&spec)?;
            let spec = upload_components(spec, components, |bytes| {
                let client = &client;
                async move { client.upload(bytes).await }
            })
            .await?;
            let body = client.put_spec(&spec).await?;
            print.endpoint(&body);
            Ok(())
        }
        Command::Ls => {
            print.endpoints(&client.get("/api/v1/endpoints").await?);
            Ok(())
        }
        Command::Login => login(&cli.server, &cli.ca_certs).await,
        Command::Nodes => {
            let all = client.get("/api/v1/nodes").await?;
            if !print.json(&all) {
                println!(
                    "{:<20} {:<28} {:>9} {:>7} {:>9} {:>15} SEEN",
                    "NODE", "URL", "ENDPOINTS", "WORKERS", "GPUS FREE", "INSTANCES/SLOTS"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                for n in all["nodes"].as_array().into_iter().flatten() {
                    let seen = n["seen_at_ms"].as_u64().unwrap_or(0);
                    let slots = format!(
                        "{}/{}",
                        n["instances"].as_u64().unwrap_or(0),
                        n["instance_slots"].as_u64().unwrap_or(0)
                    );
                    println!(
                        "{:<20} {:<28} {:>9} {:>7} {:>4}/{:<4} {:>15} {:.1}s ago",
                        n["name"].as_str().unwrap_or("?"),
                        n["url"].as_str().unwrap_or("?"),
                        n["endpoints"].as_u64().unwrap_or(0),
                        n["workers"].as_u64().unwrap_or(0),
                        n["gpus_free"].as_u64().unwrap_or(0),
                        n["gpus"].as_u64().unwrap_or(0),
                        slots,
                        now.saturating_sub(seen) as f64 / 1e3
                    );
                }
            }
            Ok(())
        }
        Command::Whoami => {
            let me = client.get("/api/v1/whoami").await?;
            if !print.json(&me) {
                println!(
                    "{}: tenant {}, role {} (key {})",
                    client.base(),
                    me["tenant"].as_str().unwrap_or("?"),
                    me["role"].as_str().unwrap_or("?"),
                    me["key_id"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
        Command::Tenant { action } => tenants(&client, &print, action).await,
        Command::Key { action } => keys(&client, &print, action).await,
        Command::Registry { action } => registries(&client, &print, action).await,
        Command::Usage { tenant } => {
            let path = match tenant {
                Some(t) => format!("/api/v1/usage?tenant={}", client::query_value(&t)),
                None => "/api/v1/usage".to_owned(),
            };
            let usage = client.get(&path).await?;
            if !print.json(&usage) {
                println!(
                    "{:<34} {:>10} {:>12} {:>12} {:>10} {:>12} {:>8}",
                    "TENANT", "REQUESTS", "GUEST_CPU_S", "MODEL_S", "TOKENS", "STORED", "QUEUED"
                );
                for u in usage["tenants"].as_array().into_iter().flatten() {
                    println!(
                        "{:<34} {:>10} {:>12.3} {:>12.3} {:>10} {:>12} {:>8}",
                        u["tenant"].as_str().unwrap_or("?"),
                        u["requests"],
                        u["guest_cpu_seconds"].as_f64().unwrap_or(0.0),
                        u["model_seconds"].as_f64().unwrap_or(0.0),
                        u["tokens"],
                        u["stored_bytes"],
                        u["queued_jobs"]
                    );
                }
            }
            Ok(())
        }
        Command::Records { name, save } => match save {
            Some(out) => {
                let lines = replay::save(&client, &name, &out).await?;
                if out != Path::new("-") {
                    eprintln!("saved {lines} records to {}", out.display());
                }
                Ok(())
            }
            None => {
                let listing = client
                    .get(&client::endpoint_path(&name, "/records"))
                    .await?;
                if !print.json(&listing) {
                    println!("{:<32} BYTES", "FILE");
                    for f in listing["files"].as_array().into_iter().flatten() {
                        println!("{:<32} {}", f["name"].as_str().unwrap_or("?"), f["bytes"]);
                    }
                }
                Ok(())
            }
        },
        Command::Replay {
            name,
            version,
            records,
            tolerance,
        } => {
            let summary = replay::replay(&client, &name, &version, &records, tolerance).await?;
            println!(
                "replayed {} to version {version}: {} as recorded, {} differ, {} skipped",
                summary.replayed, summary.same, summary.differ, summary.skipped
            );
            if summary.differ > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Audit { after, limit } => {
            let page = client
                .get(&format!("/api/v1/audit?after={after}&limit={limit}"))
                .await?;
            if !print.json(&page) {
                for e in page["entries"].as_array().into_iter().flatten() {
                    println!(
                        "{:>6} {} {:<12} {:<18} {:<8} {:<6} {} -> {}",
                        e["seq"],
                        e["at_ms"],
                        e["tenant"].as_str().unwrap_or("?"),
                        e["key_id"].as_str().unwrap_or("?"),
                        e["role"].as_str().unwrap_or("?"),
                        e["method"].as_str().unwrap_or("?"),
                        e["path"].as_str().unwrap_or("?"),
                        e["status"]
                    );
                }
                if let Some(next) = page["next"].as_u64() {
                    eprintln!("more: wasp audit --after {next}");
                }
            }
            Ok(())
        }
        Command::Status { name } => {
            print.endpoint(&client.get(&client::endpoint_path(&name, "")).await?);
            Ok(())
        }
        Command::Rm { name } => {
            client.delete(&client::endpoint_path(&name, "")).await?;
            println!("removed `{name}`");
            Ok(())
        }
        Command::Stop { name } => {
            print.endpoint(&client.post(&client::endpoint_path(&name, "/stop")).await?);
            Ok(())
        }
        Command::Start { name } => {
            print.endpoint(&client.post(&client::endpoint_path(&name, "/start")).await?);
            Ok(())
        }
        Command::Logs { name, limit } => {
            let path = client::endpoint_path(&name, &format!("/logs?limit={limit}"));
            print.logs(&client.get(&path).await?);
            Ok(())
        }
        Command::Events { name, limit } => {
            let path = client::endpoint_path(&name, &format!("/events?limit={limit}"));
            print.events(&client.get(&path).await?);
            Ok(())
        }
        Command::Jobs { action } => jobs(&client, &print, action).await,
        Command::Batch { action } => batch(&client, &print, action, file).await,
        Command::Invoke {
            name,
            data,
            file,
            path,
        } => {
            let body = match (data, file) {
                (Some(data), _) => data.into_bytes(),
                (None, Some(file)) if file == Path::new("-") => {
                    use std::io::Read;
                    let mut buf = Vec::new();
                    std::io::stdin().read_to_end(&mut buf)?;
                    buf
                }
                (None, Some(file)) => std::fs::read(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
                (None, None) => Vec::new(),
            };
            let (status, bytes) = client.invoke(&name, &path, body).await?;
            std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
            println!();
            if !status.is_success() {
                bail!("endpoint answered {status}");
            }
            Ok(())
        }
        Command::Store {
            command: StoreCommand::Backup { path },
        } => store_backup(&client, &path).await,
        Command::Processor { .. } | Command::Store { .. } | Command::Completions { .. } => Ok(()),
    }
}

/// `wasp store check`: offline, on a directory no server holds.
fn store_check(data_dir: &Path) -> Result<()> {
    let report = wasp_gateway::store::Store::check(data_dir)?;
    println!(
        "store: {}",
        if report.repaired {
            "failed its integrity check; repaired"
        } else {
            "intact"
        }
    );
    println!("endpoints: {} records, all readable", report.endpoints);
    println!(
        "components: {} checked, {} corrupt",
        report.components,
        report.corrupt_components.len()
    );
    for digest in &report.corrupt_components {
        println!("  removed corrupt sha256:{digest}: upload it again (`wasp deploy` does)");
    }
    if report.swept > 0 {
        println!("removed {} leftovers of interrupted writes", report.swept);
    }
    if !report.corrupt_components.is_empty() {
        bail!(
            "{} corrupt components were removed",
            report.corrupt_components.len()
        );
    }
    Ok(())
}

/// `wasp store backup PATH`: the server's store snapshot, then every component its
/// endpoints name, each checked against its digest.
async fn store_backup(client: &Client, path: &Path) -> Result<()> {
    use wasp_gateway::store::{DB_FILE, Store};
    if path.exists()
        && std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty; back up into a new directory",
            path.display()
        );
    }
    std::fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    let snapshot = client.get_bytes("/api/v1/store/snapshot").await?;
    wasp_core::files::write_atomic(&path.join(DB_FILE), &snapshot)
        .with_context(|| format!("cannot write {}", path.join(DB_FILE).display()))?;
    let store = Store::open(path)?;
    let endpoints = store.endpoints()?;
    let mut digests: Vec<String> = endpoints
        .iter()
        .flat_map(|e| &e.spec.versions)
        .filter_map(|v| match v.processor.as_ref().map(|p| &p.component) {
            Some(ComponentRef::Digest(hex)) => Some(hex.clone()),
            _ => None,
        })
        .collect();
    digests.sort();
    digests.dedup();
    for digest in &digests {
        let bytes = client
            .get_bytes(&format!("/api/v1/components/sha256:{digest}"))
            .await
            .with_context(|| format!("cannot download component sha256:{digest}"))?;
        let stored = store.put_component(&bytes)?;
        if &stored != digest {
            bail!("the server sent other bytes for component sha256:{digest}");
        }
    }
    store.close();
    println!(
        "backed up {} endpoints and {} components to {}; serve it with `wasp serve --data-dir {}`",
        endpoints.len(),
        digests.len(),
        path.display(),
        path.display()
    );
    Ok(())
}

/// The container backend, kept to stop its containers at shutdown.
type Containers = std::sync::Arc<wasp_container::ContainerFactory>;

/// The model backends compiled into this binary. Containers run through the engine at
/// `engine` (a Docker Engine API socket), or, when the operator asks for it, as local
/// processes; with neither, the `container` kind is not offered. Their state lives in
/// `DATA_DIR/containers`, and what a crashed earlier run left is stopped first.
fn backends(
    data_dir: &std::path::Path,
    engine: Option<&str>,
    process_containers: bool,
    volume_roots: Vec<PathBuf>,
) -> Result<(wasp_backend::Registry, Option<Containers>)> {
    let mut registry = wasp_backend::Registry::new();
    registry.register(std::sync::Arc::new(wasp_candle::CandleFactory));
    let state = data_dir.join("containers");
    let driver: std::sync::Arc<dyn wasp_container::Driver> = match (engine, process_containers) {
        (Some(socket), _) => {
            let engine = wasp_container::EngineDriver::open(socket, &state)
                .with_context(|| format!("cannot use {}", state.display()))?;
            if let Err(e) = engine.ping() {
                tracing::warn!("{e}; container workers will fail until it answers");
            }
            std::sync::Arc::new(engine)
        }
        (None, true) => {
            tracing::warn!(
                "container backends run as local processes: whoever may deploy can run \
                 commands on this host"
            );
            std::sync::Arc::new(
                wasp_container::ProcessDriver::new(&state)
                    .with_context(|| format!("cannot use {}", state.display()))?,
            )
        }
        (None, false) => return Ok((registry, None)),
    };
    let containers =
        std::sync::Arc::new(wasp_container::ContainerFactory::new(driver, volume_roots));
    let reclaimed = containers.reclaim();
    if reclaimed > 0 {
        tracing::warn!("stopped {reclaimed} containers an earlier run left behind");
    }
    registry.register(containers.clone());
    Ok((registry, Some(containers)))
}

async fn serve(
    config: ServerConfig,
    grpc_listen: Option<SocketAddr>,
    deploy: Vec<PathBuf>,
    containers: Option<Containers>,
    cluster: Option<wasp_cluster::Connection>,
) -> Result<()> {
    let mut server = Server::start(config).await?;
    if let Some(listen) = grpc_listen {
        let service = wasp_grpc::service(server.api());
        let addr = server.serve_h2(listen, service).await?;
        // Before the line that says the server is up, which tests and scripts wait for.
        println!("wasp gRPC listening on {addr}");
    }
    if let Some(mut cluster) = cluster {
        let node = cluster.node().to_owned();
        cluster.set_url(server.url());
        let joined = cluster.join(server.gateway().clone()).await;
        if let Err(e) = joined {
            server.shutdown().await;
            return Err(e.into());
        }
        tracing::info!(%node, "joined the cluster");
    }
    for path in deploy {
        let (spec, components) = load_spec(&path)?;
        let gateway = server.gateway().clone();
        let spec = upload_components(spec, components, |bytes| {
            let gateway = gateway.clone();
            async move {
                Ok(format!(
                    "sha256:{}",
                    gateway
                        .upload_component(wasp_gateway::DEFAULT_TENANT, bytes.into())
                        .await?
                ))
            }
        })
        .await?;
        let name = spec.name.clone();
        gateway
            .deploy(spec, true)
            .await
            .with_context(|| format!("cannot deploy {}", path.display()))?;
        tracing::info!(endpoint = %name, url = %format!("{}/endpoints/{name}/invoke", server.url()), "deployed");
    }
    let stop = shutdown_signal();
    println!("wasp listening on {}", server.url());
    stop.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    if let Some(containers) = containers {
        // Each container gets its SIGTERM and grace period before the server is gone.
        let _ = tokio::task::spawn_blocking(move || containers.stop_all()).await;
    }
    Ok(())
}

/// Waits for SIGTERM or Ctrl-C. Built before the server says it listens, so a signal sent
/// right after that line is handled rather than killing the process.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        #[cfg(unix)]
        if let Ok(mut term) = term {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Component bytes to upload, by version index.
type Components = Vec<(usize, Vec<u8>)>;

/// Reads a TOML spec and the bytes of every component it names by path (relative to the
/// spec's directory).
fn load_spec(path: &Path) -> Result<(EndpointSpec, Components)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let spec = EndpointSpec::from_toml(&text).with_context(|| format!("in {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut spec = spec;
    // Mount paths are relative to the spec, like component paths.
    for v in &mut spec.versions {
        for mount in v.processor.iter_mut().flat_map(|p| p.mounts.iter_mut()) {
            if mount.host.is_relative() {
                let joined = base.join(&mount.host);
                mount.host = joined.canonicalize().unwrap_or(joined);
            }
        }
    }
    let mut components = Vec::new();
    for (i, v) in spec.versions.iter().enumerate() {
        if let Some(ComponentRef::Path(p)) = v.processor.as_ref().map(|p| &p.component) {
            let file = base.join(p);
            let bytes = std::fs::read(&file).with_context(|| {
                format!(
                    "versions[{i}].processor.component: cannot read {} (build the processors first: ./x build)",
                    file.display()
                )
            })?;
            components.push((i, bytes));
        }
    }
    Ok((spec, components))
}

/// Uploads each component and rewrites the spec to name it by digest.
async fn upload_components<F, Fut>(
    mut spec: EndpointSpec,
    components: Components,
    upload: F,
) -> Result<EndpointSpec>
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    for (i, bytes) in components {
        let digest = upload(bytes).await?;
        if let Some(p) = spec.versions.get_mut(i).and_then(|v| v.processor.as_mut()) {
            p.component = ComponentRef::parse(&digest);
        }
    }
    Ok(spec)
}

/// `wasp jobs ...`.
async fn jobs(client: &client::Client, print: &output::Printer, action: JobsCommand) -> Result<()> {
    match action {
        JobsCommand::Submit {
            endpoint,
            data,
            wait,
        } => {
            let input: serde_json::Value =
                serde_json::from_str(&data).context("--data is not valid JSON")?;
            let verb = if wait { "runsync" } else { "run" };
            let path = format!("/endpoints/{}/{verb}", client::query_value(&endpoint));
            let body = serde_json::to_vec(&serde_json::json!({ "input": input }))?;
            print.job(&client.post_body(&path, "application/json", body).await?);
        }
        JobsCommand::Ls {
            endpoint,
            status,
            limit,
        } => {
            let mut query = format!("limit={limit}");
            if let Some(e) = endpoint {
                query.push_str(&format!("&endpoint={}", client::query_value(&e)));
            }
            if let Some(s) = status {
                query.push_str(&format!("&status={}", client::query_value(&s)));
            }
            print.jobs(&client.get(&format!("/api/v1/jobs?{query}")).await?);
        }
        JobsCommand::Show { id } => {
            print.job(&client.get(&client::job_path(&id)).await?);
        }
        JobsCommand::Cancel { id } | JobsCommand::Retry { id } if id.is_empty() => {
            anyhow::bail!("a job id is needed");
        }
        JobsCommand::Cancel { id } => {
            let job = client.get(&client::job_path(&id)).await?;
            let endpoint = job["endpoint"].as_str().unwrap_or_default();
            print.job(
                &client
                    .post(&client::endpoint_job_path(endpoint, "cancel", &id))
                    .await?,
            );
        }
        JobsCommand::Retry { id } => {
            let job = client.get(&client::job_path(&id)).await?;
            let endpoint = job["endpoint"].as_str().unwrap_or_default();
            print.job(
                &client
                    .post(&client::endpoint_job_path(endpoint, "retry", &id))
                    .await?,
            );
        }
    }
    Ok(())
}

/// `wasp batch ...`.
async fn batch(
    client: &client::Client,
    print: &output::Printer,
    action: BatchCommand,
    output: Option<PathBuf>,
) -> Result<()> {
    let path =
        |id: &str, suffix: &str| format!("/api/v1/batches/{}{suffix}", client::query_value(id));
    match action {
        BatchCommand::Submit {
            endpoint,
            input,
            concurrency,
            path: below,
            detach,
        } => {
            let bytes = std::fs::read(&input)
                .with_context(|| format!("cannot read {}", input.display()))?;
            let url = format!(
                "/api/v1/batches?endpoint={}&concurrency={concurrency}&path={}",
                client::query_value(&endpoint),
                client::query_value(&below)
            );
            let submitted = client.post_body(&url, "application/jsonl", bytes).await?;
            let id = submitted["id"].as_str().unwrap_or_default().to_owned();
            if detach {
                print.batch(&submitted);
                return Ok(());
            }
            let mut progress = output::Progress::new();
            let done = loop {
                let status = client.get(&path(&id, "")).await?;
                progress.show(&status);
                if !matches!(status["status"].as_str(), Some("RUNNING" | "PAUSED")) {
                    break status;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            };
            progress.finish(&done);
            write_output(
                &client.get_bytes(&path(&id, "/output")).await?,
                output.as_deref(),
            )?;
            if done["status"] != "COMPLETED" {
                anyhow::bail!(
                    "batch {id} ended {}{}",
                    done["status"].as_str().unwrap_or("?"),
                    done["error"]
                        .as_str()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                );
            }
        }
        BatchCommand::Ls => print.batches(&client.get("/api/v1/batches").await?),
        BatchCommand::Status { id } => print.batch(&client.get(&path(&id, "")).await?),
        BatchCommand::Pause { id } => print.batch(&client.post(&path(&id, "/pause")).await?),
        BatchCommand::Resume { id } => print.batch(&client.post(&path(&id, "/resume")).await?),
        BatchCommand::Cancel { id } => print.batch(&client.post(&path(&id, "/cancel")).await?),
        BatchCommand::Output { id } => {
            write_output(
                &client.get_bytes(&path(&id, "/output")).await?,
                output.as_deref(),
            )?;
        }
    }
    Ok(())
}

/// Writes bytes to a file, or to standard output.
fn write_output(bytes: &[u8], to: Option<&Path>) -> Result<()> {
    match to {
        Some(file) => {
            std::fs::write(file, bytes).with_context(|| format!("cannot write {}", file.display()))
        }
        None => {
            std::io::Write::write_all(&mut std::io::stdout(), bytes)?;
            Ok(())
        }
    }
}

/// The API key for `server`: WASP_API_KEY, else the credentials file's entry.
fn api_key(server: &str) -> Result<Option<String>> {
    if let Some(key) = std::env::var("WASP_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        return Ok(Some(key.trim().to_owned()));
    }
    let Some(path) = wasp_core::credentials::default_path() else {
        return Ok(None);
    };
    let credentials = wasp_core::credentials::Credentials::load(&path)?;
    Ok(credentials.key_for(server).map(str::to_owned))
}

/// `wasp login`: checks a key with the server, then keeps it in the credentials file.
async fn login(server: &str, ca_certs: &[PathBuf]) -> Result<()> {
    let key = match std::env::var("WASP_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        Some(key) => key,
        None => {
            use std::io::IsTerminal;
            if std::io::stdin().is_terminal() {
                eprint!("API key for {server}: ");
            }
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line
        }
    };
    let key = key.trim().to_owned();
    if key.is_empty() {
        anyhow::bail!("no key given (type it, pipe it in, or set WASP_API_KEY)");
    }
    let client = Client::new(server, Some(key.clone()), ca_certs)?;
    let me = client.get("/api/v1/whoami").await?;
    let path = wasp_core::credentials::default_path()
        .ok_or_else(|| anyhow::anyhow!("no home directory: set WASP_CREDENTIALS"))?;
    wasp_core::credentials::Credentials::store(&path, server, &key)?;
    println!(
        "logged in to {} as tenant {} ({}); key kept in {}",
        client.base(),
        me["tenant"].as_str().unwrap_or("?"),
        me["role"].as_str().unwrap_or("?"),
        path.display()
    );
    Ok(())
}

async fn tenants(client: &Client, print: &output::Printer, action: TenantCommand) -> Result<()> {
    match action {
        TenantCommand::Create { name } => {
            let body = serde_json::json!({ "name": name }).to_string().into_bytes();
            let made = client
                .post_body("/api/v1/tenants", "application/json", body)
                .await?;
            if !print.json(&made) {
                println!("made tenant `{name}`");
            }
        }
        TenantCommand::Ls => {
            let all = client.get("/api/v1/tenants").await?;
            if !print.json(&all) {
                println!("{:<34} ENDPOINTS", "TENANT");
                for t in all["tenants"].as_array().into_iter().flatten() {
                    println!(
                        "{:<34} {}",
                        t["name"].as_str().unwrap_or("?"),
                        t["endpoints"]
                    );
                }
            }
        }
        TenantCommand::Grant {
            name,
            mount_roots,
            allow_hosts,
        } => {
            let body =
                serde_json::json!({ "mount_roots": mount_roots, "allow_hosts": allow_hosts })
                    .to_string()
                    .into_bytes();
            let path = format!("/api/v1/tenants/{}/policy", client::query_value(&name));
            let granted = client.put_body(&path, "application/json", body).await?;
            if !print.json(&granted) {
                println!("granted tenant `{name}`: {}", granted["policy"]);
            }
        }
        TenantCommand::Quota {
            name,
            endpoints,
            versions,
            instances,
            workers,
            gpus,
            memory_mib,
            stored_bytes,
            queued_jobs,
            cpu_weight,
        } => {
            let quota = serde_json::json!({
                "endpoints": endpoints, "versions": versions, "instances": instances,
                "workers": workers, "gpus": gpus, "memory_mib": memory_mib,
                "stored_bytes": stored_bytes, "queued_jobs": queued_jobs,
                "cpu_weight": cpu_weight,
            });
            // Unset limits are left out: unlimited.
            let quota: serde_json::Map<String, serde_json::Value> = quota
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let body = serde_json::Value::Object(quota).to_string().into_bytes();
            let path = format!("/api/v1/tenants/{}/quota", client::query_value(&name));
            let set = client.put_body(&path, "application/json", body).await?;
            if !print.json(&set) {
                println!(
                    "quota of tenant `{name}`: {}; it holds {}",
                    set["quota"], set["holding"]
                );
            }
        }
        TenantCommand::Rm { name } => {
            client
                .delete(&format!("/api/v1/tenants/{}", client::query_value(&name)))
                .await?;
            println!("removed tenant `{name}`");
        }
    }
    Ok(())
}

async fn registries(
    client: &Client,
    print: &output::Printer,
    action: RegistryCommand,
) -> Result<()> {
    match action {
        RegistryCommand::Login { registry, username } => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "no password on standard input");
            let body = serde_json::json!({ "username": username, "password": password });
            let set = client
                .put_body(
                    &format!("/api/v1/registries/{}", client::query_value(&registry)),
                    "application/json",
                    body.to_string().into_bytes(),
                )
                .await?;
            if !print.json(&set) {
                println!("logged in to `{registry}` as `{username}`");
            }
        }
        RegistryCommand::Ls => {
            let all = client.get("/api/v1/registries").await?;
            if !print.json(&all) {
                println!("{:<40} USERNAME", "REGISTRY");
                for l in all["registries"].as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {}",
                        l["registry"].as_str().unwrap_or("?"),
                        l["username"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        RegistryCommand::Logout { registry } => {
            client
                .delete(&format!(
                    "/api/v1/registries/{}",
                    client::query_value(&registry)
                ))
                .await?;
            println!("logged out of `{registry}`");
        }
    }
    Ok(())
}

async fn keys(client: &Client, print: &output::Printer, action: KeyCommand) -> Result<()> {
    match action {
        KeyCommand::Create {
            role,
            tenant,
            name,
            rps,
            burst,
            max_concurrent,
        } => {
            let mut body = serde_json::json!({ "role": role, "tenant": tenant, "name": name });
            if rps.is_some() || max_concurrent.is_some() {
                body["rate_limit"] = serde_json::json!({
                    "requests_per_second": rps,
                    "burst": burst,
                    "max_concurrent": max_concurrent,
                });
            }
            let body = body.to_string().into_bytes();
            let made = client
                .post_body("/api/v1/keys", "application/json", body)
                .await?;
            if !print.json(&made) {
                println!("{}", made["key"].as_str().unwrap_or(""));
                eprintln!(
                    "key {} ({} of tenant {}): keep it now, it is not shown again",
                    made["id"].as_str().unwrap_or("?"),
                    made["role"].as_str().unwrap_or("?"),
                    made["tenant"].as_str().unwrap_or("?")
                );
            }
        }
        KeyCommand::Ls { tenant } => {
            let path = match tenant {
                Some(t) => format!("/api/v1/keys?tenant={}", client::query_value(&t)),
                None => "/api/v1/keys".to_owned(),
            };
            let all = client.get(&path).await?;
            if !print.json(&all) {
                println!("{:<18} {:<34} {:<9} NAME", "ID", "TENANT", "ROLE");
                for k in all["keys"].as_array().into_iter().flatten() {
                    println!(
                        "{:<18} {:<34} {:<9} {}",
                        k["id"].as_str().unwrap_or("?"),
                        k["tenant"].as_str().unwrap_or("?"),
                        k["role"].as_str().unwrap_or("?"),
                        k["name"].as_str().unwrap_or("")
                    );
                }
            }
        }
        KeyCommand::Revoke { id } => {
            client
                .delete(&format!("/api/v1/keys/{}", client::query_value(&id)))
                .await?;
            println!("revoked key `{id}`");
        }
    }
    Ok(())
}
