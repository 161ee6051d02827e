//! Request records: a sample of an endpoint's requests and responses, saved as JSONL for
//! people to read and for `wasp replay` to send again to another version.
//!
//! Records are taken on the data path only when sampled, and written by one thread of
//! their own, so a slow disk never slows a request: when that thread falls behind, records
//! are dropped and counted rather than queued without bound. Each endpoint's records are
//! in `DATA_DIR/records/<endpoint, percent-encoded>/<start, ms>-<n>.jsonl`; a file is closed
//! past `rotate_bytes` and the oldest beyond `keep_files` are removed. Lines are written
//! whole (one write each), so a reader sees complete lines.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use base64::Engine;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use wasp_core::RecordsSpec;

/// Records waiting for the writer before new ones are dropped.
const BACKLOG: usize = 4096;

/// Headers never recorded: credentials.
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// One request and its response, as a line of a records file.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RequestRecord {
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Its `x-request-id`.
    pub request_id: String,
    /// The version that answered.
    pub version: String,
    /// Request method.
    pub method: String,
    /// Path below the invoke route (or `/v1/embeddings`), with the query.
    pub path: String,
    /// Request headers, credentials left out.
    pub headers: Vec<(String, String)>,
    /// Request body, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Request body in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
    /// Whether the request body was cut at `max_body_bytes` (such a record is not
    /// replayed).
    #[serde(default)]
    pub body_truncated: bool,
    /// Response status.
    pub status: u16,
    /// Response headers, credentials left out.
    pub response_headers: Vec<(String, String)>,
    /// Response body, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// Response body in base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body_base64: Option<String>,
    /// Whether the response body was cut at `max_body_bytes`.
    #[serde(default)]
    pub response_body_truncated: bool,
    /// Time to the answer, in milliseconds.
    pub latency_ms: f64,
}

/// A body as recorded: text when it is UTF-8, else base64; cut at `max` bytes.
pub(crate) fn body(bytes: &[u8], max: u32) -> (Option<String>, Option<String>, bool) {
    let cut = bytes.len() > max as usize;
    let kept = &bytes[..bytes.len().min(max as usize)];
    match std::str::from_utf8(kept) {
        Ok(text) => (Some(text.to_owned()), None, cut),
        // A cut may split a character: the valid prefix as text would lose bytes.
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(kept)),
            cut,
        ),
    }
}

/// Headers without credentials.
pub(crate) fn headers(all: &[(String, String)]) -> Vec<(String, String)> {
    all.iter()
        .filter(|(k, _)| !SECRET_HEADERS.iter().any(|s| k.eq_ignore_ascii_case(s)))
        .cloned()
        .collect()
}

/// Whether this request is one of the sampled.
pub(crate) fn sampled(spec: &RecordsSpec) -> bool {
    spec.sample_percent >= 100.0 || rand::random::<f64>() * 100.0 < spec.sample_percent
}

enum Message {
    Record {
        endpoint: String,
        spec: RecordsSpec,
        line: Vec<u8>,
    },
    Remove(String),
}

/// Takes records and hands them to the writer thread.
pub(crate) struct Recorder {
    tx: SyncSender<Message>,
    dir: PathBuf,
    /// Records dropped because the writer was behind.
    pub dropped: AtomicU64,
}

