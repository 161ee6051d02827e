//! What the CLI prints: readable tables and summaries for people, the API's JSON for
//! scripts (`-o json`). Colours only on a terminal, and never when `NO_COLOR` is set.

use std::io::IsTerminal;

use serde_json::Value;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables and summaries.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

/// Prints API answers in one format.
pub struct Printer {
    format: Format,
    colour: bool,
}

impl Printer {
    pub fn new(format: Format) -> Self {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self { format, colour }
    }

    /// `-o json`: prints `value` and returns `true`; a table is left to the caller.
    pub fn json(&self, value: &Value) -> bool {
        if self.format == Format::Json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(_) => println!("{value}"),
            }
            true
        } else {
            false
        }
    }

    /// A status word, coloured by how healthy it is.
    fn status(&self, status: &str) -> String {
        let code = match status {
            "ready" | "scaledToZero" | "COMPLETED" | "RUNNING" => "32",
            "concerning" | "IN_QUEUE" | "IN_PROGRESS" | "PAUSED" => "33",
            "notReady" | "FAILED" | "TIMED_OUT" | "CANCELLED" => "31",
            _ => "2",
        };
        if self.colour {
            format!("\x1b[{code}m{status}\x1b[0m")
        } else {
            status.to_owned()
        }
    }

    /// `wasp ls`.
    pub fn endpoints(&self, body: &Value) {
        if self.json(body) {
            return;
        }
        let mut rows = vec![row(["NAME", "STATUS", "VERSIONS", "URL"])];
        for e in list(&body["endpoints"]) {
            let versions: Vec<String> = list(&e["versions"])
                .iter()
                .map(|v| format!("{}={}%", text(&v["name"]), v["weight"]))
                .collect();
            rows.push(vec![
                text(&e["name"]),
                text(&e["status"]),
                versions.join(","),
                text(&e["url"]),
            ]);
        }
        self.table(&rows, 1);
    }

    /// `wasp status NAME`, `wasp deploy`, `wasp stop`, `wasp start`.
    pub fn endpoint(&self, e: &Value) {
        if self.json(e) {
            return;
        }
        println!("name:     {}", text(&e["name"]));
        if let Some(description) = e["description"].as_str() {
            println!("about:    {description}");
        }
        println!("status:   {}", self.status(&text(&e["status"])));
        println!("url:      {}", text(&e["url"]));
        if let Some(error) = e["error"].as_str() {
            println!("reason:   {error}");
        }
        let mut rows = vec![row([
            "VERSION",
            "WEIGHT",
            "STATUS",
            "BACKEND",
            "INSTANCES",
            "QUEUED",
            "WORKERS",
            "COMPONENT",
        ])];
        for v in list(&e["versions"]) {
            let i = &v["instances"];
            let workers = list(&v["workers"]);
            rows.push(vec![
                text(&v["name"]),
                format!("{}%", v["weight"]),
                text(&v["status"]),
                text(&v["backend"]),
                format!("{} idle, {} busy / {}", i["idle"], i["busy"], i["max"]),
                i["queued"].to_string(),
                format!(
                    "{} ready / {} wanted",
                    workers.iter().filter(|w| w["state"] == "ready").count(),
                    v["desired_workers"]
                ),
                short_digest(&text(&v["component"])),
            ]);
        }
        println!();
        self.table(&rows, 2);
        for v in list(&e["versions"]) {
            for w in list(&v["workers"]) {
                let mut line = format!(
                    "  {} worker {}: {} since {}",
                    text(&v["name"]),
                    w["id"],
                    text(&w["state"]),
                    timestamp(w["since_ms"].as_u64().unwrap_or(0)),
                );
                if let Some(model) = w["model"].as_str() {
                    line.push_str(&format!(
                        ", {model} ({} requests in {} batches, {} queued)",
                        w["requests"], w["batches"], w["queued"]
                    ));
                }
                if let Some(reason) = w["reason"].as_str() {
                    line.push_str(&format!(": {reason}"));
                }
                println!("{line}");
            }
            if v["status"] == "scaledToZero" {
                println!(
                    "  {} is scaled to zero: the next request starts a worker",
                    text(&v["name"])
                );
            }
        }
        if !matches!(e["status"].as_str(), Some("ready" | "stopped")) && e["error"].is_null() {
            println!(
                "\nnot every warm instance or worker is up; `wasp logs {}` shows what the \
                 processors said",
                text(&e["name"])
            );
        }
    }

    /// `wasp logs NAME`.
    pub fn logs(&self, body: &Value) {
        if self.json(body) {
            return;
        }
        for r in list(&body["logs"]) {
            println!(
                "{} {:<5} [{}] {}",
                timestamp(r["at_ms"].as_u64().unwrap_or(0)),
                text(&r["level"]),
                text(&r["version"]),
                text(&r["message"])
            );
        }
    }

    /// `wasp events NAME`.
    pub fn events(&self, body: &Value) {
        if self.json(body) {
            return;
        }
        for e in list(&body["events"]) {
            println!(
                "{} [{}] {} -> {} workers ({}): {}",
                timestamp(e["at_ms"].as_u64().unwrap_or(0)),
                text(&e["version"]),
                e["from"],
                e["to"],
                text(&e["trigger"]),
                text(&e["reason"])
            );
        }
    }

    /// `wasp jobs ls`.
    pub fn jobs(&self, body: &Value) {
        if self.json(body) {
            return;
        }
        let mut rows = vec![vec![
            "ID".to_owned(),
            "ENDPOINT".to_owned(),
            "STATUS".to_owned(),
            "ATTEMPTS".to_owned(),
            "SUBMITTED".to_owned(),
        ]];
        for j in list(&body["jobs"]) {
            rows.push(vec![
                text(&j["id"]),
                text(&j["endpoint"]),
                text(&j["status"]),
                list(&j["attempts"]).len().to_string(),
                timestamp(j["submitted_at_ms"].as_u64().unwrap_or(0)),
            ]);
        }
        self.table(&rows, 2);
    }

    /// `wasp jobs show`, `cancel`, `retry`.
    pub fn job(&self, j: &Value) {
        if self.json(j) {
            return;
        }
        println!("job:       {}", text(&j["id"]));
        println!("endpoint:  {}", text(&j["endpoint"]));
        println!("status:    {}", self.status(&text(&j["status"])));
        println!("priority:  {}", text(&j["priority"]));
        println!(
            "submitted: {}",
            timestamp(j["submitted_at_ms"].as_u64().unwrap_or(0))
        );
        println!(
            "waited:    {} ms, ran {} ms",
            j["delay_ms"], j["execution_ms"]
        );
        for a in list(&j["attempts"]) {
            let outcome = match a["error"]["code"].as_str() {
                Some(code) => format!("{code}: {}", text(&a["error"]["message"])),
                None if a["finished_at_ms"].is_null() => "running".to_owned(),
                None => "ok".to_owned(),
            };
            println!("attempt {}: {outcome}", a["number"]);
        }
        if let Some(error) = j["error"]["message"].as_str() {
            println!("error:     {} ({})", error, text(&j["error"]["code"]));
        }
        if !j["output"].is_null() {
            println!("output:    {}", j["output"]);
        }
        if let Some(url) = j["webhook"]["url"].as_str() {
            println!(
                "webhook:   {url} ({}, {} deliveries)",
                if j["webhook"]["delivered"] == true {
                    "delivered"
                } else {
                    "not delivered"
                },
                list(&j["webhook"]["deliveries"]).len()
            );
        }
    }

    /// `wasp batch ls`.
    pub fn batches(&self, body: &Value) {
        if self.json(body) {
            return;
        }
        let mut rows = vec![vec![
            "ID".to_owned(),
            "ENDPOINT".to_owned(),
            "STATUS".to_owned(),
            "DONE".to_owned(),
            "FAILED".to_owned(),
            "CREATED".to_owned(),
        ]];
        for b in list(&body["batches"]) {
            rows.push(vec![
                text(&b["id"]),
                text(&b["endpoint"]),
                text(&b["status"]),
                format!("{}/{}", b["done"], b["total"]),
                b["failed"].to_string(),
                timestamp(b["created_at_ms"].as_u64().unwrap_or(0)),
            ]);
        }
        self.table(&rows, 2);
    }

    /// `wasp batch status`, `pause`, `resume`, `cancel`.
    pub fn batch(&self, b: &Value) {
        if self.json(b) {
            return;
        }
        println!("batch:    {}", text(&b["id"]));
        println!("endpoint: {}", text(&b["endpoint"]));
        println!("status:   {}", self.status(&text(&b["status"])));
        println!(
            "progress: {}/{} lines ({} failed), {} lines/s{}",
            b["done"],
            b["total"],
            b["failed"],
            b["rate_per_s"],
            b["eta_s"]
                .as_f64()
                .map(|eta| format!(", {eta:.0} s left"))
                .unwrap_or_default()
        );
        if let Some(error) = b["error"].as_str() {
            println!("error:    {error}");
        }
    }

    /// Prints rows as aligned columns; `status_column` is coloured.
    fn table(&self, rows: &[Vec<String>], status_column: usize) {
        let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for (n, r) in rows.iter().enumerate() {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                let pad = widths[c] - cell.chars().count();
                let shown = if n > 0 && c == status_column {
                    self.status(cell)
                } else {
                    cell.clone()
                };
                if c + 1 == r.len() {
                    line.push_str(&shown);
                } else {
                    line.push_str(&shown);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            println!("{}", line.trim_end());
        }
    }
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|c| (*c).to_owned()).collect()
}

