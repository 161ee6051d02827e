//! `wasp processor new`: a new processor crate, ready to build for wasm32-wasip2.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The SDK this binary was built beside, if it is still there.
fn default_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk");
    sdk.join("Cargo.toml")
        .exists()
        .then(|| sdk.canonicalize().ok())
        .flatten()
}

/// Writes the crate into `dir` (which must not exist or be empty) and returns it.
pub fn new_processor(name: &str, dir: &Path, sdk: Option<&Path>) -> Result<PathBuf> {
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
    if dir.exists()
        && dir
            .read_dir()
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!("{} exists and is not empty", dir.display());
    }
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
