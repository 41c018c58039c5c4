//! Live reload on SIGHUP: check the file again, refuse it whole if anything is wrong, otherwise
//! put it in force in place — no process change, no listener closed, no request failed.
//!
//! What the running process cannot change in place (its listeners, admin address, spool,
//! threads, log output) is named in a warning and takes effect at the next start or graceful
//! upgrade (`-u`); everything else applies at once, certificates included.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::Config;
use crate::lifecycle::OnHangup;
use crate::tls::ListenerCert;
use crate::ActionGate;

/// Reloads the stand-alone gateway's config file.
pub struct Reloader {
    pub gate: ActionGate,
    pub path: PathBuf,
    /// The certificate of each TLS listener, as started.
    pub certs: Vec<(SocketAddr, Arc<ListenerCert>)>,
}

#[async_trait]
impl OnHangup for Reloader {
    async fn hangup(&self) {
        let applied = self.reload().await;
        self.gate.metrics().reload(applied);
    }
}

impl Reloader {
    /// Returns whether the file is now in force.
    async fn reload(&self) -> bool {
        let path = self.path.display();
        let config = match Config::load(&self.path) {
            Ok(config) => config,
            Err(problems) => {
                for problem in &problems.0 {
                    log::error!("reload refused: {path}: {problem}");
                }
                log::error!("reload refused: still running on the previous configuration");
                return false;
            }
        };
        let running = self.gate.config();
        let kept = needs_restart(&running, &config);
        let certs: Vec<_> = self
            .certs
            .iter()
            .filter_map(|(addr, cert)| {
                let listener = config.listen.iter().find(|l| l.addr == *addr)?;
                Some((cert, listener.tls.as_ref()?.certified.clone()))
            })
            .collect();
        // The config in force says what is in force: the server's settings stay the running ones.
        let config = Config {
            listen: running.listen.clone(),
            admin: running.admin,
            spool_path: running.spool_path.clone(),
            dedup_window: running.dedup_window,
            server: crate::config::ServerSettings {
                threads: running.server.threads,
                grace_period: config.server.grace_period,
            },
            log: running.log.clone(),
            ..config
        };
        if let Err(why) = self.gate.reload(config).await {
            log::error!("reload refused: {why}; still running on the previous configuration");
            return false;
        }
        for (cert, key) in certs {
            cert.replace(key);
        }
        for key in &kept {
            log::warn!(
                "reload: {key} changed; it takes effect at the next start or graceful upgrade (-u)"
            );
        }
        log::info!("reload: {path} is in force");
        true
    }
}

/// The settings of `new` that differ from `running` and that only a new process can apply.
fn needs_restart(running: &Config, new: &Config) -> Vec<&'static str> {
    let listeners = |c: &Config| -> Vec<(SocketAddr, bool)> {
        c.listen.iter().map(|l| (l.addr, l.tls.is_some())).collect()
    };
    let mut changed = Vec::new();
    if listeners(running) != listeners(new) {
        changed.push("listen");
    }
    if running.admin != new.admin {
        changed.push("admin.addr");
    }
    if running.spool_path != new.spool_path {
        changed.push("spool.path");
    }
    if running.dedup_window != new.dedup_window {
        changed.push("dedup_window");
    }
    if running.server.threads != new.server.threads {
        changed.push("server.threads");
    }
    if running.log.format != new.log.format || running.log.level != new.log.level {
        changed.push("log");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        config_on("127.0.0.1:18443", extra)
    }

    fn config_on(listen: &str, extra: &str) -> Config {
        let yaml = format!(
            "listen: [{{addr: \"{listen}\"}}]\n{extra}actions:\n  - {{name: a, path: /a, upstreams: [{{name: u, url: \"http://127.0.0.1:8000/\"}}]}}\n"
        );
        Config::from_yaml(&yaml, &|_| None).expect("valid")
    }

    #[test]
    fn only_what_a_running_process_cannot_change_needs_a_restart() {
        let running = config("");
        assert!(needs_restart(&running, &config("")).is_empty());
        // Reloadable in place: limits, trusted proxies, grace period, actions.
        let in_place = config(
            "limits: {max_body: 2KiB}\ntrusted_proxies: [\"10.0.0.0/8\"]\nserver: {grace_period: 9s}\n",
        );
        assert!(needs_restart(&running, &in_place).is_empty());
        let new_process = config(
            "admin: {addr: \"127.0.0.1:9999\"}\nspool: {path: /tmp/elsewhere}\nserver: {threads: 7}\nlog: {format: json}\ndedup_window: 1h\n",
        );
        assert_eq!(
            needs_restart(&running, &new_process),
            [
                "admin.addr",
                "spool.path",
                "dedup_window",
                "server.threads",
                "log"
            ]
        );
        assert_eq!(
            needs_restart(&running, &config_on("127.0.0.1:18444", "")),
            ["listen"]
        );
    }
}
