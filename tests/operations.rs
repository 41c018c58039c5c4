//! Operating actiongate: the command line (`-t`, `render`) and the shipped configurations.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ENV: &[(&str, &str)] = &[
    ("ACTIONGATE_SECRET", "s"),
    ("RESTART_SECRET", "s"),
    ("RESTARTER_TOKEN", "restart-token"),
    ("ENRICH_SECRET", "s"),
    ("ROLLBACK_SECRET", "s"),
    ("DEPLOY_TOKEN", "deploy-token"),
    ("STATUS_SECRET", "s"),
    ("STATUSPAGE_TOKEN", "page-token"),
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

#[test]
fn every_shipped_config_passes_the_check() {
    let configs = shipped_configs();
    assert!(configs.len() >= 5, "the example and the four use cases");
    for path in configs {
        let out = actiongate(&["-c", path.to_str().unwrap(), "-t"]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).ends_with(": ok\n"));
    }
}

#[test]
fn the_check_prints_one_line_per_problem_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
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
    )
    .unwrap();
    let out = actiongate(&["-c", path.to_str().unwrap(), "-t"]);
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
        "# when: does not match; restarter would skip this event\n"
    );
}

#[test]
fn render_refuses_what_the_gateway_would_refuse() {
    let bad = root().join("tests/fixtures/invalid/wrong_event_type.json");
    let out = render(
        "conf/examples/restart-host.yaml",
        "restart-host",
        "restarter",
        &bad,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).ends_with(
            "the gateway would refuse this payload: event_type: expected \"i_custom\" (a custom action), got \"i_new\"\n"
        ),
        "{}",
        text(&out.stderr)
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
