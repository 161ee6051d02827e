//! What runs a worker's container: a [`Driver`] launches [`Instance`]s. Drivers are
//! blocking (they talk to an engine or fork processes); callers run them off the async
//! workers.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use wasp_backend::{BackendError, LogSink};
use wasp_core::ContainerBackend;

/// Lines of a container's output kept for error messages.
const TAIL_LINES: usize = 40;

/// Longest line kept, in bytes.
const MAX_LINE: usize = 4096;

/// A worker's output: each line goes to the endpoint's logs, and the last few are kept to
/// explain a failed start.
pub struct Lines {
    tail: Mutex<VecDeque<String>>,
    sink: Option<LogSink>,
}

impl Lines {
    /// Output lines that go to `sink`.
    pub fn new(sink: Option<LogSink>) -> Arc<Self> {
        Arc::new(Self {
            tail: Mutex::new(VecDeque::with_capacity(TAIL_LINES)),
            sink,
        })
    }

    /// One line of output (`error` for stderr and the runtime's own complaints).
    pub fn push(&self, error: bool, mut line: String) {
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
        }
        {
            let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        if let Some(sink) = &self.sink {
            sink(error, line);
        }
    }

    /// The last `n` lines, oldest first, one per line.
    pub fn tail(&self, n: usize) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        let skip = tail.len().saturating_sub(n);
        tail.iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// What one worker's container is launched from.
pub struct Launch {
    /// A name unique to this server: `wasp-<endpoint>-<version>-<n>`.
    pub name: String,
    /// Labels that say who owns it (endpoint, version, server).
    pub labels: BTreeMap<String, String>,
    /// The backend spec.
    pub spec: ContainerBackend,
    /// Where its output goes.
    pub lines: Arc<Lines>,
    /// The deploying tenant's login to the image's registry, if it has one.
    pub login: Option<Login>,
}

/// A login to an image registry.
pub use wasp_core::credentials::RegistryLogin as Login;

/// The registry host an image reference names: its first component when that looks like a
/// host (has a `.` or a `:`, or is `localhost`), else Docker Hub's `docker.io`.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// Starts and reclaims containers.
pub trait Driver: Send + Sync + 'static {
    /// `process` or `engine`, for status pages and errors.
    fn name(&self) -> &'static str;

    /// Refuses what this driver cannot run, naming the field below `backend`.
    fn check(&self, spec: &ContainerBackend) -> Result<(), BackendError>;

    /// Starts one container; it need not be ready yet.
    fn launch(&self, launch: Launch) -> Result<Box<dyn Instance>, BackendError>;

    /// Stops and removes what an earlier run of this server left behind (after a crash or
    /// `kill -9`). Returns how many it found.
    fn reclaim(&self) -> usize;
}

/// One running container.
pub trait Instance: Send + Sync {
    /// Where its port answers, on the host.
    fn address(&self) -> SocketAddr;

    /// How it ended (`exit status 1`, `killed by signal 9`), once it has.
    fn exited(&self) -> Option<String>;

    /// Asks it to stop (SIGTERM).
    fn terminate(&self);

    /// Stops it now (SIGKILL).
    fn kill(&self);

    /// Forgets it once it has ended: removes the container or the ownership record.
    fn remove(&self);
}

/// Creates `dir` if missing and takes its lock (`flock` on `dir/lock`), held while the
/// returned file is open: one server owns a state directory. The kernel drops the lock when
/// the server exits, `kill -9` included.
pub(crate) fn lock_state_dir(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::other(format!(
            "{} is in use by another wasp server",
            dir.display()
        )));
    }
    Ok(lock)
}

/// This server's owner id in `dir/owner` (made once, random): the label that marks its
/// containers in a shared engine.
pub(crate) fn owner_id(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("owner");
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &id)?;
    Ok(id)
}
