//! TLS for the server: a certificate chain and key from PEM files, read again when either
//! file changes, so that a renewed certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Where the server's certificate chain and private key are (`--tls-cert`, `--tls-key`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM file of the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file of the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Serves the newest good certificate: reloads when a file's modification time changes,
/// and keeps the old one (logging why) when the new files do not load.
#[derive(Debug)]
pub(crate) struct Reloading {
    files: TlsFiles,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Reads the chain and key and checks that they belong together.
fn load(files: &TlsFiles) -> Result<Arc<CertifiedKey>, Error> {
    let bad = |what: &str, path: &Path, e: String| {
        Error::Setting(format!("{what} {}: {e}", path.display()))
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad("--tls-cert", &files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad("--tls-cert", &files.cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(
            "--tls-cert",
            &files.cert,
            "holds no PEM certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad("--tls-key", &files.key, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
        bad(
            "--tls-key",
            &files.key,
            format!("does not fit the certificate: {e}"),
        )
    })?;
    Ok(Arc::new(certified))
}

impl Reloading {
    /// Loads the files (an error names the flag and the file).
    pub fn new(files: TlsFiles) -> Result<Self, Error> {
        let key = load(&files)?;
        let stamps = (modified(&files.cert), modified(&files.key));
        Ok(Self {
            current: RwLock::new((key, stamps.0, stamps.1)),
            files,
        })
    }

    /// Loads the files again if either changed since they were last read; `true` when
    /// a new certificate is now served.
    pub fn refresh(&self) -> bool {
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        {
            let current = self.current.read().unwrap_or_else(|e| e.into_inner());
            if (current.1, current.2) == stamps {
                return false;
            }
        }
        match load(&self.files) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) =
                    (key, stamps.0, stamps.1);
                tracing::info!(cert = %self.files.cert.display(), "loaded the renewed TLS certificate");
                true
            }
            Err(e) => {
                // Half-written files, say: keep serving the old one, and try again later.
                tracing::warn!("keeping the current TLS certificate: {e}");
                false
            }
        }
    }

    /// The server configuration that serves it over TLS 1.2 or 1.3, offering the
    /// application protocols `alpn` (`http/1.1`, or `h2` for gRPC).
    pub fn server_config(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, Error> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Setting(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .0
                .clone(),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn write(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn bad_files_are_refused_naming_the_flag_and_a_bad_renewal_keeps_the_old_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write(dir.path(), "a");
        let (_, other_key) = write(dir.path(), "b");
        let error = |files: TlsFiles| Reloading::new(files).unwrap_err().to_string();
        let e = error(TlsFiles {
            cert: dir.path().join("missing.crt"),
            key: key.clone(),
        });
        assert!(e.contains("--tls-cert") && e.contains("missing.crt"), "{e}");
        let e = error(TlsFiles {
            cert: key.clone(),
            key: key.clone(),
        });
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = error(TlsFiles {
            cert: cert.clone(),
            key: other_key,
        });
        assert!(e.contains("--tls-key") && e.contains("does not fit"), "{e}");

        let reloading = Arc::new(
            Reloading::new(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            })
            .unwrap(),
        );
        assert!(!reloading.refresh(), "nothing changed");
        // A half-written renewal: the old certificate stays.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(!reloading.refresh());
        assert!(reloading.server_config(&[b"http/1.1"]).is_ok());
    }
}
