//! Assembles the stand-alone gateway: a Pingora server with the proxy on every `listen`
//! address, the admin listener and the dispatcher; and how it stops: SIGHUP reloads in place
//! (`reload.rs`), SIGTERM drains (`lifecycle.rs`), SIGQUIT hands over to a new process (`-u`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{ExecutionPhase, RunArgs, Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_proxy::HttpProxy;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::ingress::admission::{AcceptFilter, ConnectionGuard};
use crate::ingress::watchdog;
use crate::lifecycle::{set_shutdown_timing, Lifecycle};
use crate::proxy::EdgeProxy;
use crate::reload::Reloader;
use crate::tls::ListenerCert;
use crate::ActionGate;

/// How long the new process of a graceful upgrade waits for the old one to let go of the
/// spool: the old one serves through Pingora's 5 s hand-over window, then answers what it
/// had accepted (at most `server.grace_period`) and exits.
const UPGRADE_SPOOL_WAIT: Duration = Duration::from_secs(60);

/// What the command line asks of Pingora.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Take the listeners over from a running instance (`-u`).
    pub upgrade: bool,
}

/// A server ready to run.
pub struct Gateway {
    pub server: Server,
    pub gate: ActionGate,
    /// The certificate of each TLS listener, replaced on reload.
    certs: Vec<(SocketAddr, Arc<ListenerCert>)>,
    /// Reloaded on SIGHUP.
    pub config_path: Option<std::path::PathBuf>,
}

impl Gateway {
    /// Builds the server. The config has been validated, so failures here are the
    /// environment's: the spool cannot be opened, a client cannot be built.
    pub fn build(config: Config, mode: Mode) -> Result<Gateway, String> {
        let spool_dir = config.spool_path.clone();
        let opt = Opt {
            daemon: mode.daemon,
            upgrade: mode.upgrade,
            ..Opt::default()
        };
        let mut conf = ServerConf {
            threads: config.server.threads,
            pid_file: spool_dir
                .join("actiongate.pid")
                .to_string_lossy()
                .into_owned(),
            upgrade_sock: spool_dir
                .join("actiongate-upgrade.sock")
                .to_string_lossy()
                .into_owned(),
            ..ServerConf::default()
        };
        // The exit watcher below ends the process as soon as the last connection is served.
        set_shutdown_timing(&mut conf, config.server.grace_period);
        let listeners = config.listen.clone();
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        // With -u this receives the listening sockets from the running process, which keeps
        // serving on them (and holding the spool) until it exits a few seconds later. The
        // spool is opened only after that: connections meanwhile wait in the shared accept
        // queue instead of being refused.
        server.bootstrap();
        let spool_wait = if mode.upgrade {
            log::info!(
                "listeners taken over; waiting for the previous process to let go of the spool"
            );
            UPGRADE_SPOOL_WAIT
        } else {
            Duration::ZERO
        };
        let gate = ActionGate::open(config, spool_wait)?;
        let open_files = raise_open_files_limit();
        let guard = ConnectionGuard::new(gate.clone(), open_files);
        log::info!(
            "open-files limit {open_files}: at most {} connections",
            guard.max_connections()
        );
        let mut proxy = Service::new(
            "actiongate".to_string(),
            Connections {
                proxy: Arc::new(pingora_proxy::http_proxy(
                    &server.configuration,
                    EdgeProxy { gate: gate.clone() },
                )),
                lifecycle: gate.lifecycle().clone(),
                guard: guard.clone(),
            },
        );
        proxy.set_connection_filter(Arc::new(AcceptFilter(guard)));
        let mut certs = Vec::new();
        for listener in &listeners {
            let addr = listener.addr.to_string();
            match &listener.tls {
                None => proxy.add_tcp(&addr),
                Some(tls) => {
                    // A resolver rather than file paths, so that a reload can swap the
                    // certificate under a running listener.
                    let cert = ListenerCert::new(tls.certified.clone());
                    let mut settings = TlsSettings::intermediate(
                        &tls.cert.to_string_lossy(),
                        &tls.key.to_string_lossy(),
                    )
                    .map_err(|e| format!("listen {addr}: {e}"))?;
                    settings.set_cert_resolver(cert.clone());
                    proxy.add_tls_with_settings(&addr, None, settings);
                    certs.push((listener.addr, cert));
                }
            }
        }
        server.add_service(proxy);
        gate.add_services(&mut server)?;
        Ok(Gateway {
            server,
            gate,
            certs,
            config_path: None,
        })
    }