impl Recorder {
    /// Starts the writer on `dir` (`DATA_DIR/records`).
    pub fn start(dir: PathBuf) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel(BACKLOG);
        let root = dir.clone();
        let spawned = std::thread::Builder::new()
            .name("wasp-records".into())
            .spawn(move || write_loop(&root, rx));
        if let Err(e) = spawned {
            tracing::error!("cannot start the request records writer: {e}; no records are saved");
        }
        Self {
            tx,
            dir,
            dropped: AtomicU64::new(0),
        }
    }

    /// Saves a record of `endpoint` (the server's name).
    pub fn record(&self, endpoint: &str, spec: RecordsSpec, record: &RequestRecord) {
        let Ok(mut line) = serde_json::to_vec(record) else {
            return;
        };
        line.push(b'\n');
        let message = Message::Record {
            endpoint: endpoint.to_owned(),
            spec,
            line,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(message)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes a removed endpoint's records.
    pub fn remove(&self, endpoint: &str) {
        let _ = self.tx.send(Message::Remove(endpoint.to_owned()));
    }

    /// The directory of `endpoint`'s records.
    pub fn dir_of(&self, endpoint: &str) -> PathBuf {
        self.dir
            .join(utf8_percent_encode(endpoint, NON_ALPHANUMERIC).to_string())
    }

    /// `endpoint`'s record files, oldest first: name, bytes.
    pub fn files(&self, endpoint: &str) -> Vec<(String, u64)> {
        files(&self.dir_of(endpoint))
    }

    /// The path of one of `endpoint`'s files; `None` for a name that is not one.
    pub fn file(&self, endpoint: &str, name: &str) -> Option<PathBuf> {
        let valid = name.strip_suffix(".jsonl").is_some_and(|stem| {
            !stem.is_empty() && stem.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        });
        if !valid {
            return None;
        }
        let path = self.dir_of(endpoint).join(name);
        path.is_file().then_some(path)
    }
}

/// Record files in `dir`, oldest first.
fn files(dir: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.ends_with(".jsonl")
                .then(|| (name, e.metadata().map(|m| m.len()).unwrap_or(0)))
        })
        .collect();
    out.sort();
    out
}

/// The file being written for an endpoint.
struct Open {
    file: std::fs::File,
    bytes: u64,
}

fn write_loop(root: &Path, rx: Receiver<Message>) {
    let mut open: HashMap<String, Open> = HashMap::new();
    while let Ok(message) = rx.recv() {
        match message {
            Message::Remove(endpoint) => {
                open.remove(&endpoint);
                let dir = root.join(utf8_percent_encode(&endpoint, NON_ALPHANUMERIC).to_string());
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(%endpoint, "cannot remove the request records: {e}");
                }
            }
            Message::Record {
                endpoint,
                spec,
                line,
            } => {
                let dir = root.join(utf8_percent_encode(&endpoint, NON_ALPHANUMERIC).to_string());
                if let Err(e) = append(&dir, &mut open, &endpoint, &spec, &line) {
                    tracing::warn!(%endpoint, "cannot save a request record: {e}");
                    open.remove(&endpoint);
                }
            }
        }
    }
}

