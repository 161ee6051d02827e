//! wasp's web console, as built by `./x build` from `console/` (Preact and uPlot, bundled
//! by esbuild) and embedded here at compile time, so that `wasp serve` serves it at `/ui`
//! with nothing else installed. A checkout that never built the console still compiles:
//! [`asset`] then finds nothing and [`BUILT`] is false.
#![deny(missing_docs)]

/// One built file.
#[derive(Debug)]
pub struct Asset {
    /// Its path below `/ui/` (`index.html`, `app-<hash>.js`...).
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub bytes: &'static [u8],
    /// The same, gzip-compressed, when the build made them.
    pub gzip: Option<&'static [u8]>,
}

impl Asset {
    /// Whether its name carries a hash of its content (so it may be cached for good).
    pub fn immutable(&self) -> bool {
        self.path != "index.html"
    }
}

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// Whether the console was built when this crate was compiled.
pub const BUILT: bool = !ASSETS.is_empty();

/// The asset at `path` below `/ui/` (`""` is the page itself).
pub fn asset(path: &str) -> Option<&'static Asset> {
    let path = if path.is_empty() { "index.html" } else { path };
    ASSETS.iter().find(|a| a.path == path)
}

/// The hash of the console's sources the embedded assets were built from (empty when
/// not built); `./x` compares it with the sources to rebuild when they changed.
pub fn stamp() -> &'static str {
    STAMP
}

/// Every embedded asset.
pub fn assets() -> &'static [Asset] {
    ASSETS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_found_when_built_and_nothing_else_is_made_up() {
        assert_eq!(asset("").is_some(), BUILT);
        assert!(asset("../Cargo.toml").is_none());
        assert!(asset("nothing.js").is_none());
        if BUILT {
            assert!(assets().iter().any(|a| a.path.ends_with(".js")));
            assert!(!stamp().is_empty());
        }
    }
}
