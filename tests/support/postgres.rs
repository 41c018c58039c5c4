//! Throwaway PostgreSQL servers on loopback for cluster tests: a primary, and a standby
//! streaming from it (synchronous once it streams). Debian's `postgresql`, run as the
//! `postgres` user in a temporary directory; stopped (kill -9, the directory removed) on drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually_async, free_port};

pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    user: (u32, u32),
}

/// Debian's server binaries (`/usr/lib/postgresql/<version>/bin`), the newest installed.
fn bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/setup")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("bin/postgres").exists())
        .collect();
    versions.sort();
    versions
        .last()
        .expect("no PostgreSQL server under /usr/lib/postgresql: run scripts/setup")
        .join("bin")
        .join(name)
}

/// The uid and gid of the `postgres` user (the server refuses to run as root).
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("id");
        assert!(out.status.success(), "no postgres user: run scripts/setup");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

impl PgServer {
    /// A new primary, ready for connections, with a database `actiongate`.
    pub async fn primary() -> PgServer {
        let mut server = PgServer::empty();
        server.run_as(Command::new(bin("initdb")).args([
            "-D",
            server.data().to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]));
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\nfsync = on\n\
             shared_buffers = 32MB\nmax_connections = 100\nlog_min_messages = warning\n",
            server.port,
            server.dir.path().display()
        );
        append(&server.data().join("postgresql.conf"), &conf);
        append(
            &server.data().join("pg_hba.conf"),
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n",
        );
        server.start().await;
        server.psql("postgres", "CREATE DATABASE actiongate");
        server
    }

    /// A standby of `primary`, streaming; the primary then waits for it at every commit.
    pub async fn standby_of(primary: &PgServer) -> PgServer {
        let mut server = PgServer::empty();
        server.run_as(Command::new(bin("pg_basebackup")).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-D",
            server.data().to_str().unwrap(),
            "-R",
            "-c",
            "fast",
            "-X",
            "stream",
        ]));
        let conf = format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            server.port,
            server.dir.path().display()
        );
        append(&server.data().join("postgresql.conf"), &conf);
        server.start().await;
        // Synchronous only once it streams: set before, the primary would wait for it forever.
        eventually_async(Duration::from_secs(30), || async {
            let state = primary.query("postgres", "SELECT state FROM pg_stat_replication LIMIT 1");
            (state.trim() == "streaming").then_some(())
        })
        .await;
        primary.psql(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = '*'",
        );
        primary.psql("postgres", "SELECT pg_reload_conf()");
        eventually_async(Duration::from_secs(30), || async {
            let state = primary.query(
                "postgres",
                "SELECT sync_state FROM pg_stat_replication LIMIT 1",
            );
            (state.trim() == "sync").then_some(())
        })
        .await;
        server
    }

    fn empty() -> PgServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = postgres_user();
        std::os::unix::fs::chown(dir.path(), Some(user.0), Some(user.1)).expect("chown");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        PgServer {
            port: free_port(),
            dir,
            child: None,
            user,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_as(&self, command: &mut Command) {
        let out = command
            .uid(self.user.0)
            .gid(self.user.1)
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{command:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server and waits until it takes connections.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        std::os::unix::fs::chown(
            self.dir.path().join("server.log"),
            Some(self.user.0),
            Some(self.user.1),
        )
        .expect("chown log");
        let child = Command::new(bin("postgres"))
            .arg("-D")
            .arg(self.data())
            .uid(self.user.0)
            .gid(self.user.1)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let port = self.port.to_string();
        eventually_async(Duration::from_secs(30), || async {
            let ready = Command::new(bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port, "-q"])
                .status()
                .is_ok_and(|s| s.success());
            ready.then_some(())
        })
        .await;
    }

    /// An immediate shutdown, as a crash would leave it (no checkpoint); `start` recovers.
    pub fn stop_immediate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new(bin("pg_ctl"))
                .args(["stop", "-m", "immediate", "-w", "-t", "20", "-D"])
                .arg(self.data())
                .uid(self.user.0)
                .gid(self.user.1)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9` of the postmaster. Its backends notice and exit by themselves.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`) to the server and every backend it runs: a
    /// server that answers nothing, as a host gone silent does, without a reset.
    pub fn signal_all(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let backends = Command::new("pgrep")
            .args(["-P", &pid])
            .output()
            .expect("pgrep");
        let mut pids = vec![pid];
        pids.extend(
            String::from_utf8_lossy(&backends.stdout)
                .split_whitespace()
                .map(str::to_string),
        );
        let sent = Command::new("kill")
            .arg(signal)
            .args(&pids)
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {signal} {pids:?}");
    }

    /// Promotes a standby to primary and waits until it takes writes.
    pub async fn promote(&self) {
        self.psql("postgres", "SELECT pg_promote()");
        eventually_async(Duration::from_secs(30), || async {
            (self.query("postgres", "SELECT pg_is_in_recovery()").trim() == "f").then_some(())
        })
        .await;
    }

    /// `postgresql://postgres@127.0.0.1:PORT/actiongate`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/actiongate", self.port)
    }

    /// Runs SQL; panics if it fails.
    pub fn psql(&self, db: &str, sql: &str) {
        self.query(db, sql);
    }

    /// Runs SQL and returns what it printed (unaligned, tuples only).
    pub fn query(&self, db: &str, sql: &str) -> String {
        let out = Command::new(bin("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open server config");
    file.write_all(text.as_bytes())
        .expect("write server config");
}
