//! Operating actiongate: the command line (`-t`, `render`) and the shipped configurations.

mod support;

#[path = "operations/reload.rs"]
mod reload;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const ENV: &[(&str, &str)] = &[
    ("ACTIONGATE_SECRET", "s"),
    ("RESTART_SECRET", "s"),
    ("RESTARTER_TOKEN", "restart-token"),
    ("ENRICH_SECRET", "s"),
    ("ROLLBACK_SECRET", "s"),
    ("DEPLOY_TOKEN", "deploy-token"),
    ("STATUS_SECRET", "s"),
    ("HOOK_SECRET", "s"),
    ("STATUSPAGE_TOKEN", "page-token"),
    ("FLASHDUTY_APP_KEY", "fd-key"),
    ("PG_PASSWORD", "pg-password"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn actiongate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_actiongate"))
        .args(args)
        .current_dir(root())
        .envs(ENV.iter().copied())
        .output()
        .expect("run actiongate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn shipped_configs() -> Vec<PathBuf> {
    let mut configs = vec![root().join("conf/actiongate.yaml")];
    let mut examples: Vec<PathBuf> = std::fs::read_dir(root().join("conf/examples"))
        .expect("conf/examples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    configs.extend(examples);
    configs
}

/// Writes `yaml` to a config file in a new temporary directory and runs `-t` on it.
fn check_config(yaml: &str) -> (tempfile::TempDir, PathBuf, Output) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("actiongate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = actiongate(&["-c", path.to_str().unwrap(), "-t"]);
    (dir, path, out)
}

#[test]
fn every_shipped_config_passes_the_check() {
    let configs = shipped_configs();
    assert!(configs.len() >= 5, "the example and the four use cases");
    for path in configs {
        // Offline: the examples' spool.path (/var/lib/actiongate), or their database, is the
        // deploy host's.
        let out = actiongate(&["-c", path.to_str().unwrap(), "-t", "--offline"]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        let store = if text(&std::fs::read(&path).unwrap()).contains("  postgres:") {
            "spool.postgres"
        } else {
            "spool.path"
        };
        assert!(
            text(&out.stdout).ends_with(&format!(": ok; not checked (offline): {store}\n")),
            "{}",
            text(&out.stdout)
        );
        // Shipped examples read only paths Flashduty sends: no warnings either.
        assert_eq!(text(&out.stderr), "", "{}", path.display());
    }
}

#[test]
fn the_check_reports_every_problem_and_what_each_key_expects() {
    let (_dir, path, out) = check_config(
        r#"
listen: [{addr: "127.0.0.1:8443"}]
server: {threads: two}
sources: {office: ["10.0.0.0/33"]}
actions:
  - name: restart
    path: /restart
    allow: [office]
    tiemout: 5s
    upstreams:
      - name: a
        url: "http://10.0.0.5:8000/"
        timeout: 30
        method: FOO
        when:
          incident.title: {matches: "(unclosed"}
          incident.incident_severity: {equals: Critical}
"#,
    );
    assert_eq!(out.status.code(), Some(1));
    // Wrong types first (each key once, saying what it takes), then the meaning of the rest:
    // a wrong type no longer hides the bad CIDR further down.
    assert_eq!(
        text(&out.stderr),
        "server.threads: invalid type: string \"two\", expected a whole number\n\
         actions[0].tiemout: unknown field `tiemout`, expected one of `name`, `path`, `events`, `allow`, \
         `secret`, `upstreams`, `report`, `guard`\n\
         actions[0].upstreams[0].timeout: invalid type: integer `30`, expected a duration such \
         as 5s, 500ms or 1m30s\n\
         sources.office[0]: \"10.0.0.0/33\" is not a CIDR or IP address (try 10.20.0.0/16)\n\
         actions[0].upstreams[0].method: \"FOO\" is not one of POST, PUT, PATCH, GET, DELETE\n\
         actions[0].upstreams[0].when: incident.title: bad regex \"(unclosed\": unclosed group\n\
         actions[0].upstreams[0].when: incident.incident_severity: unknown condition \"equals\" \
         (use a value, a list of values, or one of exists, not, matches)\n"
    );

    // A list element that cannot be read (a required key misspelled) is stepped over with a
    // stand-in, so the actions after it are still checked.
    std::fs::write(
        &path,
        r#"
listen: [{addr: "127.0.0.1:1"}]
sources: {l: [127.0.0.0/8]}
fallback: {uri: "http://x"}
limits: {max_connections: lots, max_connections_per_source: 0}
actions:
  - nme: a
    path: /a
    allow: [l]
    upstreams: [{name: u, url: "http://127.0.0.1:1/"}]
  - name: b
    path: /b
    allow: [l, 7]
    secret: 5
    upstreams:
      - {name: u, url: "ftp://x/", timeout: 30}
"#,
    )
    .unwrap();
    let out = actiongate(&["-c", path.to_str().unwrap(), "-t", "--offline"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "fallback.uri: unknown field `uri`, expected `url`\n\
         fallback: missing field `url`\n\
         actions[0].nme: unknown field `nme`, expected one of `name`, `path`, `events`, `allow`, `secret`, \
         `upstreams`, `report`, `guard`\n\
         actions[0]: missing field `name`\n\
         actions[1].allow[1]: invalid type: integer `7`, expected a string\n\
         actions[1].secret: invalid type: integer `5`, expected a mapping of keys\n\
         actions[1].upstreams[0].timeout: invalid type: integer `30`, expected a duration such \
         as 5s, 500ms or 1m30s\n\
         limits.max_connections: invalid type: string \"lots\", expected a whole number\n\
         limits.max_connections_per_source: must be more than 0\n\
         actions[1].upstreams[0].url: scheme \"ftp\" not supported (use http or https)\n"
    );

    // A YAML syntax error names the file, not a placeholder.
    std::fs::write(&path, "actions: [a\n").unwrap();
    let out = actiongate(&["-c", path.to_str().unwrap(), "-t"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr,
        format!(
            "{}: not valid YAML: did not find expected ',' or ']' at line 2 column 1, while \
             parsing a flow sequence at line 1 column 10\n",
            path.display()
        )
    );
    // And says where: the line and column of a key indented one space too far.
    std::fs::write(
        &path,
        "listen: [{addr: \"127.0.0.1:8443\"}]\nactions:\n  - name: x\n    path: /x\n     upstreams: []\n",
    )
    .unwrap();
    let out = actiongate(&["-c", path.to_str().unwrap(), "-t"]);
    assert_eq!(
        text(&out.stderr),
        format!(
            "{}: not valid YAML: mapping values are not allowed in this context at line 5 column 15\n",
            path.display()
        )
    );
}

#[test]
fn paths_flashduty_never_sends_are_warned_about_with_the_closest_documented_one() {
    let (_dir, path, out) = check_config(
        r#"
listen: [{addr: "127.0.0.1:8443"}]
sources: {office: ["10.0.0.0/8"]}
actions:
  - name: restart
    path: /restart
    allow: [office]
    upstreams:
      - name: a
        url: "http://10.0.0.5:8000/?host={{incident.labels.resource}}"
        headers: {X-Who: "{{persn.email}}"}
        when: {incident.incident_severty: Critical}
        body: '{"service": "{{incident.lables.service}}", "deploy": "{{incident.fields.deploy_id}}"}'
        value_mapping: {incident.incident_severity: {Critical: P0}}
"#,
    );
    // Valid (custom fields and new Flashduty fields are real paths), but said.
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{}: ok\n", path.display()));
    assert_eq!(
        text(&out.stderr),
        "warning: actions[0].upstreams[0].headers.x-who: persn.email is not in Flashduty's \
         payloads; did you mean person.email?\n\
         warning: actions[0].upstreams[0].when: incident.incident_severty is not in Flashduty's \
         payloads; did you mean incident.incident_severity?\n\
         warning: actions[0].upstreams[0].body: incident.lables.service is not in Flashduty's \
         payloads; did you mean incident.labels.service?\n"
    );
    // render says the same, and names the reach of value_mapping.
    let payload = root().join("tests/fixtures/custom_action_full.json");
    let out = render(path.to_str().unwrap(), "restart", "a", &payload);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("did you mean incident.labels.service?"));
    assert!(
        text(&out.stdout)
            .starts_with("# when: does not match: incident.incident_severty is absent"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn the_check_can_run_offline_and_says_what_it_did_not_check() {
    let config = "conf/examples/rollback.yaml";
    // rollback.yaml reads ${ROLLBACK_SECRET}, ${DEPLOY_TOKEN} and ${FLASHDUTY_APP_KEY}; only
    // the key and the token may be set.
    let check = |flags: &[&str], deploy_token: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_actiongate"));
        command
            .args(["-c", config, "-t"])
            .args(flags)
            .current_dir(root())
            .env("FLASHDUTY_APP_KEY", "k")
            .env_remove("ROLLBACK_SECRET")
            .env_remove("DEPLOY_TOKEN");
        if let Some(token) = deploy_token {
            command.env("DEPLOY_TOKEN", token);
        }
        command.output().unwrap()
    };
    let out = check(&["--offline"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{config}: ok; not checked (offline): spool.path, ${{DEPLOY_TOKEN}}, \
             ${{ROLLBACK_SECRET}}\n"
        )
    );
    // Offline with part of the environment set.
    assert!(check(&["--offline"], Some("t")).status.success());
    // Without the flag, a missing secret is still a problem.
    let out = check(&[], Some("t"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "actions[0].secret.value: environment variable ROLLBACK_SECRET is not set\n"
    );
}

#[test]
fn every_upstream_of_every_shipped_config_renders_for_some_shipped_fixture() {
    let fixtures: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    let env = |name: &str| {
        ENV.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    let mut rendered = 0;
    for path in shipped_configs() {
        let config = actiongate::config::Config::load_with(&path, &env).unwrap();
        for action in &config.actions {
            for upstream in &action.upstreams {
                let full = fixtures.iter().find(|fixture| {
                    let out = render(
                        path.to_str().unwrap(),
                        &action.name,
                        &upstream.name,
                        fixture,
                    );
                    let stdout = text(&out.stdout);
                    out.status.success()
                        && !stdout.starts_with("# when: does not match")
                        && !stdout.starts_with("# events:")
                });
                assert!(
                    full.is_some(),
                    "{}: {}/{}: no fixture in tests/fixtures passes its when rule",
                    path.display(),
                    action.name,
                    upstream.name
                );
                rendered += 1;
            }
        }
    }
    assert!(rendered >= 5, "{rendered}");
}

#[test]
fn the_check_prints_one_line_per_problem_with_its_key_path() {
    let (_dir, _, out) = check_config(
        r#"
listen: [{addr: "127.0.0.1:8443"}]
limits: {read_timeout: "5 sec"}
actions:
  - name: restart
    path: /restart
    allow: [flashduty, ofice]
    upstreams:
      - {name: a, url: "http://10.0.0.5:8000/"}
      - {name: b, url: "/relative"}
"#,
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "limits.read_timeout: \"5 sec\" is not a duration (try 250ms, 5s, 10m, 24h)\n\
         actions[0].allow[1]: unknown source \"ofice\" (known: flashduty; or write a CIDR)\n\
         actions[0].upstreams[1].url: relative URL not allowed\n"
    );
}

#[test]
fn the_check_names_unknown_keys_and_missing_variables() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "listen: [{addr: \"127.0.0.1:1\"}]\nactions: []\ntrusted_proxy: []\n",
    )
    .unwrap();
    let out = actiongate(&["-c", typo.to_str().unwrap(), "-t"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("trusted_proxy: unknown field `trusted_proxy`"),
        "{}",
        text(&out.stderr)
    );

    let missing = dir.path().join("missing.yaml");
    std::fs::write(
        &missing,
        "listen: [{addr: \"${NO_SUCH_VARIABLE}\"}]\nactions: []\n",
    )
    .unwrap();
    let out = actiongate(&["-c", missing.to_str().unwrap(), "-t"]);
    assert_eq!(
        text(&out.stderr),
        "listen[0].addr: environment variable NO_SUCH_VARIABLE is not set\n"
    );

    let out = actiongate(&["-c", "/nonexistent/actiongate.yaml", "-t"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("/nonexistent/actiongate.yaml: cannot read"));
}

fn render(config: &str, action: &str, upstream: &str, payload: &Path) -> Output {
    actiongate(&[
        "render",
        "-c",
        config,
        "--action",
        action,
        "--upstream",
        upstream,
        payload.to_str().unwrap(),
    ])
}

#[test]
fn render_prints_exactly_what_the_upstream_receives() {
    let payload = root().join("tests/fixtures/custom_action_full.json");
    let out = render(
        "conf/examples/status-page.yaml",
        "status-page",
        "statuspage",
        &payload,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "note: value_mapping applies to values substituted into the URL, header and body \
         templates; a body passed through as received, and when rules, see the original values\n"
    );
    assert_eq!(
        text(&out.stdout),
        "POST https://status.internal/api/v1/incidents\n\
         authorization: OAuth page-token\n\
         content-type: application/json\n\
         x-actiongate-event-id: 3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a\n\
         x-actiongate-action: status-page\n\
         x-actiongate-attempt: 1\n\
         idempotency-key: 3f9c2b7a51e04d8c9a6b0e1f2d3c4b5a:statuspage\n\
         \n\
         {\"incident\":{\"name\":\"sh-prod / web-03 - memory usage above 95%\",\"status\":\"investigating\",\
         \"impact\":\"major\",\"component\":\"checkout\",\
         \"body\":\"We are investigating degraded checkout (AB77C1).\"}}\n"
    );
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart-host",
        "restarter",
        &payload,
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("POST http://10.0.0.5:8000/restart?host=web-03\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nx-incident: AB77C1\n"), "{stdout}");
}

#[test]
fn render_says_when_an_upstream_would_skip_the_event() {
    let manual = root().join("tests/fixtures/custom_action_manual.json");
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart-host",
        "restarter",
        &manual,
    );
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout),
        "# when: does not match: incident.labels.resource is absent, and the rule wants it \
         present; restarter would skip this event\n"
    );
}

#[test]
fn render_refuses_what_the_gateway_would_refuse() {
    let bad = root().join("tests/fixtures/invalid/event_type_not_flashduty.json");
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart-host",
        "restarter",
        &bad,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).ends_with(
            "the gateway would refuse this payload: event_type: expected a Flashduty event type \
             (i_… for an incident, a_… for an alert), got \"incident.created\"\n"
        ),
        "{}",
        text(&out.stderr)
    );
    // A type the action does not take is no refusal: it is answered 200 and goes nowhere.
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart-host",
        "restarter",
        &root().join("tests/fixtures/incident_new.json"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "# events: restart-host does not take i_new (events: [i_custom]); the gateway would \
         answer 200 ignored and deliver nothing\n"
    );
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart",
        "restarter",
        &bad,
    );
    assert_eq!(
        text(&out.stderr),
        "no action \"restart\" (actions: restart-host)\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_at_the_edge_accepts_an_event_over_https() {
    use support::gateway::Gateway;
    use support::tls::TestCa;
    use support::upstream::Upstream;

    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    let (ca_path, cert, key) = ca.write(certs.path());
    let upstream = Upstream::ok().await;
    let yaml = format!(
        "sources: {{local: [\"127.0.0.1/32\"]}}\nactions:\n  - {{name: act, path: /act, allow: [local], upstreams: [{{name: up, url: \"{}\"}}]}}\n",
        upstream.url("/")
    );
    let listener = support::tls::listener(&cert, &key);
    let gateway = Gateway::start_with_listener(&yaml, &[], &listener).await;

    let ca_cert = reqwest::Certificate::from_pem(&std::fs::read(&ca_path).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca_cert)
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/act", gateway.addr.port());
    let response = client
        .post(&url)
        .header("Content-Type", "application/json")
        .body(support::event_with_id("tls-edge-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": "accepted", "event_id": "tls-edge-1"})
    );
    let got = upstream
        .wait_for(1, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(got[0].header("x-actiongate-event-id"), Some("tls-edge-1"));

    // Plain HTTP on the TLS port is not an answer.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(plain
        .post(format!("http://127.0.0.1:{}/act", gateway.addr.port()))
        .send()
        .await
        .is_err());
}

#[path = "../examples/embed.rs"]
mod embed;

/// A shutdown trigger that never fires: the embedded server lives as long as the test process.
struct Never;

#[async_trait::async_trait]
impl pingora_core::server::ShutdownSignalWatch for Never {
    async fn recv(&self) -> pingora_core::server::ShutdownSignal {
        std::future::pending().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_embedded_in_a_users_proxy_answers_actions_and_passes_the_rest() {
    use support::client::{self, Request};
    use support::upstream::{Reply, Upstream};

    let backend =
        Upstream::start(|_, r| Reply::Full(200, vec![], format!("backend: {}", r.path))).await;
    let upstream = Upstream::ok().await;
    let spool = tempfile::tempdir().unwrap();
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .unwrap();
    let admin = support::free_port();
    let yaml = format!(
        "listen: [{{addr: \"{listen}\"}}]\nadmin: {{addr: \"127.0.0.1:{admin}\"}}\nspool: {{path: \"{}\"}}\n\
         sources: {{local: [\"127.0.0.1/32\"]}}\n\
         actions:\n  - {{name: act, path: /act, allow: [local], upstreams: [{{name: up, url: \"{}\"}}]}}\n",
        spool.path().display(),
        upstream.url("/")
    );
    let config = actiongate::Config::from_yaml(&yaml, &|_| None).unwrap();
    let (server, _gate) = embed::build(config, backend.addr).unwrap();
    std::thread::spawn(move || {
        server.run(pingora_core::server::RunArgs {
            shutdown_signal: Box::new(Never),
        })
    });
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    support::eventually_async(std::time::Duration::from_secs(20), || async move {
        (support::gateway::readyz(admin).await == Some(200)).then_some(())
    })
    .await;

    let action = Request::post_json("/act", &support::event_with_id("embed-1"))
        .send(listen)
        .await;
    assert_eq!(action.status, 200);
    assert_eq!(
        action.json(),
        serde_json::json!({"status": "accepted", "event_id": "embed-1"})
    );
    let delivered = upstream
        .wait_for(1, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(delivered[0].header("idempotency-key"), Some("embed-1:up"));

    let other = client::get(listen, "/status?page=2").await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body, b"backend: /status?page=2");
    assert!(
        backend.received().iter().all(|r| r.path != "/act"),
        "actions never reach the user's backend"
    );
}

/// Every `actiongate_*` metric named in `exprs`, with histogram suffixes folded into their family.
fn metric_families_used(exprs: &[String]) -> std::collections::BTreeSet<String> {
    let name = regex::Regex::new(r"actiongate_[a-z_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| {
            name.find_iter(e)
                .map(|m| m.as_str().to_string())
                .collect::<Vec<_>>()
        })
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| n.strip_suffix(suffix).map(str::to_string))
                .unwrap_or(n)
        })
        .collect()
}

