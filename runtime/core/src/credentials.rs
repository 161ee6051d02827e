//! The credentials file: the API key the `wasp` CLI sends to each server, by server URL.
//!
//! ```toml
//! [servers."http://127.0.0.1:8080"]
//! key = "wasp_..."
//! ```
//!
//! `wasp login` writes it; `wasp serve` writes its first operator key into it for its own
//! loopback URLs, so that the CLI on the same machine works with no step by hand. The file
//! is `$WASP_CREDENTIALS`, else `$XDG_CONFIG_HOME/wasp/credentials.toml`, else
//! `~/.config/wasp/credentials.toml`; it is written atomically and readable by its owner
//! only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A login to an image or artifact registry.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryLogin {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryLogin")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the file holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    /// Keys by server URL (`http://host:port`, no trailing slash).
    #[serde(default)]
    pub servers: BTreeMap<String, ServerKey>,
}

/// The key for one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKey {
    /// The API key.
    pub key: String,
}

/// Why the file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// It is not a credentials file.
    #[error("{path}: not a credentials file: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Where the credentials file is (see the module docs); `None` when no home is known.
pub fn default_path() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("WASP_CREDENTIALS").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("wasp").join("credentials.toml"))
}

/// The server URL as the file keys it: no trailing slash.
pub fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

impl Credentials {
    /// Reads the file; an absent file holds nothing.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(CredentialsError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|e| CredentialsError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// The key for `url`, if the file has one.
    pub fn key_for(&self, url: &str) -> Option<&str> {
        self.servers.get(&normalize(url)).map(|s| s.key.as_str())
    }

    /// Sets the key for `url` in the file at `path` (made, with its directory, if absent),
    /// keeping every other entry.
    pub fn store(path: &Path, url: &str, key: &str) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.to_owned(),
            source,
        };
        let mut all = Self::load(path)?;
        all.servers.insert(
            normalize(url),
            ServerKey {
                key: key.to_owned(),
            },
        );
        let text = toml::to_string(&all).map_err(|e| CredentialsError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        crate::files::write_atomic_with(path, |file| {
            use std::io::Write;
            restrict(file)?;
            file.write_all(text.as_bytes())
        })
        .map_err(io)
    }
}

/// Makes a file readable and writable by its owner only.
pub fn restrict(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keys_are_kept_per_server_and_readable_by_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/credentials.toml");
        assert_eq!(Credentials::load(&path).unwrap(), Credentials::default());
        Credentials::store(&path, "http://127.0.0.1:8080/", "wasp_a_1").unwrap();
        Credentials::store(&path, "http://10.0.0.2:9000", "wasp_b_2").unwrap();
        Credentials::store(&path, "http://127.0.0.1:8080", "wasp_a_3").unwrap();
        let read = Credentials::load(&path).unwrap();
        assert_eq!(read.key_for("http://127.0.0.1:8080"), Some("wasp_a_3"));
        assert_eq!(read.key_for("http://10.0.0.2:9000/"), Some("wasp_b_2"));
        assert_eq!(read.key_for("http://elsewhere"), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "servers = 3").unwrap();
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::Parse { .. })
        ));
    }
}
