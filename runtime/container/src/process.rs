//! The `process` driver: the container contract (command, environment, port, probes,
//! graceful exit) run as a plain local process, for operators without a container engine.
//! It is NOT a sandbox: the command runs as the server's user, sees the host's files and
//! network, and has no memory or CPU limits. Its environment holds only `PATH`, the spec's
//! variables and `PORT`.
//!
//! Each process leads its own process group, so that signals reach whatever the shell
//! started. A record per process under the state directory (pid and kernel start time)
//! lets a restarted server kill what a crashed one left running, without ever signalling
//! a process that merely reused the pid.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use wasp_backend::BackendError;
use wasp_core::ContainerBackend;

use crate::driver::{Driver, Instance, Launch, Lines};

/// Runs containers' commands as local processes.
pub struct ProcessDriver {
    state_dir: PathBuf,
    /// Held (`flock`) while this driver lives: one server owns a state directory.
    _lock: std::fs::File,
}

/// The ownership record of one process.
#[derive(Serialize, Deserialize)]
struct Record {
    pid: u32,
    /// Clock ticks after boot at which it started (`/proc/<pid>/stat`, field 22).
    start_ticks: u64,
    name: String,
}

impl ProcessDriver {
    /// A driver keeping its ownership records in `state_dir` (created if missing). Fails
    /// when another live driver holds the directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> std::io::Result<Self> {
        let state_dir = state_dir.into();
        let lock = crate::driver::lock_state_dir(&state_dir)?;
        Ok(Self {
            state_dir,
            _lock: lock,
        })
    }
}

/// A free loopback port (the kernel's pick; freed again for the process to bind).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The kernel start time of `pid`, in clock ticks after boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after its end.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn signal_group(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) with a negative pid signals the process group `pid` leads; it reads
    // no memory of ours.
    unsafe {
        libc::kill(-pid, signal);
    }
}

fn forward(
    lines: Arc<Lines>,
    error: bool,
    stream: impl Read + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    lines.push(error, line.trim_end_matches(['\n', '\r']).to_owned());
                }
            }
        }
    })
}

impl Driver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn check(&self, spec: &ContainerBackend) -> Result<(), BackendError> {
        if spec.command.is_none() {
            return Err(BackendError::bad_input(
                "the process driver runs `command` on the host; an image's own entrypoint \
                 needs a container engine (`wasp serve --container-engine`)",
                "command",
            ));
        }
        if spec.volume.is_some() {
            return Err(BackendError::bad_input(
                "the process driver cannot mount volumes; they need a container engine \
                 (`wasp serve --container-engine`)",
                "volume",
            ));
        }
        Ok(())
    }

    fn launch(&self, launch: Launch) -> Result<Box<dyn Instance>, BackendError> {
        self.check(&launch.spec)?;
        let command = launch.spec.command.as_deref().unwrap_or_default();
        let port =
            free_port().map_err(|e| BackendError::Load(format!("no free loopback port: {e}")))?;
        if launch.spec.memory_mib.is_some() || launch.spec.cpus.is_some() {
            launch.lines.push(
                true,
                "the process driver does not enforce memory_mib or cpus".to_owned(),
            );
        }
        let mut cmd = Command::new(&launch.spec.shell);
        cmd.arg("-c")
            .arg(command)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(&launch.spec.env)
            .env("PORT", port.to_string())
            .envs((!launch.spec.gpus.is_empty()).then(|| {
                let ids: Vec<String> = launch.spec.gpus.iter().map(u32::to_string).collect();
                ("CUDA_VISIBLE_DEVICES", ids.join(","))
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            BackendError::Load(format!("cannot start `{}`: {e}", launch.spec.shell))
        })?;
        let pid = child.id();
        let record = self.state_dir.join(format!("{pid}.json"));
        let written = serde_json::to_vec(&Record {
            pid,
            start_ticks: start_ticks(pid).unwrap_or_default(),
            name: launch.name.clone(),
        })
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&record, bytes));
        if let Err(e) = written {
            signal_group(pid, libc::SIGKILL);
            let _ = child.wait();
            return Err(BackendError::Load(format!(
                "cannot record process {pid} in {}: {e}",
                self.state_dir.display()
            )));
        }
        let mut readers = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            readers.push(forward(launch.lines.clone(), false, out));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(forward(launch.lines.clone(), true, err));
        }
        tracing::info!(name = %launch.name, pid, port, "started process");
        Ok(Box::new(Process {
            child: Mutex::new(child),
            pid,
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            record,
            reaped: AtomicBool::new(false),
            readers,
        }))
    }

    fn reclaim(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return 0;
        };
        let mut found = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(record) = read_record(&path)
                    && record.start_ticks != 0
                    && start_ticks(record.pid) == Some(record.start_ticks)
                {
                    tracing::warn!(name = %record.name, pid = record.pid, "killing a process a previous run left behind");
                    signal_group(record.pid, libc::SIGKILL);
                    found += 1;
                }
                let _ = std::fs::remove_file(&path);
            }
        }
        found
    }
}

fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

struct Process {
    child: Mutex<Child>,
    pid: u32,
    address: SocketAddr,
    record: PathBuf,
    /// The shell has been waited for: its pid is free for the kernel to give again.
    reaped: AtomicBool,
    /// The threads that read its output into the endpoint's logs.
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// How long an exited process's last output may take to reach its lines.
const DRAIN: std::time::Duration = std::time::Duration::from_millis(250);

impl Process {
    /// Signals the process group, unless the leader is gone and its pid now belongs to
    /// someone else (a group outlives its leader while members remain, and the kernel does
    /// not reuse a pid that names a live group).
    fn signal(&self, signal: i32) {
        if self.reaped.load(Ordering::Acquire) && Path::new(&format!("/proc/{}", self.pid)).exists()
        {
            return;
        }
        signal_group(self.pid, signal);
    }
}

impl Instance for Process {
    fn address(&self) -> SocketAddr {
        self.address
    }

    fn exited(&self) -> Option<String> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        match child.try_wait() {
            Ok(Some(status)) => Some({
                self.reaped.store(true, Ordering::Release);
                // What it wrote just before it exited is still in the pipes: let the
                // readers take it (a child it left behind may hold them open: not long).
                let until = std::time::Instant::now() + DRAIN;
                while !self
                    .readers
                    .iter()
                    .all(std::thread::JoinHandle::is_finished)
                    && std::time::Instant::now() < until
                {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                match (status.code(), status.signal()) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(signal)) => format!("killed by signal {signal}"),
                    _ => status.to_string(),
                }
            }),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for it: {e}")),
        }
    }

    fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn remove(&self) {
        // Whatever the shell left running in its group goes too.
        self.signal(libc::SIGKILL);
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).wait();
        self.reaped.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.record);
    }
}
