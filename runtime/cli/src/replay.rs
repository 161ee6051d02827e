//! `wasp records` and `wasp replay`: download an endpoint's request records, and send them
//! again to one version to see where its answers differ from the recorded ones (shadow
//! testing a new version against real traffic before it takes any).

use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine;
use hyper::Method;
use serde_json::Value;
use wasp_gateway::RequestRecord;

use crate::client::{self, Client};

/// Headers a replay does not send again: the connection's own, and the version pin it
/// sets itself.
const NOT_REPLAYED: [&str; 7] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-wasp-version",
    "x-request-id",
];

/// Writes every record file of `name`, oldest first, to `out` (`-`: standard output).
pub async fn save(client: &Client, name: &str, out: &Path) -> Result<usize> {
    let listing = client.get(&client::endpoint_path(name, "/records")).await?;
    let mut all = Vec::new();
    let files = listing["files"].as_array().cloned().unwrap_or_default();
    for file in &files {
        let file = file["name"].as_str().unwrap_or_default();
        let bytes = client
            .get_bytes(&client::endpoint_path(
                name,
                &format!("/records/{}", client::query_value(file)),
            ))
            .await?;
        all.extend_from_slice(&bytes);
    }
    let lines = all.iter().filter(|b| **b == b'\n').count();
    if out == Path::new("-") {
        std::io::Write::write_all(&mut std::io::stdout(), &all)?;
    } else {
        std::fs::write(out, &all).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(lines)
}

/// How a replayed answer compares with the recorded one.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// The same status and body.
    Same,
    /// What differs, for a person.
    Differs(String),
}

/// Compares a new answer with a record: status, then body (as JSON values when both are
/// JSON, numbers within `tolerance`; else byte for byte).
pub fn compare(record: &RequestRecord, status: u16, body: &[u8], tolerance: f64) -> Verdict {
    if record.status != status {
        return Verdict::Differs(format!("status {} -> {status}", record.status));
    }
    let recorded = recorded_body(&record.response_body, &record.response_body_base64);
    if record.response_body_truncated {
        // Only the recorded prefix can be compared.
        let prefix = &body[..body.len().min(recorded.len())];
        return if prefix == recorded.as_slice() {
            Verdict::Same
        } else {
            Verdict::Differs("body differs within its recorded part".into())
        };
    }
    match (
        serde_json::from_slice::<Value>(&recorded),
        serde_json::from_slice::<Value>(body),
    ) {
        (Ok(old), Ok(new)) => match first_difference(&old, &new, "$", tolerance) {
            None => Verdict::Same,
            Some(at) => Verdict::Differs(format!("body differs at {at}")),
        },
        _ if recorded == body => Verdict::Same,
        _ => Verdict::Differs(format!(
            "body differs ({} bytes -> {} bytes)",
            recorded.len(),
            body.len()
        )),
    }
}

fn recorded_body(text: &Option<String>, base64: &Option<String>) -> Vec<u8> {
    match (text, base64) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_default(),
        (None, None) => Vec::new(),
    }
}

/// Where two JSON values first differ, as a path with both values.
fn first_difference(old: &Value, new: &Value, at: &str, tolerance: f64) -> Option<String> {
    match (old, new) {
        (Value::Number(a), Value::Number(b)) => {
            let (x, y) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            ((x - y).abs() > tolerance || x.is_nan() != y.is_nan())
                .then(|| format!("{at}: {a} -> {b}"))
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Some(format!("{at}: {} items -> {}", a.len(), b.len()));
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}[{i}]"), tolerance))
        }
        (Value::Object(a), Value::Object(b)) => {
            if let Some(key) = a.keys().find(|k| !b.contains_key(*k)) {
                return Some(format!("{at}.{key}: gone"));
            }
            if let Some(key) = b.keys().find(|k| !a.contains_key(*k)) {
                return Some(format!("{at}.{key}: new"));
            }
            a.iter()
                .find_map(|(k, x)| first_difference(x, &b[k], &format!("{at}.{k}"), tolerance))
        }
        _ if old == new => None,
        _ => Some(format!("{at}: {old} -> {new}")),
    }
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Summary {
    /// Records sent again.
    pub replayed: usize,
    /// Answers as recorded.
    pub same: usize,
    /// Answers that differ.
    pub differ: usize,
    /// Records not sent: cut bodies, or lines that are not records.
    pub skipped: usize,
}

