//! The endpoint logs that processors write through the `log` import.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::Level;

/// Longest message kept, in bytes; longer ones are cut at a character boundary.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// One log record written by a processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The version whose processor wrote it.
    pub version: String,
    /// The message.
    pub message: String,
}

/// A bounded buffer of an endpoint's most recent log records (oldest dropped first).
#[derive(Debug)]
pub struct LogBuffer {
    records: Mutex<VecDeque<LogRecord>>,
    capacity: usize,
}

impl LogBuffer {
    /// A buffer keeping at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            // Grown as records come: most endpoints log little, and a buffer per endpoint
            // adds up on a dense server.
            records: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    /// Appends a record, mirroring it to `tracing`.
    pub fn push(&self, endpoint: &str, version: &str, level: Level, mut message: String) {
        if message.len() > MAX_MESSAGE_BYTES {
            let mut cut = MAX_MESSAGE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let level = match level {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        tracing::info!(target: "wasp::guest", endpoint, version, level, "{message}");
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let record = LogRecord {
            at_ms,
            level,
            version: version.to_owned(),
            message,
        };
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if records.len() == self.capacity {
            records.pop_front();
        }
        records.push_back(record);
    }

    /// The most recent `limit` records, oldest first.
    pub fn tail(&self, limit: usize) -> Vec<LogRecord> {
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let skip = records.len().saturating_sub(limit);
        records.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_records() {
        let logs = LogBuffer::new(2);
        for i in 0..3 {
            logs.push("e", "v1", Level::Info, format!("m{i}"));
        }
        let tail = logs.tail(10);
        assert_eq!(
            tail.iter().map(|r| r.message.as_str()).collect::<Vec<_>>(),
            ["m1", "m2"]
        );
        assert_eq!(logs.tail(1)[0].message, "m2");
    }

    #[test]
    fn cuts_long_messages_on_a_char_boundary() {
        let logs = LogBuffer::new(1);
        logs.push("e", "v", Level::Warn, "é".repeat(MAX_MESSAGE_BYTES));
        let kept = &logs.tail(1)[0].message;
        assert!(kept.len() <= MAX_MESSAGE_BYTES);
        assert!(kept.chars().all(|c| c == 'é'));
    }
}