    /// Runs until a signal stops it. With `config_path` set, SIGHUP reloads that file.
    pub fn run(self) {
        let mut signal = self.gate.drain_on_signal();
        if let Some(path) = self.config_path {
            signal = signal.on_hangup(Reloader {
                gate: self.gate.clone(),
                path,
                certs: self.certs,
            });
        }
        let args = RunArgs {
            shutdown_signal: Box::new(signal),
        };
        // A service rather than a thread started here: with -d, Pingora forks after this
        // point and only the services start in the daemon.
        let watcher = ExitWatcher {
            phases: std::sync::Mutex::new(Some(self.server.watch_execution_phase())),
            gate: self.gate.clone(),
        };
        let mut server = self.server;
        server.add_service(background_service("actiongate exit watcher", watcher));
        server.run(args);
    }
}

struct ExitWatcher {
    phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    gate: ActionGate,
}

#[async_trait]
impl BackgroundService for ExitWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let phases = self.phases.lock().ok().and_then(|mut p| p.take());
        let Some(phases) = phases else { return };
        let gate = self.gate.clone();
        // Blocking on purpose: it must outlive the async runtimes Pingora stops at shutdown.
        let started = std::thread::Builder::new()
            .name("actiongate exit".into())
            .spawn(move || exit_when_served(phases, gate));
        if let Err(e) = started {
            log::warn!(
                "cannot start the exit watcher ({e}); shutdown waits the whole grace period"
            );
        }
        // Returning now would make Pingora log "service … exited." at every start, which
        // reads like a failure: the service ends with the server instead.
        let _ = shutdown.changed().await;
    }
}

/// Ends the process as soon as every connection of the main listener has been served once
/// Pingora has begun its shutdown, instead of after Pingora's fixed grace period. This is what
/// lets a graceful upgrade's new process, waiting for the spool, start answering within
/// milliseconds of the old one closing its listeners.
fn exit_when_served(mut phases: broadcast::Receiver<ExecutionPhase>, gate: ActionGate) {
    loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownStarted) => break,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
    let lifecycle = gate.lifecycle();
    let deadline = Instant::now() + gate.config().server.grace_period;
    while !lifecycle.served() {
        if Instant::now() >= deadline {
            log::warn!("connections still open after the grace period; closing them");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    log::info!("every connection served; exiting");
    // Acknowledged events are on disk (fsync before every 200); delivery attempts cut here
    // are made again by the next process, with the same Idempotency-Key.
    std::process::exit(0);
}

/// The main listener's application: Pingora's proxy, with its connections counted and a
/// short settling time before idle connections are closed at shutdown.
///
/// Pingora drops every connection still waiting for a request when its listener shuts down,
/// including one accepted a moment before whose request is still on the wire; its client
/// sees the connection closed without an answer. Waiting [`SETTLE`] first lets those requests
/// arrive and be answered.
struct Connections {
    proxy: Arc<HttpProxy<EdgeProxy>>,
    lifecycle: Arc<Lifecycle>,
    guard: Arc<ConnectionGuard>,
}

/// How long a connection accepted just before shutdown has for its request to arrive.
const SETTLE: Duration = Duration::from_millis(250);

#[async_trait]
impl ServerApp for Connections {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let peer = session
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        // Counted for the caps while it is open; one over a cap is closed here.
        let _counted = match peer {
            Some(peer) => Some(self.guard.open(peer)?),
            None => None,
        };
        let _open = self.lifecycle.connection();
        // HTTP/2 runs each stream in a task of its own, where the proxy's phases cannot reach
        // this connection's watchdog: it is left to Pingora's own timeouts.
        if matches!(session.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.proxy.process_new(session, shutdown).await;
        }
        let limits = self.guard.limits();
        let served = watchdog::guard(
            limits.header_timeout,
            limits.idle_timeout,
            self.proxy.process_new(session, shutdown),
        )
        .await;
        match served {
            Ok(reuse) => reuse,
            Err(why) => {
                if let Some(peer) = peer {
                    self.guard.cut(peer, why);
                }
                None
            }
        }
    }

    async fn cleanup(&self) {
        tokio::time::sleep(SETTLE).await;
        self.proxy.cleanup().await;
        self.lifecycle.close_listeners();
    }
}

/// Raises the soft limit on open files to the hard one (a gateway at the edge holds many
/// sockets) and returns the soft limit now in force.
fn raise_open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}
