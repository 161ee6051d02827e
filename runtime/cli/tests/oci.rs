//! Processors published as OCI artifacts: `wasp processor push` to a real registry
//! (Debian's docker-registry on loopback, started by `scripts/toolchain engine`), and a
//! spec naming `oci://...` deployed from it, with the tenant's login where the registry
//! wants one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Command, Output};

use common::{Serve, WASP, ok};
use serde_json::json;
use wasp_tests::guests::HELLO;

/// The open registry and the one that wants `wasp` / `wasp-registry-test`.
const OPEN: &str = "127.0.0.1:5555";
const PRIVATE: &str = "127.0.0.1:5556";

/// Whether both registries listen; under CI they must.
fn registries() -> bool {
    let up = [OPEN, PRIVATE]
        .iter()
        .all(|r| std::net::TcpStream::connect(r).is_ok());
    assert!(
        up || std::env::var_os("CI").is_none(),
        "no registries on {OPEN} and {PRIVATE}; CI starts them (scripts/toolchain engine)"
    );
    if !up {
        eprintln!("SKIPPED the OCI processor tests: no registries on {OPEN} and {PRIVATE}");
    }
    up
}

/// `wasp processor push` with `stdin`.
fn push(args: &[&str], stdin: &str) -> Output {
    common::with_stdin(
        Command::new(WASP).args(["processor", "push"]).args(args),
        stdin,
    )
}

fn spec(name: &str, component: &str) -> String {
    format!(
        "name = \"{name}\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\n\
         component = \"{component}\"\n"
    )
}

#[test]
fn processors_are_pushed_to_and_deployed_from_a_registry() {
    if !registries() {
        return;
    }
    let tag = format!("t{}", std::process::id());
    // To the open registry: the pinned reference comes back.
    let open_ref = format!("{OPEN}/wasp/hello:{tag}");
    let pinned = ok(push(&[HELLO, &open_ref], "")).trim().to_owned();
    assert!(
        pinned.starts_with(&format!("oci://{open_ref}@sha256:")),
        "{pinned}"
    );
    // The manifest is the CNCF Wasm OCI layout.
    let manifest = Command::new("curl")
        .args([
            "-sf",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!("http://{OPEN}/v2/wasp/hello/manifests/{tag}"))
        .output()
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    assert_eq!(
        manifest["layers"][0]["size"],
        std::fs::metadata(HELLO).unwrap().len()
    );

    // To the private one: refused without a login, taken with one.
    let private_ref = format!("{PRIVATE}/wasp/hello:{tag}");
    let refused = push(&[HELLO, &private_ref], "");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("login"),
        "{refused:?}"
    );
    let wrong = push(&[HELLO, &private_ref, "-u", "wasp"], "nope\n");
    assert!(!wrong.status.success(), "{wrong:?}");
    ok(push(
        &[HELLO, &private_ref, "-u", "wasp"],
        "wasp-registry-test\n",
    ));
    // Not a component: refused before anything is sent.
    let not = push(
        &[
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oci.rs"),
            &private_ref,
        ],
        "",
    );
    assert!(
        String::from_utf8_lossy(&not.stderr).contains("not a Wasm component"),
        "{not:?}"
    );

    // An image of another kind, put there by hand: a config blob, a layer, a manifest.
    let curl = |args: &[&str]| {
        let out = Command::new("curl").arg("-sf").args(args).output().unwrap();
        assert!(out.status.success(), "curl {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let put_blob = |bytes: &str| {
        let digest = wasp_oci::digest_of(bytes.as_bytes());
        let head = curl(&[
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            &format!("http://{OPEN}/v2/wasp/not-wasm/blobs/uploads/"),
        ]);
        let location = head
            .lines()
            .find_map(|l| l.strip_prefix("Location: "))
            .unwrap()
            .trim();
        curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            bytes,
            &format!("{location}&digest={digest}"),
        ]);
        digest
    };
    let (config, layer) = ("{}", "not a wasm layer");
    let (config_digest, layer_digest) = (put_blob(config), put_blob(layer));
    let image_manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest, "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar",
                     "digest": layer_digest, "size": layer.len() }],
    });
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &image_manifest.to_string(),
        &format!("http://{OPEN}/v2/wasp/not-wasm/manifests/{tag}"),
    ]);

    let data = tempfile::tempdir().unwrap();
    let server = Serve::start(data.path());
    let c = server.client();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // From the open registry, by tag and by the pinned digest: the stored spec names
        // the component by its digest, the same bytes as an upload.
        let put = |name: &str, component: &str| {
            let c = c.clone();
            let body = spec(name, component);
            let path = format!("/api/v1/endpoints/{name}");
            async move {
                c.request_with("PUT", &path, &[("content-type", "application/toml")], body)
                    .await
            }
        };
        let by_tag = put("tagged", &format!("oci://{open_ref}")).await;
        assert_eq!(by_tag.status, 201, "{}", by_tag.text());
        let uploaded = c.upload(HELLO).await;
        assert_eq!(
            by_tag.json()["spec"]["versions"][0]["processor"]["component"],
            uploaded.as_str()
        );
        let hello = c.invoke("tagged", "", r#"{"name":"oci"}"#).await;
        assert_eq!(hello.status, 200, "{}", hello.text());
        assert!(hello.text().contains("oci"), "{}", hello.text());
        let by_digest = put("pinned", &pinned).await;
        assert_eq!(by_digest.status, 201, "{}", by_digest.text());

        // A digest the manifest does not have, a tag that is not there, a container image
        // (not a component): each refused naming the field.
        let bad_digest = format!("oci://{open_ref}@sha256:{}", "0".repeat(64));
        let missing_tag = format!("oci://{OPEN}/wasp/hello:no-such-tag");
        let image = format!("oci://{OPEN}/wasp/not-wasm:{tag}");
        for (component, says) in [
            (bad_digest.as_str(), "sha256:"),
            (missing_tag.as_str(), "not in its registry"),
            ("oci://Not/A/Reference", "not an OCI reference"),
        ] {
            let reply = put("bad", component).await;
            assert_eq!(reply.status, 422, "{component}: {}", reply.text());
            let error = &reply.json()["error"];
            assert_eq!(error["field"], "versions[0].processor.component");
            assert!(error["message"].as_str().unwrap().contains(says), "{error}");
        }
        // An artifact of another kind (a container image's config, no wasm layer).
        let reply = put("bad", &image).await;
        assert_eq!(reply.status, 422, "{}", reply.text());
        assert!(
            reply.text().contains("not a Wasm component"),
            "{}",
            reply.text()
        );

        // From the private registry: only with the tenant's own login.
        let private = format!("oci://{private_ref}");
        let refused = put("private", &private).await;
        assert_eq!(refused.status, 422, "{}", refused.text());
        assert!(
            refused
                .text()
                .contains(&format!("PUT /api/v1/registries/{PRIVATE}")),
            "{}",
            refused.text()
        );
        let login = c
            .request_with(
                "PUT",
                &format!("/api/v1/registries/{PRIVATE}"),
                &[("content-type", "application/json")],
                json!({ "username": "wasp", "password": "wasp-registry-test" }).to_string(),
            )
            .await;
        assert_eq!(login.status, 201, "{}", login.text());
        let taken = put("private", &private).await;
        assert_eq!(taken.status, 201, "{}", taken.text());
        let hello = c.invoke("private", "", r#"{"name":"private"}"#).await;
        assert_eq!(hello.status, 200, "{}", hello.text());
    });
    drop(server);
}
