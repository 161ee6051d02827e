//! `wasp processor build`: turns a processor's sources (Rust, Python, JavaScript or C)
//! into a component with that language's toolchain, and skips the work when nothing it
//! reads has changed since the last build.
//!
//! Toolchains come from one directory (`--toolchains`, `WASP_TOOLCHAINS`, or the
//! `target/tools` that `scripts/toolchain LANG` fills beside this build), laid out as
//! `bin/{componentize-py,wasm-tools,wit-bindgen}`, `js/node_modules` (jco,
//! componentize-js, the preview2 shim) and `wasi_snapshot_preview1.reactor.wasm`. Rust
//! needs only cargo and the `wasm32-wasip2` target; C also needs Debian's clang, lld and
//! wasi-libc.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// A processor's source language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust, with the `wasp-sdk` crate.
    Rust,
    /// Python, built by componentize-py.
    Python,
    /// JavaScript (an ES module), built by componentize-js.
    Js,
    /// C, built by clang for wasm32-wasi and made a component by wasm-tools.
    C,
}

impl Lang {
    /// The language of the processor in `dir`, from the entry file it holds.
    pub fn detect(dir: &Path) -> Result<Self> {
        let found = [
            ("Cargo.toml", Lang::Rust),
            ("app.py", Lang::Python),
            ("app.js", Lang::Js),
            ("app.c", Lang::C),
        ];
        for (file, lang) in found {
            if dir.join(file).is_file() {
                return Ok(lang);
            }
        }
        bail!(
            "{} holds no Cargo.toml, app.py, app.js or app.c; pass --lang or point at a processor",
            dir.display()
        )
    }

    /// The directory name of this language's SDK under `sdk/`.
    pub fn sdk_dir(self) -> &'static str {
        match self {
            Lang::Rust => "",
            Lang::Python => "python",
            Lang::Js => "js",
            Lang::C => "c",
        }
    }
}

/// What `build` needs besides the processor's directory.
pub struct BuildOptions {
    /// The language (detected when `None`).
    pub lang: Option<Lang>,
    /// The world to target (`full`, `service`, `processor`).
    pub world: String,
    /// Where to write the component (default `DIR/target/NAME.wasm`).
    pub out: Option<PathBuf>,
    /// The WIT contract (default: `DIR/wit`, else the one beside this build).
    pub wit: Option<PathBuf>,
    /// The SDK (default: one vendored in `DIR`, else the one beside this build).
    pub sdk: Option<PathBuf>,
    /// The toolchains directory.
    pub toolchains: Option<PathBuf>,
}

/// The repository this binary was built in, if it is still there.
pub fn source_tree() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.join("wit/world.wit")
        .exists()
        .then(|| root.canonicalize().ok())
        .flatten()
}

fn toolchains(given: Option<&Path>) -> Option<PathBuf> {
    given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("WASP_TOOLCHAINS").map(PathBuf::from))
        .or_else(|| source_tree().map(|root| root.join("target/tools")))
}

