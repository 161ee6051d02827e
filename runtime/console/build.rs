//! Embeds the console's built assets (`console/dist`, made by `./x build`) in the crate.
//! Without them the crate still builds, and says how to build them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let dist = manifest.join("../../console/dist");
    println!("cargo:rerun-if-changed={}", dist.display());
    let mut files = Vec::new();
    if dist.join("index.html").is_file() {
        collect(&dist, &dist, &mut files);
    }
    files.sort();
    let mut code = String::from("/// The built assets: path, content type, bytes, gzip bytes.\n");
    code.push_str("pub(crate) static ASSETS: &[Asset] = &[\n");
    for (name, path) in &files {
        if name.ends_with(".gz") || name == "stamp" {
            continue;
        }
        let gz = PathBuf::from(format!("{}.gz", path.display()));
        let gzip = if gz.is_file() {
            format!("Some(include_bytes!({:?}))", gz.display().to_string())
        } else {
            "None".to_owned()
        };
        let _ = writeln!(
            code,
            "    Asset {{ path: {name:?}, content_type: {:?}, bytes: include_bytes!({:?}), gzip: {gzip} }},",
            content_type(name),
            path.display().to_string(),
        );
    }
    code.push_str("];\n");
    let stamp = std::fs::read_to_string(dist.join("stamp")).unwrap_or_default();
    let _ = writeln!(
        code,
        "/// The hash of the sources the assets were built from.\npub(crate) static STAMP: &str = {:?};",
        stamp.trim()
    );
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default()).join("assets.rs");
    if let Err(e) = std::fs::write(&out, code) {
        println!("cargo:warning=cannot write {}: {e}", out.display());
    }
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(root, &path, files);
        } else if let Ok(relative) = path.strip_prefix(root) {
            let name = relative.to_string_lossy().replace('\\', "/");
            let absolute = path.canonicalize().unwrap_or(path);
            files.push((name, absolute));
        }
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
