use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "RESTART_SECRET" => Some("s3cr3t".into()),
        "TOKEN" => Some("tok".into()),
        _ => None,
    }
}

const MINIMAL: &str = r#"
listen: [{addr: "127.0.0.1:18443"}]
actions:
  - name: restart-host
    path: /actions/restart-host
    upstreams:
      - name: restarter
        url: "http://127.0.0.1:8000/restart"
"#;

fn load(text: &str) -> Result<Config, Vec<String>> {
    Config::from_yaml(text, &env).map_err(|e| e.0)
}

fn problems(text: &str) -> Vec<String> {
    load(text).unwrap_err()
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.server.grace_period, Duration::from_secs(5));
    assert_eq!(c.admin, "127.0.0.1:9091".parse().unwrap());
    assert_eq!(c.spool_path, PathBuf::from("./data"));
    assert_eq!(c.limits.max_body, 1 << 20);
    assert_eq!(c.limits.read_timeout, Duration::from_secs(5));
    assert_eq!(c.dedup_window, Duration::from_secs(86_400));
    assert!(c.trusted_proxies.is_empty());
    assert!(c.fallback.is_none());
    assert_eq!(c.schema_drift, DriftPolicy::Accept);
    let a = &c.actions[0];
    // The default allowlist is Flashduty's SaaS addresses.
    assert!(a.allow.contains("47.94.95.118".parse().unwrap()));
    assert!(!a.allow.contains("127.0.0.1".parse().unwrap()));
    let u = &a.upstreams[0];
    assert_eq!(u.method, Method::POST);
    assert_eq!(u.timeout, Duration::from_secs(10));
    assert_eq!(u.retry, RetryPolicy::default());
    assert_eq!(u.concurrency, 32);
    assert!(u.tls_verify);
}

#[test]
fn the_design_example_is_valid() {
    let text = r#"
server: {threads: 2, grace_period: 5s}
listen:
  - addr: "0.0.0.0:8443"
admin: {addr: "127.0.0.1:9091"}
spool: {path: "./data"}
limits: {max_body: 1MiB, read_timeout: 5s}
dedup_window: 24h
sources:
  office: ["10.20.0.0/16"]
trusted_proxies: []
actions:
  - name: restart-host
    path: /actions/restart-host
    allow: [flashduty, office, "192.0.2.7"]
    secret:
      header: X-Actiongate-Secret
      value: "${RESTART_SECRET}"
    upstreams:
      - name: restarter
        url: "http://10.0.0.5:8000/restart?src=flashduty"
        method: POST
        headers: { Authorization: "Bearer ${TOKEN}" }
        timeout: 10s
        retry: { attempts: 8, backoff: 1s, max_backoff: 5m }
        concurrency: 32
        when:
          incident.labels.service: checkout
          incident.incident_severity: [Critical, Warning]
        body: |
          {"host": "{{incident.labels.resource}}", "by": "{{person.email}}", "labels": "{{incident.labels}}"}
        value_mapping:
          incident.incident_severity: { Critical: P0, Warning: P1 }
"#;
    let c = load(text).unwrap();
    let a = &c.actions[0];
    assert_eq!(a.secret.as_ref().unwrap().value, b"s3cr3t");
    assert!(a.allow.contains("10.20.1.1".parse().unwrap()));
    assert!(a.allow.contains("192.0.2.7".parse().unwrap()));
    let HeaderSource::Static(auth) = &a.upstreams[0].headers[0].1 else {
        panic!("a header without placeholders is static")
    };
    assert_eq!(auth, "Bearer tok");
    assert_eq!(a.upstreams[0].retry.max_backoff, Duration::from_secs(300));
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let text = MINIMAL.replace("url:", "timeout: 5s\n        retries: 3\n        url:");
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("actions[0].upstreams[0].retries: unknown field `retries`, expected one of `name`, `url`"), "{p:?}");
}

