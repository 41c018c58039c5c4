//! Assembles the stand-alone gateway: a Pingora server with the proxy on every `listen`
//! address, the admin listener and the dispatcher.

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::listeners::tls::TlsSettings;

use crate::config::Config;
use crate::proxy::EdgeProxy;
use crate::reload::Reloader;
use crate::tls::ListenerCert;
use crate::ActionGate;

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
        let conf = ServerConf {
            threads: config.server.threads,
            // Draining happens in our own signal handler (lifecycle.rs) before Pingora starts
            // its shutdown, so Pingora's unconditional sleep is not needed.
            grace_period_seconds: Some(0),
            graceful_shutdown_timeout_seconds: Some(1),
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
        let listeners = config.listen.clone();
        let fallback = config.fallback.clone();
        let gate = ActionGate::new(config)?;
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();
        let mut proxy = pingora_proxy::http_proxy_service_with_name(
            &server.configuration,
            EdgeProxy {
                gate: gate.clone(),
                fallback,
            },
            "actiongate",
        );
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
        self.server.run(args);
    }
}
