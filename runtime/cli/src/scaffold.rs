//! `wasp processor new`: a new processor, ready to build: a Rust crate that depends on
//! the `wasp-sdk` crate, or a Python, JavaScript or C project that carries its own copy of
//! the WIT contract and of that language's SDK (embedded in this binary), so that it
//! builds anywhere the language's toolchain is installed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::build::Lang;

/// The SDK this binary was built beside, if it is still there.
fn default_sdk() -> Option<PathBuf> {
    crate::build::source_tree()
        .map(|root| root.join("sdk"))
        .filter(|sdk| sdk.join("Cargo.toml").exists())
}

/// The WIT contract, file by file.
pub const WIT: [(&str, &str); 8] = [
    ("config.wit", include_str!("../../../wit/config.wit")),
    ("handler.wit", include_str!("../../../wit/handler.wit")),
    ("inference.wit", include_str!("../../../wit/inference.wit")),
    ("lifecycle.wit", include_str!("../../../wit/lifecycle.wit")),
    ("log.wit", include_str!("../../../wit/log.wit")),
    ("transform.wit", include_str!("../../../wit/transform.wit")),
    ("types.wit", include_str!("../../../wit/types.wit")),
    ("world.wit", include_str!("../../../wit/world.wit")),
];

/// Writes a new processor in `lang` into `dir` (which must not exist or be empty) and
/// returns it.
pub fn new_processor(name: &str, dir: &Path, lang: Lang, sdk: Option<&Path>) -> Result<PathBuf> {
    if lang != Lang::Rust {
        return new_polyglot(name, dir, lang);
    }
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    if !valid {
        bail!(
            "`{name}` is not a crate name: use letters, digits, `-` and `_`, starting with a letter"
        );
    }
    let sdk = match sdk {
        Some(path) => path
            .canonicalize()
            .with_context(|| format!("--sdk-path {} does not exist", path.display()))?,
        None => default_sdk().context("cannot find the wasp-sdk crate; pass --sdk-path")?,
    };
    check_empty(dir)?;
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::create_dir_all(dir.join(".cargo"))?;
    let sdk = sdk.display().to_string().replace('\\', "/");
    let files = [
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
wasp-sdk = {{ path = "{sdk}" }}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[profile.release]
opt-level = "s"
strip = "debuginfo"

# A processor is its own workspace.
[workspace]
"#
            ),
        ),
        (
            ".cargo/config.toml",
            "[build]\ntarget = \"wasm32-wasip2\"\n".to_owned(),
        ),
        (".gitignore", "/target\n".to_owned()),
        ("src/lib.rs", LIB_RS.replace("{name}", name)),
        (
            "endpoint.toml",
            format!(
                r#"# Deploy with: wasp deploy endpoint.toml
name = "{name}"

[[versions]]
name = "v1"
processor = {{ component = "target/wasm32-wasip2/release/{}.wasm" }}
"#,
                name.replace('-', "_")
            ),
        ),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir.to_owned())
}

const LIB_RS: &str = r#"//! The `{name}` processor.

use serde::Deserialize;
use wasp_sdk::{Error, Processor, Request, Response};

struct App;

#[derive(Deserialize)]
struct Input {
    text: String,
}

impl Processor for App {
    /// Answers requests alone (an endpoint with backend `none`).
    fn handle(request: Request) -> Result<Response, Error> {
        let input: Input = request.json()?;
        wasp_sdk::log::info("handling a request");
        Ok(Response::json(&serde_json::json!({
            "processor": "{name}",
            "length": input.text.chars().count(),
        })))
    }
}

wasp_sdk::processor!(App);
"#;

fn check_empty(dir: &Path) -> Result<()> {
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", dir.display());
    }
    Ok(())
}