#[test]
fn every_semantic_problem_is_reported_with_its_key_path() {
    let text = r#"
server: {grace_period: "5 sec"}
listen: [{addr: "nowhere"}]
limits: {max_body: "lots"}
trusted_proxies: ["10.0.0.0/33"]
actions:
  - name: Restart Host
    path: actions/restart
    allow: [flashduty, ofice]
    upstreams:
      - name: a
        url: "/relative"
        timeout: 0s
        retry: {attempts: 0}
      - name: a
        url: "ftp://x/"
        when: {incident.title: {matches: "("}}
        body: '{"x": "{{incident..title}}"}'
"#;
    let p = problems(text);
    let expect = [
        "server.grace_period: \"5 sec\" is not a duration (try 250ms, 5s, 10m, 24h)",
        "listen[0].addr: \"nowhere\" is not an address",
        "limits.max_body: \"lots\" is not a size",
        "trusted_proxies[0]: \"10.0.0.0/33\" is not a CIDR",
        "actions[0].name: \"Restart Host\" may use only a-z, 0-9, - and _",
        "actions[0].path: \"actions/restart\" must be an absolute path",
        "actions[0].allow[1]: unknown source \"ofice\" (known: flashduty; or write a CIDR)",
        "actions[0].upstreams[0].url: relative URL not allowed",
        "actions[0].upstreams[0].timeout: must be more than 0",
        "actions[0].upstreams[0].retry.attempts: must be at least 1",
        "actions[0].upstreams[1].name: \"a\" is used twice in this action",
        "actions[0].upstreams[1].url: scheme \"ftp\" not supported",
        "actions[0].upstreams[1].when: incident.title: bad regex",
        "actions[0].upstreams[1].body: line 1 column 8: \"incident..title\" is not a field path",
    ];
    for e in expect {
        assert!(
            p.iter().any(|line| line.starts_with(e)),
            "missing {e:?} in {p:#?}"
        );
    }
    assert_eq!(p.len(), expect.len(), "{p:#?}");
}

#[test]
fn missing_environment_variables_are_named() {
    let text = MINIMAL.replace(
        "http://127.0.0.1:8000/restart",
        "http://${UPSTREAM_HOST}/restart",
    );
    assert_eq!(
        problems(&text),
        vec!["actions[0].upstreams[0].url: environment variable UPSTREAM_HOST is not set"]
    );
}

#[test]
fn duplicate_names_and_paths_are_refused() {
    let text = format!(
        "{MINIMAL}{}",
        r#"
  - name: restart-host
    path: /actions/restart-host
    upstreams: [{name: x, url: "http://127.0.0.1:1/"}]
"#
    );
    let p = problems(&text);
    assert!(
        p.contains(&"actions[1].name: \"restart-host\" is used twice".to_string()),
        "{p:?}"
    );
    assert!(
        p.contains(&"actions[1].path: \"/actions/restart-host\" is used twice".to_string()),
        "{p:?}"
    );
}

#[test]
fn the_flashduty_source_can_be_redefined() {
    let text = format!("sources: {{flashduty: [\"198.51.100.0/24\"]}}\n{MINIMAL}");
    let c = load(&text).unwrap();
    assert!(c.actions[0].allow.contains("198.51.100.9".parse().unwrap()));
    assert!(!c.actions[0].allow.contains("47.94.95.118".parse().unwrap()));
}

#[test]
fn fallback_is_resolved_at_load() {
    let text = format!("fallback: {{url: \"http://127.0.0.1:8000\"}}\n{MINIMAL}");
    let f = load(&text).unwrap().fallback.unwrap();
    assert_eq!(f.addr, "127.0.0.1:8000".parse().unwrap());
    assert!(!f.tls);
    let text = format!("fallback: {{url: \"http://127.0.0.1:8000/app\"}}\n{MINIMAL}");
    assert!(problems(&text)[0].starts_with("fallback.url: a path or query is not supported"));
}

#[test]
fn missing_tls_files_fail_the_check_not_the_listener() {
    let text = MINIMAL.replace(
        "{addr: \"127.0.0.1:18443\"}",
        "{addr: \"127.0.0.1:18443\", tls: {cert: /nonexistent/cert.pem, key: /nonexistent/key.pem}}",
    );
    let p = problems(&text);
    assert!(
        p[0].starts_with("listen[0].tls.cert: cannot read \"/nonexistent/cert.pem\""),
        "{p:?}"
    );
    assert!(p[1].starts_with("listen[0].tls.key: cannot read"), "{p:?}");
}

#[test]
fn secrets_never_show_in_debug_output() {
    let text = MINIMAL.replace(
        "    upstreams:",
        "    secret: {header: X-Secret, value: \"${RESTART_SECRET}\"}\n    upstreams:",
    );
    let c = load(&text).unwrap();
    assert!(!format!("{c:?}").contains("s3cr3t"));
}

