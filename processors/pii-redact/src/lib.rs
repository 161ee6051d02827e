//! Redacts personal data (e-mail addresses, phone numbers, payment card numbers, IPv4
//! addresses) from text.
//!
//! - As a service (backend `none`): `POST {"text": "..."}` or `{"texts": [...]}`, optionally
//!   with `"kinds": ["email", ...]`, answers the redacted text and what was found where.
//! - Around a model: `pre_process` redacts every string of a JSON request before the model
//!   sees it (sent as the model input's parameters), and `post_process` redacts every string
//!   of the model's JSON metadata before the client sees it.
//!
//! Configuration: `REDACT_KINDS` (comma-separated, default all four) and `REDACT_MASK`
//! (default `[{KIND}]`, where `{KIND}` becomes `EMAIL`, `PHONE`, `CARD` or `IPV4`).

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use wasp_sdk::{Error, ModelInput, ModelOutput, Prepared, Processor, Request, Response};

/// A kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// An e-mail address.
    Email,
    /// A payment card number (13–19 digits passing the Luhn check).
    Card,
    /// An IPv4 address.
    Ipv4,
    /// A phone number (9–15 digits, with common separators).
    Phone,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Email, Kind::Card, Kind::Ipv4, Kind::Phone];

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Card => "card",
            Kind::Ipv4 => "ipv4",
            Kind::Phone => "phone",
        }
    }
}

/// One piece of personal data found, as byte offsets into the original text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What it is.
    pub kind: Kind,
    /// Byte offset of its first byte.
    pub start: usize,
    /// Byte offset just past its last byte.
    pub end: usize,
}

struct Detectors {
    email: Regex,
    card: Regex,
    ipv4: Regex,
    phone: Regex,
}

fn detectors() -> Result<&'static Detectors, Error> {
    static DETECTORS: OnceLock<Result<Detectors, String>> = OnceLock::new();
    let built = DETECTORS.get_or_init(|| {
        let re = |p: &str| Regex::new(p).map_err(|e| e.to_string());
        Ok(Detectors {
            email: re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")?,
            card: re(r"\b\d(?:[ -]?\d){12,18}\b")?,
            ipv4: re(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")?,
            phone: re(r"(?:\+|\b)\d[\d ().-]{7,}\d\b")?,
        })
    });
    built
        .as_ref()
        .map_err(|e| Error::internal(format!("detector failed to build: {e}")))
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn digits(s: &str) -> Vec<u8> {
    s.bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

/// Finds personal data of the given kinds, without overlaps (earlier kinds in
/// [`Kind::ALL`] order win), sorted by position.
pub fn find(text: &str, kinds: &[Kind]) -> Result<Vec<Finding>, Error> {
    let d = detectors()?;
    let mut found: Vec<Finding> = Vec::new();
    for kind in Kind::ALL.into_iter().filter(|k| kinds.contains(k)) {
        let re = match kind {
            Kind::Email => &d.email,
            Kind::Card => &d.card,
            Kind::Ipv4 => &d.ipv4,
            Kind::Phone => &d.phone,
        };
        for m in re.find_iter(text) {
            let valid = match kind {
                Kind::Email => true,
                Kind::Card => luhn(&digits(m.as_str())),
                Kind::Ipv4 => m.as_str().split('.').all(|o| o.parse::<u8>().is_ok()),
                Kind::Phone => (9..=15).contains(&digits(m.as_str()).len()),
            };
            let overlaps = found.iter().any(|f| m.start() < f.end && f.start < m.end());
            if valid && !overlaps {
                found.push(Finding {
                    kind,
                    start: m.start(),
                    end: m.end(),
                });
            }
        }
    }
    found.sort_by_key(|f| f.start);
    Ok(found)
}

/// Replaces each finding with `mask`, `{KIND}` in it becoming the upper-case kind.
pub fn redact(text: &str, findings: &[Finding], mask: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&text[at..f.start]);
        out.push_str(&mask.replace("{KIND}", &f.kind.name().to_uppercase()));
        at = f.end;
    }
    out.push_str(&text[at..]);
    out
}

struct Settings {
    kinds: Vec<Kind>,
    mask: String,
}

fn settings() -> Result<&'static Settings, Error> {
    static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
    let built = SETTINGS.get_or_init(|| {
        let kinds = match wasp_sdk::config::get("REDACT_KINDS") {
            None => Kind::ALL.to_vec(),
            Some(list) => parse_kinds(list.split(',').map(str::trim).filter(|s| !s.is_empty()))
                .map_err(|e| format!("REDACT_KINDS: {e}"))?,
        };
        let mask = wasp_sdk::config::get("REDACT_MASK").unwrap_or_else(|| "[{KIND}]".into());
        Ok(Settings { kinds, mask })
    });
    built.as_ref().map_err(|e| Error::internal(e.clone()))
}

