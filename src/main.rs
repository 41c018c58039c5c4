//! The `actiongate` command: run the gateway, check a config, or render what an upstream gets.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};

use std::time::Duration;

use actiongate::config::units::format_duration;
use actiongate::config::{Action, Config, DriftPolicy, ReportOutcome, Upstream};
use actiongate::delivery::report::{self, Facts};
use actiongate::delivery::request;
use actiongate::ingress::guard;
use actiongate::ingress::payload::{self, Verdict};
use actiongate::server::{Gateway, Mode};
use actiongate::store::Guarded;

/// jemalloc, as Pingora's own deployments use: glibc's malloc cost the dispatcher ~16 % of its
/// CPU (consolidating freed 4 KB payload buffers). Measured with it: 92-99 -> 77 us of
/// dispatcher CPU per delivery, and more acks per second (BENCHMARKS.md). The library leaves
/// the allocator to whoever embeds it.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What `--offline` puts in place of an unset variable: valid as a secret, a token, a
/// header value or a host name, so that only the variable's own use goes unchecked.
const UNSET_STAND_IN: &str = "unset-env-stand-in";

/// Edge gateway for Flashduty custom actions.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// The configuration file.
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    conf: Option<PathBuf>,
    /// Check the configuration and exit: 0 when valid, 1 with one line per problem.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// With -t: check the file away from the host it will run on (in CI, say). A `${NAME}`
    /// that is not set is checked with a stand-in value, and `spool.path` is not tried; the
    /// answer names what was not checked.
    #[arg(long = "offline", requires = "test")]
    offline: bool,
    /// Run in the background (Pingora's daemon mode).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Take over the listeners of a running instance (Pingora's graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    /// Make a damaged spool startable and exit: bytes that are not whole records are moved to
    /// `.damaged` files beside their segment, every whole record is kept. Run it only when
    /// start-up refuses a damaged spool, with the gateway stopped.
    #[arg(long = "repair-spool")]
    repair_spool: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print exactly what an upstream would receive for a payload (method, URL, headers, body).
    Render {
        #[arg(short = 'c', long = "conf", value_name = "FILE")]
        conf: PathBuf,
        /// The action's name.
        #[arg(long)]
        action: String,
        /// The upstream's name within the action.
        #[arg(long)]
        upstream: String,
        /// Print instead the comment the action's `report` would post onto the incident for
        /// this outcome of the upstream: delivered, dead_lettered or guarded.
        #[arg(long, value_name = "OUTCOME")]
        outcome: Option<String>,
        /// A payload file, as Flashduty would send it.
        payload: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Render {
        conf,
        action,
        upstream,
        outcome,
        payload,
    }) = &cli.command
    {
        return render(conf, action, upstream, outcome.as_deref(), payload);
    }
    let Some(path) = &cli.conf else {
        eprintln!("actiongate: -c FILE is required (see --help)");
        return ExitCode::from(2);
    };
    let unset = RefCell::new(BTreeSet::new());
    let env = |name: &str| {
        std::env::var(name).ok().or_else(|| {
            cli.offline.then(|| {
                unset.borrow_mut().insert(name.to_string());
                UNSET_STAND_IN.to_string()
            })
        })
    };
    let config = match Config::load_with(path, &env) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(1);
        }
    };
    if cli.test {
        if !cli.offline && config.postgres.is_none() {
            if let Err(why) = actiongate::spool::check_dir(&config.spool_path) {
                eprintln!("spool.path: {why}");
                return ExitCode::from(1);
            }
        }
        for warning in &config.warnings {
            eprintln!("warning: {warning}");
        }
        if cli.offline {
            let store = if config.postgres.is_some() {
                "spool.postgres"
            } else {
                "spool.path"
            };
            let mut unchecked = vec![store.to_string()];
            unchecked.extend(unset.into_inner().into_iter().map(|n| format!("${{{n}}}")));
            println!(
                "{}: ok; not checked (offline): {}",
                path.display(),
                unchecked.join(", ")
            );
        } else {
            println!("{}: ok", path.display());
        }
        return ExitCode::SUCCESS;
    }
    if cli.repair_spool {
        if config.postgres.is_some() {
            eprintln!(
                "--repair-spool repairs a local spool; this config keeps its state in \
                 PostgreSQL (spool.postgres), whose own recovery applies"
            );
            return ExitCode::from(1);
        }
        return repair_spool(&config.spool_path);
    }
    actiongate::logging::init(config.log.format, &config.log.level);
    for warning in &config.warnings {
        log::warn!("config: {warning}");
    }
    let listening: Vec<String> = config
        .listen
        .iter()
        .map(|l| {
            let scheme = if l.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", l.addr)
        })
        .collect();
    let started = format!(
        "actiongate {} starting: config {}, listening on {}, admin on http://{}, spool {}",
        env!("CARGO_PKG_VERSION"),
        path.display(),
        listening.join(" "),
        config.admin,
        match &config.postgres {
            Some(pg) => format!("on PostgreSQL (pool {})", pg.pool),
            None => config.spool_path.display().to_string(),
        }
    );
    let mode = Mode {
        daemon: cli.daemon,
        upgrade: cli.upgrade,
    };
    match Gateway::build(config, mode) {
        Ok(mut gateway) => {
            gateway.config_path = Some(path.clone());
            log::info!("{started}");
            gateway.run();
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("actiongate: {why}");
            ExitCode::from(1)
        }
    }
}

