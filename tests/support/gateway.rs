//! The real `actiongate` binary, started on loopback ports with its own spool directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use actiongate::config::Config;
use actiongate::spool::Spool;
use actiongate::store::StoreCounts;

use super::{client, eventually, free_port};

pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: usize,
}

impl Gateway {
    /// Starts the gateway on `yaml` (everything but `listen`, `admin` and `spool`, which are
    /// filled in here) and waits until `/readyz` answers 200.
    pub async fn start(yaml: &str) -> Gateway {
        Gateway::start_with_env(yaml, &[]).await
    }

    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::start_with_listener(yaml, env, "").await
    }

    /// Like `start_with_env`, with extra YAML for the listener (e.g. `tls: {…}`).
    pub async fn start_with_listener(yaml: &str, env: &[(&str, &str)], listener: &str) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let listener = if listener.is_empty() {
            String::new()
        } else {
            format!(", {listener}")
        };
        // The admin address and the spool are always the test's; a test may add settings to
        // them by starting its YAML with an `admin: {…}` and/or a `spool: {…}` line.
        let (admin_line, yaml) = merge_line(yaml, "admin", &format!("addr: \"{admin}\""));
        let path = format!("path: \"{}\"", dir.path().join("spool").display());
        // A cluster test gives its own `spool: {postgres: …}` line: no path then.
        let (spool, yaml) = match yaml.strip_prefix("spool: {postgres:") {
            Some(_) => {
                let (line, rest) = yaml.split_once('\n').unwrap_or((&yaml, ""));
                (format!("{line}\n"), rest.to_string())
            }
            None => merge_line(&yaml, "spool", &path),
        };
        let config = format!("listen: [{{addr: \"{addr}\"{listener}}}]\n{admin_line}{spool}{yaml}");
        std::fs::write(dir.path().join("actiongate.yaml"), config).expect("write config");
        let mut gateway = Gateway {
            addr,
            admin,
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            starts: 0,
        };
        gateway.spawn().await;
        gateway
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("actiongate.yaml")
    }

    /// Replaces everything but `listen`, `admin` and `spool` in the config file, for a reload.
    pub fn rewrite_config(&self, yaml: &str) {
        let current = std::fs::read_to_string(self.config_path()).expect("config");
        let preamble: String = current.lines().take(3).map(|l| format!("{l}\n")).collect();
        std::fs::write(self.config_path(), preamble + yaml).expect("write config");
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("actiongate.{}.log", self.starts))
    }

    /// Starts (again) on the same config and spool, and waits for readiness.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.child = Some(self.launch(&[]));
        self.wait_ready().await;
    }

    /// A graceful upgrade as an operator runs it: a new process with `-u` on the same config
    /// and spool, then SIGQUIT to the running one. Returns once the old process has exited
    /// (with its status) and the new one is ready.
    pub async fn upgrade(&mut self) -> ExitStatus {
        let mut old = self.child.take().expect("running");
        self.child = Some(self.launch(&["-u"]));
        // The old process retries for a few seconds until the new one listens for the hand-over.
        let sent = Command::new("kill")
            .args(["-QUIT", &old.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let status = eventually("the old process to exit", Duration::from_secs(30), || {
            old.try_wait().ok().flatten()
        })
        .await;
        self.wait_ready().await;
        status
    }

    /// Starts the binary on this gateway's config, logging to a new log file.
    fn launch(&mut self, args: &[&str]) -> Child {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        Command::new(env!("CARGO_BIN_EXE_actiongate"))
            .arg("-c")
            .arg(self.config_path())
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            // Relative paths (a cluster's pid file and upgrade socket in ./data) stay the test's.
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start actiongate")
    }

    /// Waits until `/readyz` answers 200; fails fast, with the logs, if the process exits.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("actiongate exited at start ({status}):\n{}", self.logs());
            }
            if readyz(self.admin).await == Some(200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "actiongate never became ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`: no chance to flush or drain anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` and waits (up to 30 s) for the process to exit.
    pub async fn stop_with(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        eventually("actiongate to exit", Duration::from_secs(30), || {
            child.try_wait().ok().flatten()
        })
        .await
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill")
            .success());
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        eventually("actiongate to exit", Duration::from_secs(30), || {
            child.try_wait().ok().flatten()
        })
        .await
    }

    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.path().join(format!("actiongate.{n}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub async fn metrics(&self) -> String {
        let response = client::get(self.admin, "/metrics").await;
        assert_eq!(response.status, 200);
        String::from_utf8(response.body).expect("utf-8 metrics")
    }

    /// The value of one series, e.g. `actiongate_requests_total{action="a",outcome="accepted"}`.
    /// Labels must be written in the order Prometheus prints them (alphabetical).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    /// Waits until `series` has `value` (panics after 10 s).
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.metrics().await;
            let now = metric_value(&text, series);
            if now == Some(value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {now:?}, wanted {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `series` is at least `value` (panics after `limit`).
    pub async fn wait_metric_at_least(&self, series: &str, value: f64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let now = metric_value(&self.metrics().await, series);
            if now.is_some_and(|v| v >= value) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {now:?}, wanted at least {value}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the spool holds; the gateway must be stopped (the store is single-process).
    pub fn stored(&self) -> StoreCounts {
        assert!(
            self.child.is_none(),
            "stop the gateway before opening its spool"
        );
        let spool = self.open_spool();
        spool.counts().expect("spool counts")
    }

    pub fn open_spool(&self) -> Spool {
        let text = std::fs::read_to_string(self.config_path()).expect("config");
        let env = |name: &str| {
            self.env
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let config = Config::from_yaml(&text, &env).expect("config");
        let metrics = Arc::new(actiongate::metrics_for(&config));
        Spool::open(&self.spool_dir(), config.dedup_window, metrics).expect("open spool")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The status of `GET /readyz`, or None when the admin listener does not answer.
/// `key: {given, …}` with the settings a test's YAML gave for `key` on its first line, if any;
/// and the rest of the YAML.
/// A setting the test gives itself (e.g. its own `path`) replaces the support's.
fn merge_line(yaml: &str, key: &str, given: &str) -> (String, String) {
    let given_key = given.split(':').next().unwrap_or_default();
    match yaml.strip_prefix(&format!("{key}: {{")) {
        Some(rest)
            if rest
                .lines()
                .next()
                .unwrap_or_default()
                .contains(&format!("{given_key}:")) =>
        {
            let (line, rest) = rest.split_once('\n').unwrap_or((rest, ""));
            (format!("{key}: {{{line}\n"), rest.to_string())
        }
        Some(rest) => match rest.split_once('\n') {
            Some((line, rest)) => (format!("{key}: {{{given}, {line}\n"), rest.to_string()),
            None => (format!("{key}: {{{given}, {rest}\n"), String::new()),
        },
        None => (format!("{key}: {{{given}}}\n"), yaml.to_string()),
    }
}

pub async fn readyz(admin: SocketAddr) -> Option<u16> {
    use tokio::io::AsyncWriteExt;
    let connect = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(admin),
    );
    let mut stream = connect.await.ok()?.ok()?;
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    client::read_response(&mut stream)
        .await
        .ok()
        .map(|r| r.status)
}

/// Finds `series` in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}