#[test]
fn upstream_header_values_never_show_in_debug_output() {
    let text = MINIMAL.replace(
        "url: \"http://127.0.0.1:8000/restart\"",
        "url: \"http://127.0.0.1:8000/restart\"\n        headers: {Authorization: \"Bearer ${TOKEN}\"}",
    );
    let c = load(&text).unwrap();
    assert!(!format!("{c:?}").contains("Bearer tok"));
}

#[test]
fn max_body_is_bounded_by_what_the_spool_stores_in_one_record() {
    let text = |size: &str| format!("{MINIMAL}limits: {{max_body: {size}}}\n");
    assert_eq!(load(&text("64MiB")).unwrap().limits.max_body, 64 << 20);
    let p = problems(&text("65MiB"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with(
            "limits.max_body: 68157440 bytes is more than the spool stores in one record"
        ),
        "{p:?}"
    );
}

#[test]
fn admin_token_is_a_bearer_credential_that_debug_output_never_shows() {
    let with = |token: &str| format!("{MINIMAL}admin: {{token: \"{token}\"}}\n");
    let config = load(&with("${TOKEN}")).unwrap();
    let token = config.admin_token.as_ref().unwrap();
    assert_eq!(token.header, http::header::AUTHORIZATION);
    assert_eq!(token.value, b"Bearer tok");
    assert!(!format!("{config:?}").contains("Bearer tok"));
    for bad in ["", "two words"] {
        let p = problems(&with(bad));
        assert_eq!(
            p,
            ["admin.token: must be a non-empty string without spaces (or leave it out)"],
            "{bad:?}"
        );
    }
}

#[test]
fn events_default_to_custom_actions_and_bad_types_are_named() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.actions[0].events.to_string(), "[i_custom]");
    let with = |events: &str| {
        MINIMAL.replace(
            "    path: /actions/restart-host\n",
            &format!("    path: /actions/restart-host\n    events: {events}\n"),
        )
    };
    let c = load(&with("[i_new, i_rslv, a_*]")).unwrap();
    assert!(c.actions[0].events.wants("a_close"));
    assert!(!c.actions[0].events.wants("i_custom"));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(
        problems(&with("[i_new, new_incident]")),
        ["actions[0].events: \"new_incident\" is not a Flashduty event type (i_… for incidents, \
          a_… for alerts, or i_* / a_* for every type of a kind)"]
    );
    assert_eq!(
        problems(&with("[]")),
        ["actions[0].events: must name at least one event type (e.g. [i_custom])"]
    );
    assert!(problems(&with("i_new"))[0].starts_with("actions[0].events: invalid type"));
    let c = load(&with("[i_ack, a_nwe]")).unwrap();
    assert_eq!(
        c.warnings,
        ["actions[0].events: \"a_nwe\" is not one of Flashduty's documented event types; did you mean a_new?"]
    );
}

#[test]
fn order_takes_event_time_and_a_bounded_window() {
    let with = |lines: &str| {
        MINIMAL.replace(
            "        url: \"http://127.0.0.1:8000/restart\"\n",
            &format!("        url: \"http://127.0.0.1:8000/restart\"\n{lines}"),
        )
    };
    assert_eq!(
        load(MINIMAL).unwrap().actions[0].upstreams[0].order_window,
        None
    );
    let c = load(&with("        order: event_time\n")).unwrap();
    assert_eq!(
        c.actions[0].upstreams[0].order_window,
        Some(Duration::from_secs(2))
    );
    let c = load(&with(
        "        order: event_time\n        order_window: 500ms\n",
    ))
    .unwrap();
    assert_eq!(
        c.actions[0].upstreams[0].order_window,
        Some(Duration::from_millis(500))
    );
    assert_eq!(
        problems(&with("        order: arrival\n")),
        ["actions[0].upstreams[0].order: \"arrival\" is not an order (the one there is: event_time)"]
    );
    assert_eq!(
        problems(&with("        order_window: 1s\n")),
        ["actions[0].upstreams[0].order_window: has no effect without order: event_time"]
    );
    assert_eq!(
        problems(&with(
            "        order: event_time\n        order_window: 5m\n"
        )),
        ["actions[0].upstreams[0].order_window: must be more than 0 and at most 1m"]
    );
    let cluster = with("        order: event_time\n").replace(
        "actions:",
        "spool: {postgres: {url: \"postgresql://a@127.0.0.1:1/db\"}}\nactions:",
    );
    assert_eq!(
        problems(&cluster),
        ["actions[0].upstreams[0].order: needs the local spool: in cluster mode (spool.postgres) \
          instances claim deliveries independently"]
    );
}