fn list(value: &Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `sha256:0123456789ab…`.
fn short_digest(digest: &str) -> String {
    match digest.get(..19) {
        Some(head) if digest.len() > 19 => format!("{head}…"),
        _ => digest.to_owned(),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS.mmm` UTC.
fn timestamp(ms: u64) -> String {
    let t = wasp_core::time::UtcTime::from_unix(ms / 1000);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        ms % 1000
    )
}

/// A batch's progress bar on standard error: redrawn in place on a terminal, a line every
/// ten seconds otherwise.
pub struct Progress {
    terminal: bool,
    last: Option<std::time::Instant>,
}

impl Progress {
    pub fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn line(status: &Value) -> String {
        let (done, total) = (
            status["done"].as_u64().unwrap_or(0),
            status["total"].as_u64().unwrap_or(0).max(1),
        );
        let width = 30;
        let filled = (done * width / total) as usize;
        format!(
            "[{}{}] {done}/{total} lines ({} failed) {} lines/s{}",
            "#".repeat(filled),
            "-".repeat(width as usize - filled),
            status["failed"],
            status["rate_per_s"],
            status["eta_s"]
                .as_f64()
                .map(|eta| format!(", ETA {eta:.0} s"))
                .unwrap_or_default()
        )
    }

    /// Shows the batch's progress now.
    pub fn show(&mut self, status: &Value) {
        if self.terminal {
            eprint!("\r\x1b[2K{}", Self::line(status));
        } else if self.last.is_none_or(|t| t.elapsed().as_secs() >= 10) {
            eprintln!("{}", Self::line(status));
            self.last = Some(std::time::Instant::now());
        }
    }

    /// The last line, with the outcome.
    pub fn finish(&mut self, status: &Value) {
        if self.terminal {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{} {}", Self::line(status), text(&status["status"]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00.000");
        assert_eq!(timestamp(1_795_442_400_123), "2026-11-23 14:00:00.123");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn digests_are_shortened() {
        assert_eq!(
            short_digest("sha256:0123456789abcdef0123"),
            "sha256:0123456789ab…"
        );
        assert_eq!(short_digest("sha256:01"), "sha256:01");
    }
}