/// Sends each record of `file` to `version` of `name` and compares the answers, printing
/// each difference; the summary.
pub async fn replay(
    client: &Client,
    name: &str,
    version: &str,
    file: &Path,
    tolerance: f64,
) -> Result<Summary> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mut summary = Summary::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: RequestRecord = match serde_json::from_str(line) {
            Ok(record) => record,
            Err(e) => {
                eprintln!("line {}: not a request record ({e}); skipped", n + 1);
                summary.skipped += 1;
                continue;
            }
        };
        if record.body_truncated {
            eprintln!(
                "line {} ({}): its request body was cut when recorded; skipped",
                n + 1,
                record.request_id
            );
            summary.skipped += 1;
            continue;
        }
        let method = Method::from_bytes(record.method.as_bytes())
            .with_context(|| format!("line {}: bad method `{}`", n + 1, record.method))?;
        let mut headers: Vec<(String, String)> = record
            .headers
            .iter()
            .filter(|(k, _)| !NOT_REPLAYED.iter().any(|h| k.eq_ignore_ascii_case(h)))
            .cloned()
            .collect();
        headers.push(("x-wasp-version".into(), version.to_owned()));
        let body = recorded_body(&record.body, &record.body_base64);
        let path = client::endpoint_invoke_path(name, &record.path);
        let (status, answer) = client.send_with(method, &path, &headers, body).await?;
        if status.as_u16() == 404
            && serde_json::from_slice::<Value>(&answer)
                .is_ok_and(|v| v["error"]["code"] == "version_not_found")
        {
            bail!("endpoint `{name}` has no version `{version}`");
        }
        summary.replayed += 1;
        match compare(&record, status.as_u16(), &answer, tolerance) {
            Verdict::Same => summary.same += 1,
            Verdict::Differs(why) => {
                summary.differ += 1;
                println!(
                    "line {} ({} {} {}): {why}",
                    n + 1,
                    record.request_id,
                    record.method,
                    record.path
                );
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: u16, body: &str) -> RequestRecord {
        RequestRecord {
            at_ms: 0,
            request_id: "r".into(),
            version: "v1".into(),
            method: "POST".into(),
            path: "/".into(),
            headers: Vec::new(),
            body: None,
            body_base64: None,
            body_truncated: false,
            status,
            response_headers: Vec::new(),
            response_body: Some(body.into()),
            response_body_base64: None,
            response_body_truncated: false,
            latency_ms: 0.0,
        }
    }

    #[test]
    fn answers_compare_by_status_then_json_value_then_bytes() {
        let r = record(200, r#"{"a": [1.0, 2.0], "b": "x"}"#);
        assert_eq!(
            compare(&r, 200, br#"{"b":"x","a":[1.0,2.0]}"#, 0.0),
            Verdict::Same
        );
        assert_eq!(
            compare(&r, 500, b"{}", 0.0),
            Verdict::Differs("status 200 -> 500".into())
        );
        assert_eq!(
            compare(&r, 200, br#"{"a":[1.0,2.5],"b":"x"}"#, 0.0),
            Verdict::Differs("body differs at $.a[1]: 2.0 -> 2.5".into())
        );
        assert_eq!(
            compare(&r, 200, br#"{"a":[1.0,2.0000001],"b":"x"}"#, 1e-3),
            Verdict::Same
        );
        assert_eq!(
            compare(&r, 200, br#"{"a":[1.0,2.0]}"#, 0.0),
            Verdict::Differs("body differs at $.b: gone".into())
        );
        let text = record(200, "hello");
        assert_eq!(compare(&text, 200, b"hello", 0.0), Verdict::Same);
        assert!(matches!(
            compare(&text, 200, b"hullo", 0.0),
            Verdict::Differs(_)
        ));
    }
}