fn write_all(dir: &Path, files: &[(String, String)]) -> Result<()> {
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// A Python, JavaScript or C processor with its own copy of the contract and the SDK.
fn new_polyglot(name: &str, dir: &Path, lang: Lang) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if !valid {
        bail!(
            "`{name}` is not a processor name: use lowercase letters, digits and `-`, starting with a letter"
        );
    }
    check_empty(dir)?;
    let mut files: Vec<(String, String)> = WIT
        .iter()
        .map(|(file, text)| (format!("wit/{file}"), (*text).to_owned()))
        .collect();
    let sdk: &[(&str, &str)] = match lang {
        Lang::Python => &[
            (
                "wasp/__init__.py",
                include_str!("../../../sdk/python/wasp/__init__.py"),
            ),
            (
                "wasp/exports.py",
                include_str!("../../../sdk/python/wasp/exports.py"),
            ),
            ("app.py", APP_PY),
        ],
        Lang::Js => &[
            ("wasp.js", include_str!("../../../sdk/js/wasp.js")),
            ("app.js", APP_JS),
        ],
        Lang::C => &[
            ("wasp.h", include_str!("../../../sdk/c/wasp.h")),
            ("wasp.c", include_str!("../../../sdk/c/wasp.c")),
            ("app.c", APP_C),
        ],
        Lang::Rust => &[],
    };
    files.extend(
        sdk.iter()
            .map(|(file, text)| ((*file).to_owned(), text.replace("{name}", name))),
    );
    let wasm = name.replace('-', "_");
    files.push((".gitignore".into(), "/target\n".into()));
    files.push((
        "endpoint.toml".into(),
        format!(
            r#"# Build with: wasp processor build
# Deploy with: wasp deploy endpoint.toml
name = "{name}"

[[versions]]
name = "v1"
processor = {{ component = "target/{wasm}.wasm" }}
"#
        ),
    ));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_all(dir, &files)?;
    Ok(dir.to_owned())
}

const APP_PY: &str = r#""""The `{name}` processor."""

import wasp
from wasp.exports import *  # noqa: F401,F403  (the component's entry points)


@wasp.handle
def handle(request: wasp.Request):
    """Answers requests alone (an endpoint with backend `none`)."""
    body = request.json()
    text = body.get("text") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise wasp.ProcessorError.bad_request("`text` must be a string", field="text")
    wasp.log.info("handling a request")
    return wasp.Response.json({"processor": "{name}", "length": len(text)})
"#;

const APP_JS: &str = r#"// The `{name}` processor.
import { processor, log, ProcessorError, Response } from './wasp.js';

export const { lifecycle, handler, transform } = processor({
  // Answers requests alone (an endpoint with backend `none`).
  handle(request) {
    const body = request.json();
    if (typeof body?.text !== 'string') {
      throw ProcessorError.badRequest('`text` must be a string', 'text');
    }
    log.info('handling a request');
    return Response.json({ processor: '{name}', length: [...body.text].length });
  },
});
"#;

const APP_C: &str = r#"/* The `{name}` processor. */
#include "wasp.h"

/* Answers requests alone (an endpoint with backend `none`). */
bool wasp_handle(const wasp_request_t *request, wasp_response_t *response, wasp_error_t *error) {
    wasp_json_t *body;
    if (!wasp_request_json(request, &body, error)) return false;
    const wasp_json_t *text = wasp_json_get(body, "text");
    if (!text || text->type != WASP_JSON_STRING) {
        wasp_json_free(body);
        return wasp_fail(error, WASP_BAD_REQUEST, "text", "`text` must be a string");
    }
    size_t chars = 0;
    for (size_t i = 0; i < text->length; i++) chars += ((unsigned char)text->string[i] & 0xC0) != 0x80;
    wasp_json_free(body);
    wasp_log(WASP_LOG_INFO, "handling a request");
    wasp_buf_t out = {0};
    wasp_buf_printf(&out, "{\"processor\":\"{name}\",\"length\":%zu}", chars);
    wasp_response_json(response, 200, &out);
    return true;
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file of `wit/` is embedded, so that scaffolds carry the whole contract.
    #[test]
    fn embeds_every_wit_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = WIT.iter().map(|(f, _)| (*f).to_owned()).collect();
        assert_eq!(embedded, on_disk);
    }
}
