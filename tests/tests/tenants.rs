//! Tenants and API keys against a real server on loopback: every route keeps each tenant
//! inside its own resources, keys act by role, and a request without a key reaches public
//! endpoints only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{Value, json};
use wasp_tests::guests::{HELLO, HOSTILE};
use wasp_tests::{TestServer, spec};

/// Makes a key and returns it.
/// Status and error code of a reply.
fn outcome(reply: &wasp_tests::Reply) -> (u16, Value) {
    let code = serde_json::from_slice::<Value>(&reply.body)
        .map(|v| v["error"]["code"].clone())
        .unwrap_or(Value::Null);
    (reply.status, code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_never_sees_or_reaches_another_tenants_resources() {
    let t = TestServer::start().await;
    let operator = &t.client;
    for name in ["acme", "bravo"] {
        let made = operator
            .post_json("/api/v1/tenants", &json!({ "name": name }))
            .await;
        assert_eq!(made.status, 201, "{}", made.text());
    }
    let acme = operator.as_key(Some(&operator.make_key("acme", "admin").await));
    let bravo = operator.as_key(Some(&operator.make_key("bravo", "admin").await));

    // The same name in two tenants: two endpoints.
    acme.deploy_ok(HELLO, &spec("shared", "")).await;
    bravo.deploy_ok(HOSTILE, &spec("shared", "")).await;
    bravo.deploy_ok(HOSTILE, &spec("secret", "")).await;
    acme.deploy_ok(HELLO, &spec("acmeonly", "")).await;
    let hello = acme.invoke("shared", "", r#"{"name":"a"}"#).await;
    assert_eq!(hello.status, 200, "{}", hello.text());
    assert!(hello.text().contains('a'));
    assert_eq!(bravo.invoke("shared", "/ok", "").await.text(), "ok");
    let listed = acme.get("/api/v1/endpoints").await.json();
    let mut names: Vec<&str> = listed["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["acmeonly", "shared"]);
    assert_eq!(
        acme.get("/api/v1/endpoints/shared").await.json()["url"],
        "/t/acme/endpoints/shared/invoke"
    );
    // The operator sees each tenant through its prefix.
    let in_bravo = operator.get("/t/bravo/api/v1/endpoints").await.json();
    assert_eq!(in_bravo["endpoints"].as_array().unwrap().len(), 2);

    // Bravo's own job and batch, which acme must not reach either.
    let job = bravo
        .post_json(
            "/endpoints/secret/run",
            &json!({ "input": 1, "path": "/ok" }),
        )
        .await;
    assert_eq!(job.status, 202, "{}", job.text());
    let job = job.json()["id"].as_str().unwrap().to_owned();
    let early = bravo.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(early.status, 200, "{}", early.text());
    let batch = bravo
        .post("/api/v1/batches?endpoint=secret&path=/ok", "{}\n{}\n")
        .await;
    assert_eq!(batch.status, 202, "{}", batch.text());
    let batch = batch.json()["id"].as_str().unwrap().to_owned();
    let digest = bravo.upload(HOSTILE).await;
    let own_digest = acme.upload(HELLO).await;

    // Every route, with bravo's `secret` and with a name that exists nowhere: acme gets
    // the same answer for both, so it learns nothing of bravo's.
    let routes: Vec<(&str, String, String)> = vec![
        ("GET", "/api/v1/endpoints/{e}".into(), String::new()),
        ("PUT", "/api/v1/endpoints/{e}".into(), "bad spec".into()),
        ("DELETE", "/api/v1/endpoints/{e}".into(), String::new()),
        ("POST", "/api/v1/endpoints/{e}/stop".into(), String::new()),
        ("POST", "/api/v1/endpoints/{e}/start".into(), String::new()),
        ("GET", "/api/v1/endpoints/{e}/logs".into(), String::new()),
        ("GET", "/api/v1/endpoints/{e}/events".into(), String::new()),
        ("GET", "/api/v1/endpoints/{e}/metrics".into(), String::new()),
        (
            "GET",
            "/api/v1/endpoints/{e}/webhook-secret".into(),
            String::new(),
        ),
        (
            "POST",
            "/api/v1/endpoints/{e}/webhook-secret/rotate".into(),
            String::new(),
        ),
        ("POST", "/endpoints/{e}/invoke/ok".into(), String::new()),
        ("POST", "/endpoints/{e}/run".into(), r#"{"input":1}"#.into()),
        (
            "POST",
            "/endpoints/{e}/runsync".into(),
            r#"{"input":1}"#.into(),
        ),
        (
            "GET",
            format!("/endpoints/{{e}}/status/{job}"),
            String::new(),
        ),
        (
            "GET",
            format!("/endpoints/{{e}}/result/{job}"),
            String::new(),
        ),
        (
            "POST",
            format!("/endpoints/{{e}}/cancel/{job}"),
            String::new(),
        ),
        ("POST", "/endpoints/{e}/purge-queue".into(), String::new()),
        ("GET", "/endpoints/{e}/health".into(), String::new()),
        ("GET", "/v2/models/{e}/ready".into(), String::new()),
        ("GET", "/v2/models/{e}".into(), String::new()),
        ("GET", "/v2/models/{e}/versions/v1".into(), String::new()),
        (
            "GET",
            "/v2/models/{e}/versions/v1/ready".into(),
            String::new(),
        ),
        (
            "POST",
            "/v2/models/{e}/versions/v1/infer".into(),
            r#"{"inputs":[]}"#.into(),
        ),
        (
            "POST",
            "/v2/models/{e}/infer".into(),
            r#"{"inputs":[]}"#.into(),
        ),
        (
            "POST",
            "/v1/embeddings".into(),
            r#"{"model":"{e}","input":"x"}"#.into(),
        ),
        ("POST", "/api/v1/batches?endpoint={e}".into(), "{}\n".into()),
    ];
    for (method, path, body) in &routes {
        let theirs = acme
            .request(
                method,
                &path.replace("{e}", "secret"),
                body.replace("{e}", "secret"),
            )
            .await;
        let nowhere = acme
            .request(
                method,
                &path.replace("{e}", "nowhere"),
                body.replace("{e}", "nowhere"),
            )
            .await;
        assert_eq!(
            outcome(&theirs),
            outcome(&nowhere),
            "{method} {path}: {} vs {}",
            theirs.text(),
            nowhere.text()
        );
        assert!(
            theirs.status == 404 || theirs.status == 400 || theirs.status == 422,
            "{method} {path}: {}",
            theirs.text()
        );
    }
    // Bravo's endpoint is untouched by all that.
    assert_eq!(bravo.invoke("secret", "/ok", "").await.text(), "ok");

    // Jobs, batches and components by id.
    assert_eq!(acme.get(&format!("/api/v1/jobs/{job}")).await.status, 404);
    let own = bravo.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(own.status, 200, "{}", own.text());
    let jobs = acme.get("/api/v1/jobs").await.json();
    assert!(!jobs.to_string().contains(&job));
    assert!(bravo.get("/api/v1/jobs").await.text().contains(&job));
    for path in [
        format!("/api/v1/batches/{batch}"),
        format!("/api/v1/batches/{batch}/output"),
    ] {
        assert_eq!(acme.get(&path).await.status, 404, "{path}");
    }
    assert_eq!(
        acme.post(&format!("/api/v1/batches/{batch}/cancel"), "")
            .await
            .status,
        404
    );
    assert!(!acme.get("/api/v1/batches").await.text().contains(&batch));
    assert!(bravo.get("/api/v1/batches").await.text().contains(&batch));
    let hex = digest.trim_start_matches("sha256:");
    assert_eq!(
        acme.get(&format!("/api/v1/components/{hex}")).await.status,
        404
    );
    assert_eq!(
        bravo.get(&format!("/api/v1/components/{hex}")).await.status,
        200
    );
    let stolen = format!(
        "name = \"stolen\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\ncomponent = \"{digest}\"\n"
    );
    let refused = acme.request("POST", "/api/v1/endpoints", stolen).await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(
        refused.json()["error"]["field"],
        "versions[0].processor.component"
    );
    assert!(own_digest.starts_with("sha256:"));

    // Another tenant's space by prefix: nothing there.
    let prefixed = acme.get("/t/bravo/api/v1/endpoints").await;
    assert_eq!(prefixed.status, 404);
    assert_eq!(acme.get("/t/acme/api/v1/endpoints").await.status, 200);

    // The inference import looks in the caller's own tenant only: bravo's processor
    // asking for acme's model learns what it would of a model that does not exist.
    let across = bravo.invoke("secret", "/infer", "acmeonly").await;
    let absent = bravo.invoke("secret", "/infer", "nothing-here").await;
    assert_eq!(outcome(&across), outcome(&absent), "{}", across.text());
    assert!(across.text().contains("not found"), "{}", across.text());
    let qualified = bravo.invoke("secret", "/infer", "acme/acmeonly").await;
    assert_eq!(
        outcome(&qualified),
        outcome(&absent),
        "{}",
        qualified.text()
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_act_by_role_and_requests_without_one_reach_public_endpoints_only() {
    let t = TestServer::start().await;
    let operator = &t.client;
    operator
        .post_json("/api/v1/tenants", &json!({ "name": "acme" }))
        .await;
    let admin_key = operator.make_key("acme", "admin").await;
    let admin = operator.as_key(Some(&admin_key));
    let invoker = operator.as_key(Some(&operator.make_key("acme", "invoker").await));
    let nobody = operator.as_key(None);
    admin.deploy_ok(HELLO, &spec("private", "")).await;
    admin
        .deploy_ok(HELLO, &format!("public = true\n{}", spec("open", "")))
        .await;

    // Who they are.
    let me = invoker.get("/api/v1/whoami").await.json();
    assert_eq!(
        (me["tenant"].as_str(), me["role"].as_str()),
        (Some("acme"), Some("invoker"))
    );
    let me = operator.get("/api/v1/whoami").await.json();
    assert_eq!(me["role"], "operator");

    // An invoker calls its tenant's data routes and nothing else.
    assert_eq!(
        invoker
            .invoke("private", "", r#"{"name":"x"}"#)
            .await
            .status,
        200
    );
    let job = invoker
        .post_json(
            "/endpoints/private/run",
            &json!({ "input": { "name": "j" } }),
        )
        .await;
    assert_eq!(job.status, 202, "{}", job.text());
    for (method, path) in [
        ("GET", "/api/v1/endpoints"),
        ("POST", "/api/v1/endpoints"),
        ("DELETE", "/api/v1/endpoints/private"),
        ("PUT", "/api/v1/components"),
    ] {
        let refused = invoker.request(method, path, "x").await;
        assert_eq!(
            outcome(&refused),
            (403, json!("forbidden")),
            "{method} {path}"
        );
    }
    assert_eq!(invoker.get("/api/v1/keys").await.status, 403);

    // An admin manages its tenant, not the server.
    for (method, path) in [
        ("GET", "/api/v1/tenants"),
        ("POST", "/api/v1/tenants"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/store/snapshot"),
    ] {
        let refused = admin.request(method, path, "{}").await;
        assert_eq!(refused.status, 403, "{method} {path}: {}", refused.text());
    }
    let escalate = admin
        .post_json("/api/v1/keys", &json!({ "role": "operator" }))
        .await;
    assert_eq!(outcome(&escalate), (403, json!("forbidden")));
    let elsewhere = admin
        .post_json(
            "/api/v1/keys",
            &json!({ "role": "admin", "tenant": "default" }),
        )
        .await;
    assert_eq!(elsewhere.status, 403);
    let own = admin
        .post_json("/api/v1/keys", &json!({ "role": "invoker" }))
        .await;
    assert_eq!(own.status, 201, "{}", own.text());
    let own = own.json();
    assert_eq!(own["tenant"], "acme");
    let listed = admin.get("/api/v1/keys").await.text();
    assert!(listed.contains(own["id"].as_str().unwrap()));
    assert!(
        !listed.contains(own["key"].as_str().unwrap()),
        "keys are never listed"
    );
    let keys = operator.get("/api/v1/keys").await.json();
    assert!(
        keys["keys"].as_array().unwrap().len() >= 4,
        "the operator sees every tenant's keys"
    );
    assert!(
        !admin
            .get("/api/v1/keys")
            .await
            .text()
            .contains("\"operator\""),
        "a tenant admin sees its own tenant's keys only"
    );

    // No key: open routes and public endpoints only.
    assert_eq!(nobody.get("/healthz").await.status, 200);
    assert_eq!(nobody.get("/api/v1/openapi.json").await.status, 200);
    let refused = nobody.get("/api/v1/endpoints").await;
    assert_eq!(outcome(&refused), (401, json!("missing_api_key")));
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Bearer realm=\"wasp\"")
    );
    let open = nobody
        .post("/t/acme/endpoints/open/invoke", r#"{"name":"anyone"}"#)
        .await;
    assert_eq!(open.status, 200, "{}", open.text());
    let private = nobody
        .post("/t/acme/endpoints/private/invoke", r#"{"name":"x"}"#)
        .await;
    let absent = nobody
        .post("/t/acme/endpoints/absent/invoke", r#"{"name":"x"}"#)
        .await;
    assert_eq!(outcome(&private), (401, json!("missing_api_key")));
    assert_eq!(outcome(&private), outcome(&absent));
    let job = nobody
        .post("/t/acme/endpoints/open/run", r#"{"input":{"name":"j"}}"#)
        .await;
    assert_eq!(job.status, 202, "{}", job.text());
    assert_eq!(
        nobody
            .post("/t/nosuch/endpoints/open/invoke", "")
            .await
            .status,
        404
    );

    // Bad and revoked keys.
    let bad = operator.as_key(Some("wasp_0000_nope"));
    assert_eq!(
        outcome(&bad.get("/api/v1/endpoints").await),
        (401, json!("invalid_api_key"))
    );
    let id = admin.get("/api/v1/whoami").await.json()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        operator
            .request("DELETE", &format!("/api/v1/keys/{id}"), "")
            .await
            .status,
        204
    );
    assert_eq!(admin.get("/api/v1/endpoints").await.status, 401);

    // The last operator key stays: without it nobody reaches the control plane again.
    let own = operator.get("/api/v1/whoami").await.json()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let last = operator
        .request("DELETE", &format!("/api/v1/keys/{own}"), "")
        .await;
    assert_eq!(outcome(&last), (409, json!("last_operator_key")));
    let second = operator
        .post("/api/v1/keys", r#"{"role":"operator","name":"spare"}"#)
        .await;
    assert_eq!(second.status, 201, "{}", second.text());
    assert_eq!(
        operator
            .request("DELETE", &format!("/api/v1/keys/{own}"), "")
            .await
            .status,
        204
    );
    let spare = operator.as_key(second.json()["key"].as_str());
    assert_eq!(spare.get("/api/v1/endpoints").await.status, 200);
    let operator = spare;

    // A tenant with endpoints stays; without them it goes, and its keys with it.
    let in_use = operator.request("DELETE", "/api/v1/tenants/acme", "").await;
    assert_eq!(outcome(&in_use), (409, json!("tenant_in_use")));
    for name in ["private", "open"] {
        operator
            .request("DELETE", &format!("/t/acme/api/v1/endpoints/{name}"), "")
            .await;
    }
    assert_eq!(
        operator
            .request("DELETE", "/api/v1/tenants/acme", "")
            .await
            .status,
        204
    );
    assert_eq!(invoker.invoke("private", "", "").await.status, 401);
    let bad_name = operator
        .post_json("/api/v1/tenants", &json!({ "name": "Not Valid" }))
        .await;
    assert_eq!(bad_name.status, 422);
    assert_eq!(bad_name.json()["error"]["field"], "name");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tenants_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_in(dir.path()).await;
    t.client
        .post_json("/api/v1/tenants", &json!({ "name": "acme" }))
        .await;
    let token = t.client.make_key("acme", "admin").await;
    let first_operator = wasp_tests::operator_key(dir.path());
    t.stop().await;
    let t = TestServer::start_in(dir.path()).await;
    // No second operator key: the first still works.
    assert_eq!(wasp_tests::operator_key(dir.path()), first_operator);
    let acme = t.client.as_key(Some(&token));
    assert_eq!(acme.get("/api/v1/whoami").await.json()["tenant"], "acme");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processors_reach_only_the_host_their_tenant_was_granted() {
    let t = TestServer::start().await;
    let operator = &t.client;
    operator
        .post_json("/api/v1/tenants", &json!({ "name": "acme" }))
        .await;
    let acme = operator.as_key(Some(&operator.make_key("acme", "admin").await));
    let granted = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let with = |mount: &std::path::Path, host: &str| {
        spec(
            "reach",
            &format!(
                "[versions.processor.env]\nX = \"1\"\n[[versions.processor.mounts]]\nhost = {:?}\nguest = \"/data\"",
                mount.display().to_string()
            ),
        )
        .replace(
            "component = \"{COMPONENT}\"\n",
            &format!("component = \"{{COMPONENT}}\"\nallow_hosts = [\"{host}\"]\n"),
        )
    };
    let field = |r: &wasp_tests::Reply| r.json()["error"]["field"].as_str().map(str::to_owned);

    // Nothing granted yet: no mount, no address.
    let refused = acme
        .deploy(HOSTILE, &with(granted.path(), "127.0.0.1:9"))
        .await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert_eq!(
        field(&refused).as_deref(),
        Some("versions[0].processor.mounts[0].host")
    );
    assert!(
        refused.text().contains("granted none"),
        "{}",
        refused.text()
    );

    let grant = json!({
        "mount_roots": [granted.path()],
        "allow_hosts": ["127.0.0.1:9"],
    });
    let made = operator
        .request("PUT", "/api/v1/tenants/acme/policy", grant.to_string())
        .await;
    assert_eq!(made.status, 200, "{}", made.text());
    // A tenant admin cannot grant itself more.
    let own = acme
        .request("PUT", "/api/v1/tenants/acme/policy", grant.to_string())
        .await;
    assert_eq!(own.status, 403);

    acme.deploy_ok(HOSTILE, &with(granted.path(), "127.0.0.1:9"))
        .await;
    for (mount, host, at) in [
        (
            elsewhere.path(),
            "127.0.0.1:9",
            "versions[0].processor.mounts[0].host",
        ),
        (
            std::path::Path::new("/"),
            "127.0.0.1:9",
            "versions[0].processor.mounts[0].host",
        ),
        (
            &granted.path().join("../.."),
            "127.0.0.1:9",
            "versions[0].processor.mounts[0].host",
        ),
        (
            granted.path(),
            "127.0.0.1:10",
            "versions[0].processor.allow_hosts[0]",
        ),
        (
            granted.path(),
            "127.0.0.1:*",
            "versions[0].processor.allow_hosts[0]",
        ),
    ] {
        let refused = acme.deploy(HOSTILE, &with(mount, host)).await;
        assert_eq!(refused.status, 422, "{}", refused.text());
        assert_eq!(field(&refused).as_deref(), Some(at), "{}", refused.text());
    }
    // The refused deploys changed nothing: the granted one still serves.
    assert_eq!(acme.invoke("reach", "/ok", "").await.text(), "ok");
    // The default tenant has the server's grant (the tests' temporary directories), and
    // not `/` either.
    let root = operator
        .deploy(HOSTILE, &with(std::path::Path::new("/"), "127.0.0.1:9"))
        .await;
    assert_eq!(root.status, 422, "{}", root.text());
    let bad = operator
        .request(
            "PUT",
            "/api/v1/tenants/acme/policy",
            json!({ "allow_hosts": ["example.org:80"] }).to_string(),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(field(&bad).as_deref(), Some("allow_hosts[0]"));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_logins_are_each_tenants_own_and_never_answered() {
    let dir = tempfile::tempdir().unwrap();
    let t = TestServer::start_in(dir.path()).await;
    let operator = &t.client;
    for name in ["acme", "bravo"] {
        operator
            .post_json("/api/v1/tenants", &json!({ "name": name }))
            .await;
    }
    let acme = operator.as_key(Some(&operator.make_key("acme", "admin").await));
    let bravo = operator.as_key(Some(&operator.make_key("bravo", "admin").await));
    let invoker = operator.as_key(Some(&operator.make_key("acme", "invoker").await));
    let login = json!({ "username": "robot", "password": "s3cret-token" });

    let set = acme
        .request_with(
            "PUT",
            "/api/v1/registries/registry.example.com:5000",
            &[("content-type", "application/json")],
            login.to_string(),
        )
        .await;
    assert_eq!(set.status, 201, "{}", set.text());
    assert_eq!(set.json()["registry"], "registry.example.com:5000");
    assert!(!set.text().contains("s3cret"), "{}", set.text());
    let again = acme
        .request_with(
            "PUT",
            "/api/v1/registries/registry.example.com:5000",
            &[("content-type", "application/json")],
            json!({ "username": "robot2", "password": "newer" }).to_string(),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text());

    // Listed for its tenant, without the password; another tenant sees none of it.
    let listed = acme.get("/api/v1/registries").await;
    assert_eq!(listed.status, 200);
    assert_eq!(
        listed.json()["registries"][0]["username"],
        "robot2",
        "{}",
        listed.text()
    );
    assert!(!listed.text().contains("newer"));
    assert_eq!(
        bravo.get("/api/v1/registries").await.json()["registries"],
        json!([])
    );
    assert_eq!(
        outcome(
            &bravo
                .request("DELETE", "/api/v1/registries/registry.example.com:5000", "")
                .await
        ),
        (404, json!("registry_login_not_found"))
    );
    // An operator reaches a tenant's through its prefix.
    let through = operator.get("/t/acme/api/v1/registries").await.json();
    assert_eq!(through["registries"].as_array().unwrap().len(), 1);

    // Invokers may not; bad hosts and empty fields are named.
    assert_eq!(
        outcome(&invoker.get("/api/v1/registries").await),
        (403, json!("forbidden"))
    );
    for (host, body, field) in [
        ("not a host", login.clone(), "registry"),
        ("host:99999", login.clone(), "registry"),
        ("-bad.example", login.clone(), "registry"),
        (
            "ok.example",
            json!({ "username": "", "password": "p" }),
            "username",
        ),
        (
            "ok.example",
            json!({ "username": "u", "password": "a\nb" }),
            "password",
        ),
    ] {
        let reply = acme
            .request_with(
                "PUT",
                &format!("/api/v1/registries/{}", host.replace(' ', "%20")),
                &[("content-type", "application/json")],
                body.to_string(),
            )
            .await;
        assert_eq!(reply.status, 422, "{host}: {}", reply.text());
        assert_eq!(reply.json()["error"]["field"], field, "{}", reply.text());
    }
    let missing = acme
        .request_with(
            "PUT",
            "/api/v1/registries/ok.example",
            &[("content-type", "application/json")],
            r#"{"username":"u"}"#,
        )
        .await;
    assert_eq!(missing.status, 400, "{}", missing.text());

    // Kept across a restart; gone with its tenant.
    t.stop().await;
    let t = TestServer::start_in(dir.path()).await;
    let acme = t.client.as_key(acme.key());
    assert_eq!(
        acme.get("/api/v1/registries").await.json()["registries"][0]["registry"],
        "registry.example.com:5000"
    );
    assert_eq!(
        t.client
            .request("DELETE", "/api/v1/tenants/acme", "")
            .await
            .status,
        204
    );
    // A new tenant of the same name starts with none, now and after a restart.
    t.client
        .post_json("/api/v1/tenants", &json!({ "name": "acme" }))
        .await;
    let reborn = t
        .client
        .as_key(Some(&t.client.make_key("acme", "admin").await));
    assert_eq!(
        reborn.get("/api/v1/registries").await.json()["registries"],
        json!([])
    );
    t.stop().await;
    let t = TestServer::start_in(dir.path()).await;
    assert_eq!(
        t.client.get("/t/acme/api/v1/registries").await.json()["registries"],
        json!([])
    );
    t.stop().await;
}
