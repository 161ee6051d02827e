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
            "ready" | "scaledToZero" => "32",
            "concerning" => "33",
            "notReady" => "31",
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
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
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
