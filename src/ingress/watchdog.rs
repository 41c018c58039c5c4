//! Deadlines between requests on a connection: its first request head must have arrived within
//! `limits.header_timeout` of the accept, and each later one within `limits.idle_timeout` of
//! the previous response; else the connection is closed.
//!
//! Pingora's own read timeout applies per read, so a client sending a byte now and then could
//! hold a connection forever (slowloris). The connection's task runs the proxy and this
//! watchdog side by side; the proxy's phases ([`head_arrived`], [`response_sent`]) move the
//! deadline through a task-local, so nothing is shared between connections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::ConnectionRefusal;

tokio::task_local! {
    static PHASE: Arc<Phase>;
}

/// Where a connection is between its requests.
#[derive(Default)]
pub struct Phase {
    /// Waiting for a request head since then (`true` for the connection's first), or `None`
    /// while a request is being handled.
    awaiting: Mutex<Option<(Instant, bool)>>,
    changed: Notify,
}

impl Phase {
    fn set(&self, awaiting: Option<(Instant, bool)>) {
        if let Ok(mut slot) = self.awaiting.lock() {
            *slot = awaiting;
        }
        self.changed.notify_waiters();
    }

    fn awaiting(&self) -> Option<(Instant, bool)> {
        self.awaiting.lock().ok().and_then(|a| *a)
    }
}

/// Runs `connection` (the proxy on one connection) under the deadlines; returns its result,
/// or why it was cut.
pub async fn guard<T>(
    header_timeout: Duration,
    idle_timeout: Duration,
    connection: impl std::future::Future<Output = T>,
) -> Result<T, ConnectionRefusal> {
    let phase = Arc::new(Phase::default());
    phase.set(Some((Instant::now(), true)));
    tokio::select! {
        done = PHASE.scope(phase.clone(), connection) => Ok(done),
        why = expire(&phase, header_timeout, idle_timeout) => Err(why),
    }
}

/// Returns once the connection has waited for a head past its deadline.
async fn expire(
    phase: &Phase,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> ConnectionRefusal {
    loop {
        let changed = phase.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        match phase.awaiting() {
            None => changed.await,
            Some((since, first)) => {
                let (limit, why) = if first {
                    (header_timeout, ConnectionRefusal::HeaderTimeout)
                } else {
                    (idle_timeout, ConnectionRefusal::IdleTimeout)
                };
                tokio::select! {
                    _ = &mut changed => {}
                    _ = tokio::time::sleep_until(since + limit) => {
                        if phase.awaiting() == Some((since, first)) {
                            return why;
                        }
                    }
                }
            }
        }
    }
}

/// The proxy has a whole request head: no deadline while the request is handled.
pub fn head_arrived() {
    let _ = PHASE.try_with(|phase| phase.set(None));
}

/// The proxy has sent a response: the next head is awaited from now.
pub fn response_sent() {
    let _ = PHASE.try_with(|phase| phase.set(Some((Instant::now(), false))));
}