fn parse_kinds<'a>(names: impl Iterator<Item = &'a str>) -> Result<Vec<Kind>, String> {
    names
        .map(|n| {
            Kind::parse(n).ok_or_else(|| format!("unknown kind `{n}` (email, card, ipv4, phone)"))
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedactRequest {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    texts: Option<Vec<String>>,
    #[serde(default)]
    kinds: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Redacted {
    text: String,
    findings: Vec<Finding>,
}

fn redact_one(text: &str, kinds: &[Kind], mask: &str) -> Result<Redacted, Error> {
    let findings = find(text, kinds)?;
    Ok(Redacted {
        text: redact(text, &findings, mask),
        findings,
    })
}

/// Redacts every string inside a JSON value, keys excepted.
fn redact_json(value: &mut Value, kinds: &[Kind], mask: &str) -> Result<(), Error> {
    match value {
        Value::String(s) => {
            let findings = find(s, kinds)?;
            if !findings.is_empty() {
                *s = redact(s, &findings, mask);
            }
        }
        Value::Array(items) => {
            for item in items {
                redact_json(item, kinds, mask)?;
            }
        }
        Value::Object(map) => {
            for (_, item) in map.iter_mut() {
                redact_json(item, kinds, mask)?;
            }
        }
        _ => {}
    }
    Ok(())
}

struct PiiRedact;

impl Processor for PiiRedact {
    fn init() -> Result<(), Error> {
        detectors()?;
        settings()?;
        Ok(())
    }

    fn handle(request: Request) -> Result<Response, Error> {
        let settings = settings()?;
        let body: RedactRequest = request.json()?;
        let kinds = match &body.kinds {
            Some(names) => parse_kinds(names.iter().map(String::as_str))
                .map_err(|e| Error::bad_request(e).with_field("kinds"))?,
            None => settings.kinds.clone(),
        };
        match (body.text, body.texts) {
            (Some(text), None) => Ok(Response::json(&redact_one(&text, &kinds, &settings.mask)?)),
            (None, Some(texts)) => {
                let results = texts
                    .iter()
                    .map(|t| redact_one(t, &kinds, &settings.mask))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Response::json(&serde_json::json!({ "results": results })))
            }
            _ => {
                Err(Error::bad_request("give exactly one of `text` or `texts`").with_field("text"))
            }
        }
    }

    fn pre_process(request: Request) -> Result<Prepared, Error> {
        let settings = settings()?;
        let mut body: Value = request.json()?;
        redact_json(&mut body, &settings.kinds, &settings.mask)?;
        Ok(Prepared {
            input: ModelInput {
                tensors: Vec::new(),
                parameters: Some(body.to_string()),
            },
            context: Vec::new(),
        })
    }

    fn post_process(_context: Vec<u8>, output: ModelOutput) -> Result<Response, Error> {
        let settings = settings()?;
        let mut body: Value = match &output.metadata {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| Error::internal(format!("model metadata is not JSON: {e}")))?,
            None => Value::Null,
        };
        redact_json(&mut body, &settings.kinds, &settings.mask)?;
        Ok(Response::json(&body))
    }
}

wasp_sdk::processor!(PiiRedact);

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds_in(text: &str) -> Vec<(Kind, &str)> {
        find(text, &Kind::ALL)
            .unwrap()
            .into_iter()
            .map(|f| (f.kind, &text[f.start..f.end]))
            .collect()
    }

    #[test]
    fn finds_each_kind() {
        let text = "mail jane.doe@example.co.uk or call +44 20 7946 0958, card 4111 1111 1111 1111, host 192.168.1.20";
        assert_eq!(
            kinds_in(text),
            [
                (Kind::Email, "jane.doe@example.co.uk"),
                (Kind::Phone, "+44 20 7946 0958"),
                (Kind::Card, "4111 1111 1111 1111"),
                (Kind::Ipv4, "192.168.1.20"),
            ]
        );
    }

    #[test]
    fn rejects_lookalikes() {
        // Fails Luhn, octet out of range, too few digits for a phone.
        assert!(kinds_in("4111 1111 1111 1112 and 999.1.1.1 and 12-34").is_empty());
    }

    #[test]
    fn redacts_with_mask() {
        let text = "write to a@b.io now";
        let findings = find(text, &[Kind::Email]).unwrap();
        assert_eq!(redact(text, &findings, "[{KIND}]"), "write to [EMAIL] now");
        assert_eq!(redact(text, &findings, "***"), "write to *** now");
    }

    #[test]
    fn redacts_nested_json_strings_only() {
        let mut v =
            serde_json::json!({"messages": [{"role": "user", "content": "I am x@y.org"}], "n": 1});
        redact_json(&mut v, &Kind::ALL, "[{KIND}]").unwrap();
        assert_eq!(v["messages"][0]["content"], "I am [EMAIL]");
        assert_eq!(v["n"], 1);
    }
}