fn append(
    dir: &Path,
    open: &mut HashMap<String, Open>,
    endpoint: &str,
    spec: &RecordsSpec,
    line: &[u8],
) -> std::io::Result<()> {
    if !open.contains_key(endpoint) {
        std::fs::create_dir_all(dir)?;
        // Go on with the newest file if it has room (after a restart, say).
        let newest = files(dir)
            .into_iter()
            .next_back()
            .filter(|(_, bytes)| *bytes < spec.rotate_bytes);
        let (path, bytes) = match newest {
            Some((name, bytes)) => (dir.join(name), bytes),
            None => (new_file(dir), 0),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        open.insert(endpoint.to_owned(), Open { file, bytes });
        prune(dir, spec.keep_files);
    }
    let Some(current) = open.get_mut(endpoint) else {
        return Ok(());
    };
    current.file.write_all(line)?;
    current.bytes += line.len() as u64;
    if current.bytes >= spec.rotate_bytes {
        open.remove(endpoint);
    }
    Ok(())
}

/// A new file's path: named by the time, and always after the newest file there, so that
/// names sort in the order the files began. Several files can begin in one millisecond (and
/// the clock can step back), and a pruned name must never be reused: a file named before
/// the ones kept would be the next one pruned, with its records.
fn new_file(dir: &Path) -> PathBuf {
    let ms = crate::workers::now_ms();
    let newest = files(dir).into_iter().next_back().and_then(|(name, _)| {
        let (at, n) = name.strip_suffix(".jsonl")?.split_once('-')?;
        Some((at.parse::<u64>().ok()?, n.parse::<u64>().ok()?))
    });
    let (ms, n) = match newest {
        Some((at, n)) if at >= ms && n < 9999 => (at, n + 1),
        Some((at, _)) if at >= ms => (at + 1, 0),
        _ => (ms, 0),
    };
    dir.join(format!("{ms:020}-{n:04}.jsonl"))
}

/// Removes the oldest files beyond `keep` (the one about to be written counts).
fn prune(dir: &Path, keep: u32) {
    let all = files(dir);
    let excess = all.len().saturating_sub(keep as usize);
    for (name, _) in all.into_iter().take(excess) {
        let _ = std::fs::remove_file(dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn record(i: u64) -> RequestRecord {
        let (body, body_base64, body_truncated) = body(format!("request {i}").as_bytes(), 64);
        RequestRecord {
            at_ms: i,
            request_id: format!("r{i}"),
            version: "v1".into(),
            method: "POST".into(),
            path: "/".into(),
            headers: headers(&[
                ("content-type".into(), "text/plain".into()),
                ("Cookie".into(), "secret".into()),
            ]),
            body,
            body_base64,
            body_truncated,
            status: 200,
            response_headers: Vec::new(),
            response_body: Some("ok".into()),
            response_body_base64: None,
            response_body_truncated: false,
            latency_ms: 1.0,
        }
    }

    #[test]
    fn bodies_are_text_or_base64_and_cut_where_asked() {
        assert_eq!(body(b"hello", 10), (Some("hello".into()), None, false));
        assert_eq!(body(b"hello", 3), (Some("hel".into()), None, true));
        let (text, b64, cut) = body(&[0xff, 0x00], 10);
        assert_eq!((text, b64.as_deref(), cut), (None, Some("/wA="), false));
        // A cut in the middle of a character keeps the bytes, as base64.
        let (text, b64, cut) = body("é".as_bytes(), 1);
        assert!(text.is_none() && b64.is_some() && cut);
    }

    #[test]
    fn a_new_file_sorts_after_every_file_there() {
        let dir = tempfile::tempdir().unwrap();
        let name = |p: PathBuf| p.file_name().unwrap().to_str().unwrap().to_owned();
        // The first file of a millisecond has the counter 0.
        assert!(name(new_file(dir.path())).ends_with("-0000.jsonl"));
        // A file from the future (a clock stepped back), whose `-0000` sibling was pruned:
        // the name is not reused, and the next name sorts last.
        let future = crate::workers::now_ms() + 3_600_000;
        std::fs::write(dir.path().join(format!("{future:020}-0001.jsonl")), "").unwrap();
        assert_eq!(
            name(new_file(dir.path())),
            format!("{future:020}-0002.jsonl")
        );
        std::fs::write(dir.path().join(format!("{future:020}-9999.jsonl")), "").unwrap();
        assert_eq!(
            name(new_file(dir.path())),
            format!("{:020}-0000.jsonl", future + 1)
        );
    }

    #[test]
    fn files_rotate_by_size_and_the_oldest_go() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::start(dir.path().to_owned());
        let spec = RecordsSpec {
            rotate_bytes: 4096,
            keep_files: 3,
            ..RecordsSpec::default()
        };
        for i in 0..200 {
            recorder.record("acme/e", spec, &record(i));
        }
        // The writer is a thread: wait for the last record.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let files = recorder.files("acme/e");
            let last = files.last().map(|(name, _)| {
                std::fs::read_to_string(recorder.file("acme/e", name).unwrap()).unwrap()
            });
            if last.is_some_and(|text| text.contains("\"request_id\":\"r199\"")) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{files:?}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let files = recorder.files("acme/e");
        assert_eq!(files.len(), 3, "{files:?}");
        let mut lines = Vec::new();
        for (name, bytes) in &files {
            assert!(*bytes < 4096 + 1024, "{name} {bytes}");
            let text = std::fs::read_to_string(recorder.file("acme/e", name).unwrap()).unwrap();
            for line in text.lines() {
                let r: RequestRecord = serde_json::from_str(line).unwrap();
                assert!(!r.headers.iter().any(|(k, _)| k == "Cookie"));
                lines.push(r.at_ms);
            }
        }
        // The newest records, in order, none lost between the files kept.
        assert!(lines.windows(2).all(|w| w[0] + 1 == w[1]), "{lines:?}");
        assert_eq!(lines.last(), Some(&199));
        // Names from the API cannot leave the directory.
        assert!(recorder.file("acme/e", "../x.jsonl").is_none());
        assert!(recorder.file("acme/e", "x").is_none());
        recorder.remove("acme/e");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while recorder.dir_of("acme/e").exists() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
