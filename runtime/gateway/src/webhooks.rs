//! Webhooks: when a job with a webhook ends, its status body is POSTed to the webhook's URL,
//! signed with the endpoint's secret, and retried with backoff until the receiver answers
//! 2xx or the tries run out. Each delivery is recorded on the job; deliveries a restart
//! interrupted are resumed at start.
//!
//! The signature is Stripe's scheme: `x-wasp-signature: t=<unix seconds>,v1=<hex>`, where
//! the hex is HMAC-SHA256 with the endpoint's webhook secret over `<t>.<body>`. A receiver
//! recomputes it and refuses a `t` older than a few minutes (replays).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::Sha256;
use wasp_jobs::{Delivery, Job};

use crate::Gateway;
use crate::workers::now_ms;

/// Tries per webhook.
pub(crate) const TRIES: u32 = 5;
/// Delay before the second try; doubled for each further one.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often webhooks that nobody sends are looked for (a delivery whose record could not
/// be written, a lost node's deliveries).
pub(crate) const RESUME_EVERY: Duration = Duration::from_secs(10);

/// The client webhooks are sent with.
pub(crate) type WebhookClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for webhooks: `http` and `https` URLs, TCP_NODELAY, pooled connections. An
/// `https` receiver must present a certificate that chains to one of the system's trusted
/// roots or to one of `extra_roots` (PEM files, for a private CA or a self-signed
/// receiver).
pub(crate) fn client(extra_roots: &[PathBuf]) -> Result<WebhookClient, String> {
    let tls = tls_client_config(extra_roots)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(DELIVERY_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// A TLS client configuration (rustls with ring) that trusts the system's roots and the
/// certificates in the PEM files `extra_roots`; an error names the file at fault.
pub fn tls_client_config(extra_roots: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("a system certificate could not be read: {e}");
    }
    let (added, _) = roots.add_parsable_certificates(native.certs);
    for path in extra_roots {
        let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| at(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| at(&e))?;
        if certs.is_empty() {
            return Err(at(&"holds no PEM certificate"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| at(&e))?;
        }
    }
    if roots.is_empty() {
        tracing::warn!("no trusted root certificates: connections to https URLs will fail");
    } else {
        tracing::debug!(
            system = added,
            extra = extra_roots.len(),
            "trusted roots loaded"
        );
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS settings: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The signature header's value for `body` signed at `t` (unix seconds) with `secret`.
pub(crate) fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC takes a key of any length.
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={t},v1={}",
        wasp_core::files::hex(&mac.finalize().into_bytes())
    )
}

impl Gateway {
    /// Delivers a finished job's webhook in the background, unless it was delivered or
    /// this process sends it already.
    pub(crate) fn deliver_webhook(self: &Arc<Self>, job: Job) {
        if job.webhook.as_ref().is_none_or(|w| !w.pending()) {
            return;
        }
        if !self.sending().insert(job.id.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let id = job.id.clone();
            this.clone().deliver(job).await;
            this.sending().remove(&id);
        });
    }

    fn sending(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.sending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resumes the webhooks a restart interrupted, and (in cluster mode) those of lost
    /// nodes; called at start and then every [`RESUME_EVERY`].
    pub(crate) async fn resume_webhooks(self: &Arc<Self>) {
        match self.jobs.pending_webhooks().await {
            Ok(jobs) => {
                for job in jobs {
                    self.deliver_webhook(job);
                }
            }
            Err(e) => tracing::error!("cannot resume webhooks: {e}"),
        }
    }

    async fn deliver(self: Arc<Self>, job: Job) {
        let Some(webhook) = job.webhook.clone() else {
            return;
        };
        let secret = match self.endpoint(&job.endpoint) {
            Some(d) => d.webhook_secret.clone(),
            None => {
                tracing::warn!(job = %job.id, "the job's endpoint is gone; its webhook is not sent");
                let _ = self
                    .jobs
                    .record_delivery(
                        &job.id,
                        Delivery {
                            at_ms: now_ms(),
                            status: None,
                            error: Some("the endpoint was removed".into()),
                        },
                        false,
                        true,
                    )
                    .await;
                return;
            }
        };
        let body = match serde_json::to_vec(&crate::api::job_status(&self, &job).await) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                tracing::error!(job = %job.id, "cannot encode the webhook body: {e}");
                return;
            }
        };
        let tried = webhook.deliveries.len() as u32;
        let mut delay = FIRST_RETRY * 2u32.saturating_pow(tried.saturating_sub(1));
        for attempt in tried + 1..=TRIES {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            let t = now_ms() / 1000;
            let outcome = self
                .post(
                    &webhook.url,
                    &job.id,
                    signature(&secret, t, &body),
                    body.clone(),
                )
                .await;
            let delivered = matches!(outcome, Ok(status) if (200..300).contains(&status));
            let delivery = match outcome {
                Ok(status) => Delivery {
                    at_ms: now_ms(),
                    status: Some(status),
                    error: (!delivered).then(|| format!("the receiver answered {status}")),
                },
                Err(e) => Delivery {
                    at_ms: now_ms(),
                    status: None,
                    error: Some(e),
                },
            };
            let last = delivered || attempt == TRIES;
            if let Err(e) = self
                .jobs
                .record_delivery(&job.id, delivery, delivered, last)
                .await
            {
                tracing::error!(job = %job.id, "cannot record a webhook delivery: {e}");
                return;
            }
            if delivered {
                return;
            }
        }
        tracing::warn!(job = %job.id, url = %webhook.url, "webhook not delivered after {TRIES} tries");
    }

    async fn post(
        &self,
        url: &str,
        id: &str,
        signature: String,
        body: Bytes,
    ) -> Result<u16, String> {
        let request = hyper::Request::post(url)
            .header("content-type", "application/json")
            .header("user-agent", "wasp-webhook")
            .header("x-wasp-job-id", id)
            .header("x-wasp-signature", signature)
            .body(Full::new(body))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let sent = tokio::time::timeout(DELIVERY_TIMEOUT, async {
            let response = self
                .webhooks
                .request(request)
                .await
                .map_err(|e| causes(&e))?;
            let status = response.status().as_u16();
            // Read (and drop) the answer so that the connection can be reused.
            let _ = response.into_body().collect().await;
            Ok::<u16, String>(status)
        })
        .await;
        match sent {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} s", DELIVERY_TIMEOUT.as_secs())),
        }
    }
}

/// An error with its causes, outermost first (`client error (Connect): invalid peer
/// certificate: UnknownIssuer`): the client's own message alone hides why.
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_webhook_ca_that_is_missing_or_holds_no_certificate_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = client(std::slice::from_ref(&missing)).err().unwrap();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client(std::slice::from_ref(&empty)).err().unwrap();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        assert!(client(&[]).is_ok());
    }

    #[test]
    fn an_error_shows_its_causes_once() {
        #[derive(Debug)]
        struct Layer(&'static str, Option<Box<Layer>>);
        impl std::fmt::Display for Layer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Layer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|l| l as _)
            }
        }
        let e = Layer(
            "client error (Connect)",
            Some(Box::new(Layer(
                "invalid peer certificate: UnknownIssuer",
                Some(Box::new(Layer("UnknownIssuer", None))),
            ))),
        );
        assert_eq!(
            causes(&e),
            "client error (Connect): invalid peer certificate: UnknownIssuer"
        );
    }
}
