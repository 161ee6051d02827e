//! The web console in a real browser against a real `wasp serve`: the steps are in
//! `console/tests/console.test.cjs` (playwright-core driving Debian's Chromium); this
//! test starts the server, makes the tenants, keys and the 1,000 endpoints the script
//! needs, runs it, and fails with its output when it fails. Screenshots and figures land
//! in target/console/shots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Serve;
use serde_json::json;
use wasp_tests::guests::{CHAT, HELLO, HOSTILE};

use wasp_tests::process::root;

/// Where the browser and the console's npm packages are, or why the test cannot run
/// (a failure in CI, where `./x test` installs them).
fn tools() -> Option<(PathBuf, PathBuf)> {
    let modules = root().join("target/console/node_modules");
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned()));
    let missing = if !modules.join("playwright-core").is_dir() {
        Some("target/console/node_modules (scripts/toolchain console)")
    } else if !chromium.is_file() {
        Some("chromium (scripts/toolchain browser)")
    } else {
        None
    };
    if let Some(what) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "the browser test needs {what}; ./x test installs it"
        );
        eprintln!("skipped: the browser test needs {what}; ./x test installs it");
        return None;
    }
    Some((modules, chromium))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let Some((modules, chromium)) = tools() else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let models = wasp_tests::models_dir().display().to_string();
    let server = Serve::try_start(
        data.path(),
        &[
            "--max-instances",
            "1200",
            "--mount-root",
            &models,
            "--models-dir",
            &models,
        ],
    )
    .unwrap_or_else(|r| panic!("wasp serve did not start: {}", r.stderr));
    let operator = server.client();
    let page = operator.get("/ui/").await;
    assert_eq!(
        page.status,
        200,
        "the console is not in this build: {}",
        page.text()
    );

    for tenant in ["acme", "bravo", "many"] {
        let made = operator
            .post_json("/api/v1/tenants", &json!({ "name": tenant }))
            .await;
        assert_eq!(made.status, 201, "{}", made.text());
    }
    let admin = operator.make_key("acme", "admin").await;
    let invoker = operator.make_key("acme", "invoker").await;
    operator
        .as_key(Some(&admin))
        .deploy_ok(HOSTILE, &wasp_tests::spec("noisy", ""))
        .await;
    let bravo = operator.as_key(Some(&operator.make_key("bravo", "admin").await));
    bravo
        .deploy_ok(HELLO, &wasp_tests::spec("bravo-secret", ""))
        .await;

    // A chat endpoint over the real SmolLM2 weights, for the streamed try-it.
    let chat = format!(
        "name = \"smol\"\n[[versions]]\nname = \"v1\"\n\
         backend = {{ kind = \"candle\", model = \"SmolLM2-135M-Instruct\", task = \"generate\", \
         device = \"cpu\", max_sequences = 2, kv_cache_mib = 128 }}\n[versions.processor]\n\
         component = \"{{COMPONENT}}\"\nmounts = [{{ host = {:?}, guest = \"/model\" }}]\n\
         env = {{ CONTEXT_LENGTH = \"512\", DEFAULT_MAX_TOKENS = \"24\" }}\n",
        wasp_tests::smollm2_dir().display().to_string()
    );
    operator.deploy_ok(CHAT, &chat).await;

    // 1,000 endpoints in one tenant, that scale to zero once deployed.
    let many = operator.as_key(Some(&operator.make_key("many", "admin").await));
    let digest = many.upload(HELLO).await;
    let deploys: Vec<_> = (0..8)
        .map(|k| {
            let many = many.clone();
            let digest = digest.clone();
            tokio::spawn(async move {
                for i in (k..1000).step_by(8) {
                    let spec = format!(
                        "name = \"svc-{i:04}\"\n[[versions]]\nname = \"v1\"\n\
                         processor = {{ component = \"{digest}\" }}\n[versions.scaling]\n\
                         min_workers = 0\nscale_down_delay_s = 0\nstable_window_s = 1\npanic_window_s = 1\n"
                    );
                    let made = many.post("/api/v1/endpoints", spec).await;
                    assert_eq!(made.status, 201, "{}", made.text());
                }
            })
        })
        .collect();
    for d in deploys {
        d.await.unwrap();
    }

    let shots = root().join("target/console/shots");
    let _ = std::fs::remove_dir_all(&shots);
    let output = Command::new("node")
        .arg(root().join("console/tests/console.test.cjs"))
        .env("NODE_PATH", &modules)
        .env("CHROMIUM", &chromium)
        .env("WASP_URL", &server.url)
        .env("WASP_OPERATOR_KEY", &server.key)
        .env("WASP_ADMIN_KEY", &admin)
        .env("WASP_INVOKER_KEY", &invoker)
        .env("WASP_OTHER_ENDPOINT", "bravo-secret")
        .env("WASP_MANY_TENANT", "many")
        .env("WASP_CHAT_ENDPOINT", "smol")
        .env("WASP_LOGGING_ENDPOINT", "noisy")
        .env("WASP_COMPONENT", HELLO)
        .env("WASP_SHOTS", &shots)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "the browser test failed:\n{said}\nserver log:\n{}",
        server.stderr()
    );
    println!("{said}");
    for shot in [
        "endpoints.png",
        "endpoint.png",
        "deploy-error.png",
        "jobs.png",
    ] {
        assert!(shots.join(shot).is_file(), "no screenshot {shot}");
    }
}