fn repair_spool(dir: &Path) -> ExitCode {
    match actiongate::spool::repair(dir) {
        Ok(lines) if lines.is_empty() => {
            println!("{}: no damage found; nothing changed", dir.display());
            ExitCode::SUCCESS
        }
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            println!("{}: repaired; start the gateway as usual", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("actiongate: cannot repair {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}

fn render(
    conf: &Path,
    action_name: &str,
    upstream_name: &str,
    outcome: Option<&str>,
    payload_path: &Path,
) -> ExitCode {
    let config = match Config::load(conf) {
        Ok(config) => config,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(1);
        }
    };
    let Some(action) = config.actions.iter().find(|a| a.name == action_name) else {
        let known: Vec<&str> = config.actions.iter().map(|a| a.name.as_str()).collect();
        eprintln!("no action {action_name:?} (actions: {})", known.join(", "));
        return ExitCode::from(1);
    };
    let Some(upstream) = action.upstreams.iter().find(|u| u.name == upstream_name) else {
        let known: Vec<&str> = action.upstreams.iter().map(|u| u.name.as_str()).collect();
        eprintln!(
            "no upstream {upstream_name:?} in {action_name} (upstreams: {})",
            known.join(", ")
        );
        return ExitCode::from(1);
    };
    let raw = match std::fs::read(payload_path) {
        Ok(raw) => Bytes::from(raw),
        Err(e) => {
            eprintln!("{}: {e}", payload_path.display());
            return ExitCode::from(1);
        }
    };
    let event_id = match payload::validate(&raw, DriftPolicy::Accept, &action.events) {
        Ok(Verdict::Valid(valid)) => valid.event_id.into_owned(),
        Ok(Verdict::Unwanted { event_type, .. }) => {
            println!(
                "# events: {action_name} does not take {event_type} (events: {}); the gateway \
                 would answer 200 ignored and deliver nothing",
                action.events
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!(
                "{}: the gateway would refuse this payload: {e}",
                payload_path.display()
            );
            return ExitCode::from(1);
        }
    };
    let value: serde_json::Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{}: {e}", payload_path.display());
            return ExitCode::from(1);
        }
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    if let Some(outcome) = outcome {
        return render_report(&config, action, upstream, outcome, &event_id, &raw);
    }
    if let Some(why) = upstream.when.as_ref().and_then(|w| w.explain(&value)) {
        println!("# when: does not match: {why}; {upstream_name} would skip this event");
        return ExitCode::SUCCESS;
    }
    if !upstream.value_mapping.is_empty() {
        // On stderr: stdout is exactly what the upstream receives.
        eprintln!(
            "note: value_mapping applies to values substituted into the URL, header and body \
             templates; a body passed through as received, and when rules, see the original values"
        );
    }
    let headers = request::headers(upstream, &action.name, &event_id, 1, Some(&value));
    let body = request::body(upstream, &raw, Some(&value));
    let url = request::url(upstream, Some(&value));
    println!("{} {url}", upstream.method);
    for (name, value) in &headers {
        println!("{}: {}", name, String::from_utf8_lossy(value.as_bytes()));
    }
    println!();
    println!("{}", String::from_utf8_lossy(&body));
    ExitCode::SUCCESS
}

/// Prints the Open API call the report of `outcome` would make, with example facts (said on
/// stderr, as stdout is exactly what Flashduty would receive).
fn render_report(
    config: &Config,
    action: &Action,
    upstream: &Upstream,
    outcome: &str,
    event_id: &str,
    raw: &[u8],
) -> ExitCode {
    let Some(outcome) = ReportOutcome::parse(outcome) else {
        eprintln!("--outcome {outcome:?}: use delivered, dead_lettered or guarded");
        return ExitCode::from(1);
    };
    let (Some(report), Some(api)) = (&action.report, &config.flashduty) else {
        eprintln!("{} reports nothing: it has no report section", action.name);
        return ExitCode::from(1);
    };
    let plan = report::Plan::new(report);
    if !plan.wants(outcome) {
        println!(
            "# report.on does not list {}: nothing would be posted",
            outcome.label()
        );
        return ExitCode::SUCCESS;
    }
    let attempts = upstream.retry.attempts;
    let guard_message = action.guard.as_ref().map(|g| {
        let now = actiongate::store::now_ms();
        let refused = match (g.once_per_incident, g.max_per_hour) {
            (Some(window), _) => Guarded::OncePerIncident {
                frees_ms: now + u64::try_from(window.as_millis()).unwrap_or(0),
            },
            (None, Some(limit)) => Guarded::MaxPerHour {
                limit,
                frees_ms: now + 600_000,
            },
            (None, None) => Guarded::HumanOnly,
        };
        guard::message(&action.name, refused, now)
    });
    let dead_error = format!("HTTP 503: Service Unavailable (after {attempts} attempts)");
    let facts = match outcome {
        ReportOutcome::Delivered => Facts {
            action: &action.name,
            upstream: &upstream.name,
            outcome,
            attempts: 1,
            status: Some(200),
            error: None,
            response: "",
            lag: Duration::from_millis(1200),
        },
        ReportOutcome::DeadLettered => Facts {
            action: &action.name,
            upstream: &upstream.name,
            outcome,
            attempts,
            status: Some(503),
            error: Some(&dead_error),
            response: "Service Unavailable",
            lag: Duration::from_secs(600),
        },
        ReportOutcome::Guarded => Facts {
            action: &action.name,
            upstream: "",
            outcome,
            attempts: 0,
            status: None,
            error: guard_message.as_deref(),
            response: "",
            lag: Duration::ZERO,
        },
    };
    eprintln!(
        "note: example facts: attempts {}, status {}, lag {}{}",
        facts.attempts,
        facts
            .status
            .map_or_else(|| "none".to_string(), |s| s.to_string()),
        format_duration(facts.lag),
        facts
            .error
            .map_or_else(String::new, |e| format!(", error {e:?}"))
    );
    let Some(event) = plan.event(event_id, raw, &facts) else {
        println!(
            "# incident.incident_id is not a Flashduty incident id (24 hex characters): nothing \
             would be posted"
        );
        return ExitCode::SUCCESS;
    };
    println!("POST {}?app_key=<flashduty.app_key>", api.comment_url());
    println!("content-type: application/json");
    println!();
    println!("{}", String::from_utf8_lossy(&event.body));
    ExitCode::SUCCESS
}
