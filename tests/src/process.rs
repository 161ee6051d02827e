//! Servers as processes, for the benchmarks that compare release binaries side by side:
//! the workspace root, a child process killed on drop, free ports, and the release `wasp`
//! started and read until it listens.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A server process, killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `addr` accepts connections (panics after `patience`).
pub fn wait_for(addr: SocketAddr, patience: Duration) {
    let deadline = Instant::now() + patience;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The release `wasp` (panics with the command that builds it when missing).
pub fn release_wasp() -> PathBuf {
    let wasp = root().join("target/release/wasp");
    assert!(
        wasp.exists(),
        "{} is missing: `cargo build --release -p wasp` (./x bench does)",
        wasp.display()
    );
    wasp
}

/// Starts `command` (a `wasp serve --listen 127.0.0.1:0 --data-dir DIR/data ...`) with
/// its credentials in `dir`, and returns it once it listens, with its address and the
/// operator key it made.
pub fn start_wasp(mut command: Command, dir: &Path) -> (Process, SocketAddr, String) {
    let mut child = command
        .env("WASP_LOG", "warn")
        .env("WASP_CREDENTIALS", dir.join("credentials.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("wasp listening on http://")
        .unwrap_or_else(|| panic!("wasp did not start: {line}"))
        .parse()
        .unwrap();
    let key = std::fs::read_to_string(dir.join("data/operator.key")).unwrap();
    (Process(child), addr, key.trim().to_owned())
}
