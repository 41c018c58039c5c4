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
                    // Problems of the file as a whole name it already; key paths do not.
                    if problem.starts_with(&format!("{path}:")) {
                        log::error!("reload refused: {problem}");
                    } else {
                        log::error!("reload refused: {path}: {problem}");
                    }
                }
                log::error!("reload refused: still running on the previous configuration");
                return false;
            }
        };
        for warning in &config.warnings {
            log::warn!("reload: {path}: {warning}");
        }
        let running = self.gate.config();
        let certs: Vec<_> = self
            .certs
            .iter()
            .filter_map(|(addr, cert)| {
                let listener = config.listen.iter().find(|l| l.addr == *addr)?;
                Some((cert, listener.tls.as_ref()?.certified.clone()))
            })
            .collect();
        // The config in force says what is in force: the server's settings stay the running ones.
        let (config, kept) = keep_process_settings(&running, config);
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

/// `new` with the settings that only a new process can apply put back to their running
/// values, and the names of those that `new` would have changed. Each setting is compared
/// and kept in one place, so the two cannot drift apart.
fn keep_process_settings(running: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut changed = Vec::new();
    let mut note = |name, differs: bool| {
        if differs {
            changed.push(name);
        }
    };
    let listeners = |c: &Config| -> Vec<(SocketAddr, bool)> {
        c.listen.iter().map(|l| (l.addr, l.tls.is_some())).collect()
    };
    note("listen", listeners(running) != listeners(&new));
    new.listen = running.listen.clone();
    note("admin.addr", running.admin != new.admin);
    new.admin = running.admin;
    note("spool.path", running.spool_path != new.spool_path);
    new.spool_path = running.spool_path.clone();
    note("spool.postgres", running.postgres != new.postgres);
    new.postgres = running.postgres.clone();
    note(
        "spool.segment_size",
        running.spool_segment_size != new.spool_segment_size,
    );
    new.spool_segment_size = running.spool_segment_size;
    note("dedup_window", running.dedup_window != new.dedup_window);
    new.dedup_window = running.dedup_window;
    note(
        "server.threads",
        running.server.threads != new.server.threads,
    );
    new.server.threads = running.server.threads;
    note(
        "log",
        running.log.format != new.log.format || running.log.level != new.log.level,
    );
    new.log = running.log.clone();
    (new, changed)
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
        let needs_restart = |new: &Config| keep_process_settings(&running, new.clone()).1;
        assert!(needs_restart(&config("")).is_empty());
        // Reloadable in place: limits, trusted proxies, grace period, actions.
        let in_place = config(
            "limits: {max_body: 2KiB}\ntrusted_proxies: [\"10.0.0.0/8\"]\nserver: {grace_period: 9s}\n",
        );
        assert!(needs_restart(&in_place).is_empty());
        let new_process = config(
            "admin: {addr: \"127.0.0.1:9999\"}\nspool: {path: /tmp/elsewhere}\nserver: {threads: 7}\nlog: {format: json}\ndedup_window: 1h\n",
        );
        assert_eq!(
            needs_restart(&new_process),
            [
                "admin.addr",
                "spool.path",
                "dedup_window",
                "server.threads",
                "log"
            ]
        );
        assert_eq!(needs_restart(&config_on("127.0.0.1:18444", "")), ["listen"]);
        // What is kept is the running value; what may change in place is the new one.
        let (kept, _) = keep_process_settings(&running, new_process);
        assert_eq!(kept.admin, running.admin);
        assert_eq!(kept.spool_path, running.spool_path);
        assert_eq!(kept.server.threads, running.server.threads);
        let (kept, _) = keep_process_settings(&running, in_place);
        assert_eq!(kept.limits.max_body, 2048);
        assert_eq!(kept.server.grace_period, std::time::Duration::from_secs(9));
    }
}
