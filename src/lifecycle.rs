//! Shutdown as a first-class value: readiness, draining, and the work still in flight.
//!
//! On SIGTERM or SIGINT the gateway turns not-ready (`/readyz` 503, new action requests 503
//! with `Retry-After`), lets in-flight requests finish and gives in-flight delivery attempts
//! `server.grace_period`; then Pingora closes the listeners and the process exits. Whatever was
//! not delivered stays in the spool for the next start.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;

use crate::ActionGate;

/// Pingora's shutdown timing for a server that runs actiongate, embedded or not. Pingora
/// sleeps `grace_period_seconds` after closing its listeners, unconditionally, then gives its
/// runtimes `graceful_shutdown_timeout_seconds`; its defaults (60 s and 300 s) keep a drained
/// process alive for minutes. SIGTERM has drained actiongate by then ([`DrainOnSignal`]), so
/// the sleep is only the bound for requests still in flight at a graceful upgrade.
pub fn set_shutdown_timing(
    conf: &mut pingora_core::server::configuration::ServerConf,
    grace: Duration,
) {
    conf.grace_period_seconds = Some(grace.as_secs().max(1));
    conf.graceful_shutdown_timeout_seconds = Some(1);
}

/// Shared by the ingress, the dispatcher, the admin listener and the signal handler.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// New action requests are refused (503) and `/readyz` says so.
    draining: AtomicBool,
    /// Lanes start no new attempt. Set with `draining`, or alone when a graceful upgrade
    /// hands the work over to the next process while this one still answers.
    deliveries_stopped: AtomicBool,
    /// The main listener has stopped accepting and let go of idle connections.
    listeners_closed: AtomicBool,
    requests: AtomicUsize,
    deliveries: AtomicUsize,
    /// Connections open on the main listener (embedders' own listeners are not counted).
    connections: AtomicUsize,
    changed: Notify,
}

/// Counts one unit of in-flight work while it lives.
#[must_use]
pub struct InFlight<'a> {
    lifecycle: &'a Lifecycle,
    counter: &'a AtomicUsize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
        self.lifecycle.changed.notify_waiters();
    }
}

impl Lifecycle {
    pub fn new() -> Arc<Lifecycle> {
        Arc::new(Lifecycle::default())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops taking new work.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.stop_deliveries();
    }

    /// Stops starting delivery attempts; requests are still answered.
    pub fn stop_deliveries(&self) {
        self.deliveries_stopped.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub fn deliveries_stopped(&self) -> bool {
        self.deliveries_stopped.load(Ordering::Acquire)
    }

    /// Marks a connection on the main listener as open.
    pub fn connection(&self) -> InFlight<'_> {
        self.connections.fetch_add(1, Ordering::AcqRel);
        InFlight {
            lifecycle: self,
            counter: &self.connections,
        }
    }

    /// The main listener accepts no more connections and has closed the idle ones.
    pub fn close_listeners(&self) {
        self.listeners_closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether every connection the main listener accepted has been served and closed.
    pub fn served(&self) -> bool {
        self.listeners_closed.load(Ordering::Acquire)
            && self.connections.load(Ordering::Acquire) == 0
    }

    /// Marks a request to an action path as in flight.
    pub fn request(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::AcqRel);
        InFlight {
            lifecycle: self,
            counter: &self.requests,
        }
    }

    /// Marks a delivery attempt as in flight.
    pub fn delivery(&self) -> InFlight<'_> {
        self.deliveries.fetch_add(1, Ordering::AcqRel);
        InFlight {
            lifecycle: self,
            counter: &self.deliveries,
        }
    }

    pub fn in_flight(&self) -> (usize, usize) {
        (
            self.requests.load(Ordering::Acquire),
            self.deliveries.load(Ordering::Acquire),
        )
    }

    /// Resolves once delivery attempts are to stop.
    pub async fn deliveries_stopping(&self) {
        wait_until(&self.changed, || self.deliveries_stopped()).await;
    }

    /// Waits until no request or delivery is in flight, or `grace` has passed. Returns whether
    /// everything finished.
    pub async fn drained(&self, grace: Duration) -> bool {
        let wait = wait_until(&self.changed, || self.in_flight() == (0, 0));
        tokio::time::timeout(grace, wait).await.is_ok()
    }
}

/// Waits until `done()` holds, looking again whenever `changed` is notified. The wake-up is
/// registered before each look, so a change in between is never missed.
pub async fn wait_until(changed: &Notify, done: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// What SIGHUP does; the stand-alone gateway reloads its config file (`reload.rs`).
#[async_trait]
pub trait OnHangup: Send + Sync {
    async fn hangup(&self);
}

/// Pingora's shutdown trigger, replaced so that SIGTERM and SIGINT both drain first.
///
/// Pingora's own handler closes listeners at once and then sleeps the whole grace period
/// unconditionally; draining here instead lets an idle gateway stop in milliseconds and a busy
/// one take exactly as long as its in-flight work needs, up to the grace period.
pub struct DrainOnSignal {
    gate: ActionGate,
    on_hangup: Option<Box<dyn OnHangup>>,
}

impl DrainOnSignal {
    pub fn new(gate: ActionGate) -> DrainOnSignal {
        DrainOnSignal {
            gate,
            on_hangup: None,
        }
    }

    /// Runs `handler` on SIGHUP. Without one, SIGHUP is logged and ignored (its default
    /// action would kill the process without draining).
    pub fn on_hangup(mut self, handler: impl OnHangup + 'static) -> DrainOnSignal {
        self.on_hangup = Some(Box::new(handler));
        self
    }
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int), Ok(mut quit), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
            signal(SignalKind::hangup()),
        ) else {
            log::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        let lifecycle = self.gate.lifecycle();
        let name = loop {
            tokio::select! {
                _ = term.recv() => break "SIGTERM",
                _ = int.recv() => break "SIGINT",
                _ = quit.recv() => {
                    // No drain here: Pingora first hands the listeners over, then keeps
                    // serving on them beside the new process for a few seconds. Refusing
                    // requests in that window would fail them for nothing.
                    log::info!("SIGQUIT: handing the listeners over for a graceful upgrade");
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = hup.recv() => match &self.on_hangup {
                    Some(handler) => handler.hangup().await,
                    None => log::warn!("SIGHUP ignored: no reload handler is installed"),
                },
            }
        };
        let grace = self.gate.config().server.grace_period;
        log::info!("{name}: draining (grace period {grace:?})");
        lifecycle.begin_drain();
        let finished = lifecycle.drained(grace).await;
        let (requests, deliveries) = lifecycle.in_flight();
        if finished {
            log::info!("drained; stopping");
        } else {
            log::warn!(
                "grace period over with {requests} requests and {deliveries} delivery attempts in flight; \
                 they stay in the spool for the next start"
            );
        }
        ShutdownSignal::GracefulTerminate
    }
}