/// The path of `tool`: in the toolchains' `bin/`, else on `PATH`.
fn tool(tools: Option<&Path>, name: &str, lang: &str) -> Result<PathBuf> {
    if let Some(path) = tools
        .map(|t| t.join("bin").join(name))
        .filter(|p| p.exists())
    {
        return Ok(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    on_path.with_context(|| {
        format!("`{name}` is not installed: run `scripts/toolchain {lang}` from the wasp repository, or set WASP_TOOLCHAINS")
    })
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs a tool whose progress chatter is noise: its output is shown only when it fails.
fn run_quiet(command: &mut Command, what: &str) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        use std::io::Write;
        let mut stderr = std::io::stderr();
        let _ = stderr.write_all(&output.stdout);
        let _ = stderr.write_all(&output.stderr);
        bail!("{what} failed ({})", output.status);
    }
    Ok(())
}

/// Every file under `dir`, sorted; build output and dependencies are left out.
fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let skip = matches!(
            name.to_str(),
            Some("target" | "node_modules" | ".git" | "__pycache__")
        );
        let kind = entry.file_type()?;
        if skip || kind.is_symlink() {
            continue;
        }
        if kind.is_dir() {
            files(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// A digest of everything a build reads.
fn inputs_digest(dirs: &[&Path], settings: &str) -> Result<String> {
    let mut all = Vec::new();
    for dir in dirs {
        files(dir, &mut all)?;
    }
    let mut text = settings.as_bytes().to_vec();
    for path in all {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        text.extend_from_slice(path.to_string_lossy().as_bytes());
        text.extend_from_slice(&wasp_core::files::sha256(&bytes));
    }
    Ok(wasp_core::files::sha256_hex(&text))
}

/// What every language's build reads.
#[derive(Clone, Copy)]
struct Sources<'a> {
    /// The processor's directory.
    dir: &'a Path,
    /// The language's SDK.
    sdk: &'a Path,
    /// The WIT contract.
    wit: &'a Path,
    /// The world to build.
    world: &'a str,
    /// The toolchains directory.
    tools: Option<&'a Path>,
}

/// Builds the processor in `dir` and returns the component's path.
pub fn build(dir: &Path, options: &BuildOptions) -> Result<PathBuf> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{} does not exist", dir.display()))?;
    let lang = match options.lang {
        Some(lang) => lang,
        None => Lang::detect(&dir)?,
    };
    if lang == Lang::Rust {
        return build_rust(&dir, options.out.as_deref());
    }
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("processor")
        .to_owned();
    let out = match &options.out {
        Some(out) => std::path::absolute(out)?,
        None => dir
            .join("target")
            .join(format!("{}.wasm", name.replace('-', "_"))),
    };
    let tree = source_tree();
    let wit = match &options.wit {
        Some(wit) => wit.clone(),
        None if dir.join("wit").is_dir() => dir.join("wit"),
        None => tree
            .as_ref()
            .map(|t| t.join("wit"))
            .context("no wit/ in the processor's directory; pass --wit")?,
    };
    let vendored = match lang {
        Lang::Python => dir.join("wasp/__init__.py").exists(),
        Lang::Js => dir.join("wasp.js").exists(),
        Lang::C => dir.join("wasp.h").exists(),
        Lang::Rust => true,
    };
    let sdk = match &options.sdk {
        Some(sdk) => sdk.clone(),
        None if vendored => dir.clone(),
        None => tree
            .as_ref()
            .map(|t| t.join("sdk").join(lang.sdk_dir()))
            .context("no SDK in the processor's directory; pass --sdk")?,
    };
    let tools = toolchains(options.toolchains.as_deref());
    let stamp = tools
        .as_ref()
        .and_then(|t| {
            let sub = if lang == Lang::Python { "python" } else { "js" };
            std::fs::read_to_string(t.join(sub).join(".installed")).ok()
        })
        .unwrap_or_default();
    let settings = format!("{lang:?} {} {stamp}", options.world);
    let digest = inputs_digest(&[&dir, &sdk, &wit], &settings)?;
    let stamp_file = out.with_extension("wasm.inputs");
    if out.exists() && std::fs::read_to_string(&stamp_file).is_ok_and(|d| d == digest) {
        return Ok(out);
    }
    let parent = out.parent().context("--out has no directory")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    // Built beside the output and renamed into place, so that a reader never sees half a
    // component and two builds at once do not trample each other.
    let work = tempfile::Builder::new()
        .prefix(".wasp-build-")
        .tempdir_in(parent)?;
    let built = work.path().join("component.wasm");
    let sources = Sources {
        dir: &dir,
        sdk: &sdk,
        wit: &wit,
        world: &options.world,
        tools: tools.as_deref(),
    };
    match lang {
        Lang::Python => build_python(&sources, &built)?,
        Lang::Js => build_js(&sources, work.path(), &built)?,
        Lang::C => build_c(&sources, work.path(), &built)?,
        // Built by cargo, which keeps its own record of what changed (returned above).
        Lang::Rust => return build_rust(&dir, Some(&out)),
    }
    std::fs::rename(&built, &out).with_context(|| format!("cannot write {}", out.display()))?;
    std::fs::write(&stamp_file, &digest)?;
    Ok(out)
}

fn build_rust(dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml"))?;
    let name = manifest
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once('=')?;
            (key.trim() == "name").then(|| value.trim().trim_matches('"').to_owned())
        })
        .context("Cargo.toml names no package")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(
        Command::new(cargo).current_dir(dir).args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
        ]),
        "cargo build",
    )?;
    let built = dir
        .join("target/wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    match out {
        Some(out) => {
            std::fs::copy(&built, out)
                .with_context(|| format!("cannot copy {} to {}", built.display(), out.display()))?;
            Ok(out.to_owned())
        }
        None => Ok(built),
    }
}