fn exprs_in_json(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs_in_json(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs_in_json(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_query_only_metrics_the_binary_exports() {
    let upstream = support::upstream::Upstream::ok().await;
    let yaml = format!(
        "actions:\n  - {{name: act, path: /act, secret: {{header: X-S, value: s}}, upstreams: [{{name: up, url: \"{}\"}}]}}\n",
        upstream.url("/")
    );
    let gateway = support::gateway::Gateway::start(&yaml).await;
    let exported: std::collections::BTreeSet<String> = gateway
        .metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();

    let dashboard: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("conf/grafana/actiongate-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    exprs_in_json(&dashboard, &mut exprs);
    assert!(exprs.len() >= 12, "the dashboard has its panels");
    let used = metric_families_used(&exprs);
    for family in &used {
        assert!(
            exported.contains(family),
            "dashboard queries {family}, which /metrics does not export"
        );
    }
    for needed in [
        "actiongate_requests_total",
        "actiongate_ack_duration_seconds",
        "actiongate_deliveries_total",
        "actiongate_delivery_lag_seconds",
        "actiongate_pending_deliveries",
        "actiongate_dead_letters",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }

    let rules: serde_norway::Value = serde_norway::from_slice(
        &std::fs::read(root().join("conf/prometheus/actiongate-alerts.yaml")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    let mut names = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            names.push(rule["alert"].as_str().expect("alert name").to_string());
            exprs.push(rule["expr"].as_str().expect("expr").to_string());
            assert!(rule["labels"]["severity"].as_str().is_some(), "{rule:?}");
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{rule:?}"
            );
        }
    }
    for family in metric_families_used(&exprs) {
        assert!(
            exported.contains(&family),
            "an alert queries {family}, which /metrics does not export"
        );
    }
    for alert in [
        "ActiongateNotScraped",
        "ActiongateDeadLettersRising",
        "ActiongatePendingBacklogGrowing",
        "ActiongateAckP99NearDeadline",
        "ActiongateForbiddenSourceSpike",
        "ActiongateRightSecretFromUnknownAddress",
    ] {
        assert!(names.iter().any(|n| n == alert), "missing alert {alert}");
    }
}

async fn logging_gateway(format: &str) -> (support::gateway::Gateway, support::upstream::Upstream) {
    let upstream = support::upstream::Upstream::ok().await;
    let yaml = format!(
        "log: {{format: {format}}}\nsources: {{local: [\"127.0.0.1/32\"]}}\nactions:\n  - {{name: act, path: /act, allow: [local], \
         secret: {{header: X-Secret, value: \"${{LOG_TEST_SECRET}}\"}}, \
         upstreams: [{{name: up, url: \"{}\", headers: {{Authorization: \"Bearer ${{LOG_TEST_TOKEN}}\"}}}}]}}\n",
        upstream.url("/")
    );
    let env = [
        ("LOG_TEST_SECRET", "s3cret-never-logged"),
        ("LOG_TEST_TOKEN", "token-never-logged"),
    ];
    let gateway = support::gateway::Gateway::start_with_env(&yaml, &env).await;
    let post = |id: &str, secret: &str| {
        support::client::Request::post_json("/act", &support::event_with_id(id))
            .header("X-Secret", secret)
    };
    assert_eq!(
        post("log-1", "s3cret-never-logged")
            .send(gateway.addr)
            .await
            .status,
        200
    );
    assert_eq!(
        post("log-2", "s3cret-never-loggeX")
            .send(gateway.addr)
            .await
            .status,
        401
    );
    upstream
        .wait_for(1, std::time::Duration::from_secs(20))
        .await;
    gateway
        .wait_metric(
            "actiongate_deliveries_total{action=\"act\",outcome=\"delivered\",upstream=\"up\"}",
            1.0,
        )
        .await;
    // A request's line is written after its answer (ack_ms includes the write): wait for both.
    support::eventually(
        "both request log lines",
        std::time::Duration::from_secs(10),
        || {
            let logs = gateway.logs();
            let lines = logs
                .lines()
                .filter(|l| l.contains("actiongate::request"))
                .count();
            (lines >= 2).then_some(())
        },
    )
    .await;
    (gateway, upstream)
}

fn assert_no_secrets_or_payload(logs: &str) {
    for forbidden in [
        "s3cret-never-logged",
        "s3cret-never-loggeX",
        "token-never-logged",
        "li.wei@example.com",
        "memory usage above",
    ] {
        assert!(
            !logs.contains(forbidden),
            "{forbidden:?} appears in the logs:\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_parseable_line_per_request_and_attempt_and_no_secrets() {
    let (gateway, _upstream) = logging_gateway("json").await;
    let logs = gateway.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "actiongate::request")
        .collect();
    assert_eq!(requests.len(), 2, "{logs}");
    let accepted = requests
        .iter()
        .find(|l| l["outcome"] == "accepted")
        .expect("accepted line");
    assert_eq!(accepted["action"], "act");
    assert_eq!(accepted["client"], "127.0.0.1");
    assert_eq!(accepted["status"], 200);
    assert_eq!(accepted["event_id"], "log-1");
    assert!(accepted["ack_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    let refused = requests
        .iter()
        .find(|l| l["outcome"] == "unauthorized")
        .expect("401 line");
    assert_eq!(refused["status"], 401);
    assert_eq!(refused["reason"], "header x-secret is missing or wrong");
    let attempt = lines
        .iter()
        .find(|l| l["target"] == "actiongate::delivery")
        .expect("attempt line");
    assert_eq!(attempt["upstream"], "up");
    assert_eq!(attempt["event_id"], "log-1");
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["status"], 200);
    assert_eq!(attempt["decision"], "delivered");
    assert!(attempt["duration_ms"].as_f64().is_some());
    assert_no_secrets_or_payload(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logfmt_logs_are_key_value_lines_without_secrets() {
    let (gateway, _upstream) = logging_gateway("logfmt").await;
    let logs = gateway.logs();
    let request = logs
        .lines()
        .find(|l| l.contains("target=actiongate::request") && l.contains("outcome=accepted"))
        .unwrap_or_else(|| panic!("no request line:\n{logs}"));
    for field in [
        " level=info ",
        " msg=request ",
        " action=act ",
        " client=127.0.0.1 ",
        " status=200 ",
        " event_id=log-1 ",
    ] {
        assert!(request.contains(field), "{field:?} missing in {request}");
    }
    assert!(logs.lines().all(|l| l.starts_with("ts=")), "{logs}");
    assert_no_secrets_or_payload(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_writes_one_line_per_source_and_reason_while_events_keep_theirs() {
    let upstream = support::upstream::Upstream::ok().await;
    let yaml = format!(
        "log: {{format: json}}\nsources: {{local: [\"127.0.0.1/32\"]}}\nactions:\n  - {{name: act, path: /act, allow: [local], \
         secret: {{header: X-Secret, value: \"${{FLOOD_SECRET}}\"}}, upstreams: [{{name: up, url: \"{}\"}}]}}\n  \
         - {{name: other, path: /other, allow: [\"127.0.0.3/32\"], upstreams: [{{name: up, url: \"{}\"}}]}}\n",
        upstream.url("/"),
        upstream.url("/")
    );
    let gateway =
        support::gateway::Gateway::start_with_env(&yaml, &[("FLOOD_SECRET", "flood-secret")]).await;
    let refused_from = |ip: &str| Some(ip.parse::<std::net::IpAddr>().unwrap());
    let post = |id: &str, secret: &str| {
        support::client::Request::post_json("/act", &support::event_with_id(id))
            .header("X-Secret", secret)
    };
    let flood = 300;
    for i in 0..flood {
        let from_elsewhere = post(&format!("f{i}"), "wrong")
            .send_from(gateway.addr, refused_from("127.0.0.3"))
            .await;
        assert_eq!(from_elsewhere.status, 403);
        let wrong_secret = post(&format!("w{i}"), "wrong").send(gateway.addr).await;
        assert_eq!(wrong_secret.status, 401);
    }
    for i in 0..3 {
        let ok = post(&format!("ok{i}"), "flood-secret")
            .send(gateway.addr)
            .await;
        assert_eq!(ok.status, 200);
    }
    // The counters count every refusal.
    gateway
        .wait_metric(
            "actiongate_requests_total{action=\"act\",outcome=\"forbidden_source\"}",
            flood as f64,
        )
        .await;
    gateway
        .wait_metric(
            "actiongate_requests_total{action=\"act\",outcome=\"unauthorized\"}",
            flood as f64,
        )
        .await;
    // Each accepted event keeps its line; each (source, reason) has one line in 10 s.
    let lines = support::eventually(
        "three accepted lines",
        std::time::Duration::from_secs(10),
        || {
            let logs = gateway.logs();
            let lines: Vec<serde_json::Value> = logs
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .filter(|l: &serde_json::Value| l["target"] == "actiongate::request")
                .collect();
            (lines.iter().filter(|l| l["outcome"] == "accepted").count() == 3).then_some(lines)
        },
    )
    .await;
    let count = |outcome: &str, client: &str| {
        lines
            .iter()
            .filter(|l| l["outcome"] == outcome && l["client"] == client)
            .count()
    };
    assert_eq!(count("forbidden_source", "127.0.0.3"), 1, "{lines:#?}");
    assert_eq!(count("unauthorized", "127.0.0.1"), 1, "{lines:#?}");
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let bytes = gateway.logs().len();
    assert!(
        bytes < 8 * 1024,
        "{bytes} bytes of log for {} refusals",
        2 * flood
    );
}

/// The shipped embedding example stops within its grace period on SIGTERM, not after
/// Pingora's default five minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embed_example_exits_within_its_grace_period_on_sigterm() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_actiongate"))
        .with_file_name("examples")
        .join("embed");
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("127.0.0.1:{}", support::free_port());
    let config = dir.path().join("embed.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [{{addr: \"127.0.0.1:{}\"}}]\nadmin: {{addr: \"{admin}\"}}\n\
             spool: {{path: \"{}\"}}\nserver: {{grace_period: 2s}}\n\
             actions: [{{name: a, path: /a, allow: [127.0.0.1/32], \
             upstreams: [{{name: u, url: \"http://127.0.0.1:1/\"}}]}}]\n",
            support::free_port(),
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(&exe)
        .args([config.to_str().unwrap(), "127.0.0.1:1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
    support::eventually_async(Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&admin).await.ok()
    })
    .await;
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    // Grace period (2 s) plus Pingora's 1 s runtime shutdown, with room for a slow machine;
    // Pingora's defaults would take 300 s.
    let status = support::eventually("embed to exit", Duration::from_secs(15), || {
        child.try_wait().ok().flatten()
    })
    .await;
    assert!(status.success(), "{status}");
}

#[test]
fn the_check_tries_the_spool_directory_as_the_gateway_would() {
    let config = |spool: &str| {
        format!(
            "listen: [{{addr: \"127.0.0.1:1\"}}]\nspool: {{path: \"{spool}\"}}\n\
             sources: {{l: [127.0.0.0/8]}}\nactions: [{{name: a, path: /a, allow: [l], \
             upstreams: [{{name: u, url: \"http://127.0.0.1:1/\"}}]}}]\n"
        )
    };
    // Not creatable even by root: refused, naming why.
    let (_dir, _, out) = check_config(&config("/proc/actiongate-spool"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("spool.path: /proc/actiongate-spool: cannot be created:"),
        "{}",
        text(&out.stderr)
    );
    // A file where the directory should be.
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let (_dir, _, out) = check_config(&config(file.to_str().unwrap()));
    assert_eq!(
        text(&out.stderr),
        format!(
            "spool.path: {}: exists and is not a directory\n",
            file.display()
        )
    );
    // Creatable: ok, and nothing is left behind (neither the directory nor a probe).
    let fresh = scratch.path().join("a/b/spool");
    let (_dir, _, out) = check_config(&config(fresh.to_str().unwrap()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!scratch.path().join("a").exists());
    // An existing spool: ok, and its probe (a random name, created new, never through a
    // symlink) is gone.
    let spool = scratch.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let (_dir, _, out) = check_config(&config(spool.to_str().unwrap()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
}

#[test]
fn render_shows_the_comment_each_outcome_would_post() {
    let payload = root().join("tests/fixtures/custom_action_full.json");
    let report = |outcome: &str| {
        actiongate(&[
            "render",
            "-c",
            "conf/examples/restart-host.yaml",
            "--action",
            "restart-host",
            "--upstream",
            "restarter",
            "--outcome",
            outcome,
            payload.to_str().unwrap(),
        ])
    };
    let out = report("dead_lettered");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "POST https://api.flashcat.cloud/incident/comment?app_key=<flashduty.app_key>\n\
         content-type: application/json\n\
         \n\
         {\"incident_ids\":[\"692701aa3c5e8f0012ab77c1\"],\"comment\":\"actiongate: \
         restart-host FAILED at restarter after 3 attempts, 10m0s after the push (HTTP 503: \
         Service Unavailable (after 3 attempts)); it is kept as a dead letter in actiongate, \
         from where an operator can replay it\",\"mute_reply\":true}\n"
    );
    assert!(
        text(&out.stderr).starts_with("note: example facts: attempts 3, status 503, lag 10m0s"),
        "{}",
        text(&out.stderr)
    );
    // The key is never printed, not even by render.
    assert!(!text(&out.stdout).contains("fd-key"));
    let out = report("guarded");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "\"comment\":\"actiongate: restart-host was not run: restart-host already ran for \
             this incident; it may run for it again in 10m0s (at "
        ),
        "{stdout}"
    );
    // The rollback example reports no guard refusals, and says so.
    let out = actiongate(&[
        "render",
        "-c",
        "conf/examples/rollback.yaml",
        "--action",
        "rollback",
        "--upstream",
        "deploy-api",
        "--outcome",
        "guarded",
        payload.to_str().unwrap(),
    ]);
    assert_eq!(
        text(&out.stdout),
        "# report.on does not list guarded: nothing would be posted\n"
    );
    let out = report("exploded");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "--outcome \"exploded\": use delivered, dead_lettered or guarded\n"
    );
}

#[test]
fn the_check_explains_report_and_guard_mistakes() {
    let action = "actions:\n  - name: act\n    path: /act\n";
    let upstream = "    upstreams: [{name: u, url: \"http://10.0.0.5/\"}]\n";
    let cases: &[(&str, &str)] = &[
        (
            "    report: {}\n",
            "actions[0].report: needs the flashduty section (flashduty: {app_key: \
             \"${FLASHDUTY_APP_KEY}\"})\n",
        ),
        (
            "    report: {on: [delivered, exploded], comment: \"{{actiongate.outcom}}\"}\n",
            "actions[0].report.on[1]: \"exploded\" is not an outcome (delivered, dead_lettered, \
             guarded)\nactions[0].report.comment: actiongate.outcom is not a value of actiongate \
             (known: actiongate.action, actiongate.upstream, actiongate.outcome, \
             actiongate.attempts, actiongate.status, actiongate.error, actiongate.response, \
             actiongate.lag)\n",
        ),
        (
            "    report: {on: []}\n",
            "actions[0].report.on: lists no outcome (delivered, dead_lettered, guarded); remove \
             report to report nothing\n",
        ),
        (
            "    guard: {once_per_incident: 0s, max_per_hour: 0}\n",
            "actions[0].guard.once_per_incident: must be more than 0\n\
             actions[0].guard.max_per_hour: must be at least 1 (to stop the action, remove it)\n",
        ),
    ];
    for (with_flashduty, (extra, expected)) in cases.iter().enumerate() {
        let flashduty = if with_flashduty > 0 {
            "flashduty: {app_key: k, rate: 51}\n"
        } else {
            ""
        };
        let yaml =
            format!("listen: [{{addr: \"127.0.0.1:1\"}}]\n{flashduty}{action}{extra}{upstream}");
        let (_dir, _, out) = check_config(&yaml);
        assert_eq!(out.status.code(), Some(1), "{yaml}");
        let rate = if with_flashduty > 0 {
            "flashduty.rate: must be 1 to 50 (Flashduty allows 50 calls a second)\n"
        } else {
            ""
        };
        assert_eq!(text(&out.stderr), format!("{rate}{expected}"), "{yaml}");
    }
    // An upstream named flashduty would share the reports' series and dead letters.
    let yaml = format!(
        "listen: [{{addr: \"127.0.0.1:1\"}}]\nflashduty: {{app_key: k}}\n{action}    report: {{}}\n    upstreams: [{{name: flashduty, url: \"http://10.0.0.5/\"}}]\n"
    );
    let (_dir, _, out) = check_config(&yaml);
    assert_eq!(
        text(&out.stderr),
        "actions[0].report: reports are delivered as upstream \"flashduty\": rename the \
         upstream of that name\n"
    );
    // Reporting refusals without a guard is allowed, and warned about.
    let yaml = format!(
        "listen: [{{addr: \"127.0.0.1:1\"}}]\nflashduty: {{app_key: k}}\n{action}    report: {{on: [guarded], comment: \"{{{{incident.titel}}}}\"}}\n{upstream}"
    );
    let (_dir, _, out) = check_config(&yaml);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "warning: actions[0].report.on: guarded is reported, but the action has no guard\n\
         warning: actions[0].report.comment: incident.titel is not in Flashduty's payloads; \
         did you mean incident.title?\n"
    );
}
