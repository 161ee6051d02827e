//! The real `wasp` binary as a test fixture: start `wasp serve` on a data directory, wait
//! for it to listen, stop it gracefully or with `kill -9`, and read what it logged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};

/// The binary under test.
pub const WASP: &str = env!("CARGO_BIN_EXE_wasp");

/// Operator keys of the servers the tests started, by URL.
static KEYS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// The operator key of the server at `url`, if a test started it.
pub fn key_of(url: &str) -> Option<String> {
    KEYS.lock()
        .unwrap()
        .iter()
        .find(|(u, _)| u == url)
        .map(|(_, k)| k.clone())
}

/// Runs a CLI command against `server`, with its operator key (as `WASP_API_KEY`).
pub fn wasp(server: &str, args: &[&str]) -> Output {
    let mut command = Command::new(WASP);
    command.arg("--server").arg(server).args(args);
    // Never the user's own credentials file.
    command.env(
        "WASP_CREDENTIALS",
        std::env::temp_dir().join("wasp-test-none.toml"),
    );
    if let Some(key) = key_of(server) {
        command.env("WASP_API_KEY", key);
    }
    command.output().unwrap()
}

/// Runs `command` with `stdin` on its standard input; its output.
pub fn with_stdin(command: &mut Command, stdin: &str) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Asserts success and returns standard output.
pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A running `wasp serve`; killed when dropped.
pub struct Serve {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its address.
    pub addr: std::net::SocketAddr,
    /// Its gRPC address, when started with `--grpc-listen`.
    pub grpc: Option<std::net::SocketAddr>,
    /// Where its standard error goes.
    pub log: PathBuf,
    /// Its operator key (from `DATA_DIR/operator.key`; empty when there is none).
    pub key: String,
}

/// How a `wasp serve` that did not come up ended.
#[derive(Debug)]
pub struct Refused {
    /// Its exit status.
    pub status: ExitStatus,
    /// What it wrote to standard error.
    pub stderr: String,
}

impl Serve {
    /// Starts `wasp serve` on `data` and waits until it listens; panics if it does not.
    pub fn start(data: &Path) -> Self {
        Self::try_start(data, &[]).unwrap_or_else(|refused| {
            panic!(
                "wasp serve did not start ({}):\n{}",
                refused.status, refused.stderr
            )
        })
    }

    /// Starts `wasp serve` on `data` with `extra` flags; `Err` with its exit status and
    /// standard error when it exits instead of listening.
    pub fn try_start(data: &Path, extra: &[&str]) -> Result<Self, Refused> {
        Self::try_start_with_env(data, extra, &[("WASP_LOG", "warn")])
    }

    /// Like [`Serve::try_start`], with environment variables for the server.
    pub fn try_start_with_env(
        data: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Refused> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("wasp-test-{}-{n}.log", std::process::id()));
        let mut child = Command::new(WASP)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(extra)
            // Never the user's own credentials file.
            .env(
                "WASP_CREDENTIALS",
                std::env::temp_dir().join("wasp-test-none.toml"),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        // The gRPC address comes first, when there is one.
        let grpc = line
            .trim()
            .strip_prefix("wasp gRPC listening on ")
            .map(|a| a.parse().unwrap());
        if grpc.is_some() {
            line.clear();
            stdout.read_line(&mut line).unwrap();
        }
        match line.trim().strip_prefix("wasp listening on ") {
            Some(url) => {
                let url = url.to_owned();
                let addr = url
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .parse()
                    .unwrap();
                // None when the directory's store had keys before (a restored backup).
                let key = std::fs::read_to_string(data.join("operator.key"))
                    .map(|k| k.trim().to_owned())
                    .unwrap_or_default();
                {
                    let mut keys = KEYS.lock().unwrap();
                    keys.retain(|(u, _)| *u != url);
                    keys.push((url.clone(), key.clone()));
                }
                Ok(Self {
                    child,
                    url,
                    addr,
                    grpc,
                    log,
                    key,
                })
            }
            None => {
                let status = child.wait().unwrap();
                let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                let _ = std::fs::remove_file(&log);
                Err(Refused { status, stderr })
            }
        }
    }

    /// An HTTP client for it, with its operator key.
    pub fn client(&self) -> wasp_tests::TestClient {
        wasp_tests::TestClient::with_key(self.addr, &self.key)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: no shutdown, no flush, nothing.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits; returns the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap()
    }

    /// What it has written to standard error so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}