fn build_python(sources: &Sources, out: &Path) -> Result<()> {
    let Sources {
        dir,
        sdk,
        wit,
        world,
        tools,
    } = *sources;
    let componentize = tool(tools, "componentize-py", "python")?;
    let mut command = Command::new(componentize);
    command
        .arg("-d")
        .arg(wit)
        .args(["-w", world, "componentize", "app", "-p"])
        .arg(dir);
    if sdk != dir {
        command.arg("-p").arg(sdk);
    }
    command.arg("-o").arg(out);
    run_quiet(&mut command, "componentize-py")
}

/// The Node script that runs componentize-js (its CLI gives the build no filesystem).
const JS_BUILD: &str = r#"import { componentize } from '@bytecodealliance/componentize-js';
import { _setPreopens } from '@bytecodealliance/preview2-shim/filesystem';
import { writeFile } from 'node:fs/promises';
const [source, wit, world, out] = process.argv.slice(2);
_setPreopens({ '/': '/' });
// Processors reach the network through the host's policy only: no wasi:http.
const { component } = await componentize({
  sourcePath: source, witPath: wit, worldName: world, disableFeatures: ['http', 'fetch-event'],
});
await writeFile(out, component);
"#;

fn build_js(sources: &Sources, work: &Path, out: &Path) -> Result<()> {
    let Sources {
        dir,
        sdk,
        wit,
        world,
        tools,
    } = *sources;
    let modules = tools
        .map(|t| t.join("js"))
        .filter(|js| js.join("node_modules/@bytecodealliance/componentize-js").exists())
        .context("componentize-js is not installed: run `scripts/toolchain js` from the wasp repository, or set WASP_TOOLCHAINS")?;
    // The sources and the SDK side by side, so that `./wasp.js` resolves.
    let staged = work.join("src");
    let mut sources = Vec::new();
    files(dir, &mut sources)?;
    for file in sources {
        let relative = file.strip_prefix(dir)?;
        let target = staged.join(relative);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&file, &target)?;
    }
    if sdk != dir {
        std::fs::copy(sdk.join("wasp.js"), staged.join("wasp.js"))
            .with_context(|| format!("no wasp.js in {}", sdk.display()))?;
    }
    // The script must sit beside node_modules for its imports to resolve.
    let script = modules.join(format!(".wasp-build-{}.mjs", std::process::id()));
    std::fs::write(&script, JS_BUILD)?;
    let result = run(
        Command::new("node")
            .arg(&script)
            .arg(staged.join("app.js"))
            .arg(wit)
            .arg(world)
            .arg(out),
        "componentize-js",
    );
    let _ = std::fs::remove_file(&script);
    result
}

fn build_c(sources: &Sources, work: &Path, out: &Path) -> Result<()> {
    let Sources {
        dir,
        sdk,
        wit,
        world,
        tools,
    } = *sources;
    let bindgen = tool(tools, "wit-bindgen", "c")?;
    let wasm_tools = tool(tools, "wasm-tools", "c")?;
    let clang = tool(None, "clang", "c")?;
    let adapter = tools
        .map(|t| t.join("wasi_snapshot_preview1.reactor.wasm"))
        .filter(|a| a.exists())
        .context("the WASI preview1 adapter is missing: run `scripts/toolchain c`")?;
    // The generated header is named after the world; the SDK includes `full.h`.
    if world != "full" {
        bail!("C processors build the `full` world (the SDK exports every interface)");
    }
    let bindings = work.join("bindings");
    run_quiet(
        Command::new(bindgen)
            .args(["c", "--world", world, "--out-dir"])
            .arg(&bindings)
            .arg(wit),
        "wit-bindgen c",
    )?;
    let mut sources = Vec::new();
    files(dir, &mut sources)?;
    let mut command = Command::new(clang);
    command
        .args([
            "--target=wasm32-wasi",
            "-mexec-model=reactor",
            "-O2",
            "-Wall",
        ])
        .arg("-I")
        .arg(&bindings)
        .arg("-I")
        .arg(sdk)
        .arg("-I")
        .arg(dir);
    for source in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
    {
        command.arg(source);
    }
    if sdk != dir {
        command.arg(sdk.join("wasp.c"));
    }
    let core = work.join("core.wasm");
    command
        .arg(bindings.join(format!("{world}.c")))
        .arg(bindings.join(format!("{world}_component_type.o")))
        .arg("-o")
        .arg(&core);
    run(&mut command, "clang")?;
    run_quiet(
        Command::new(wasm_tools)
            .args(["component", "new"])
            .arg(&core)
            .arg("--adapt")
            .arg(format!("wasi_snapshot_preview1={}", adapter.display()))
            .arg("-o")
            .arg(out),
        "wasm-tools component new",
    )
}
