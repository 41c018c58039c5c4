//! Who may hold a connection. A peer that no action allows (and that is no trusted proxy) is
//! closed right after `accept()`, before TLS and before a byte is read, unless a `fallback`
//! takes other traffic; and open connections are capped in all and per peer, so that no single
//! host can use up the descriptors Flashduty's pushes need.
//!
//! The check runs inside Pingora's accept loop (a `ConnectionFilter`): it reads the ingress
//! and config in force and a few counters, and takes no lock but the per-peer count's.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use pingora_core::listeners::ConnectionFilter;

use super::refusals::{RefusalLog, Verdict};
use crate::metrics::{ConnectionRefusal, Metrics};
use crate::ActionGate;

/// Open connections counted by peer, and the caps on them.
pub struct ConnectionGuard {
    gate: ActionGate,
    metrics: Arc<Metrics>,
    /// `limits.max_connections` when the config leaves it out: 80 % of the open-files limit.
    default_max: usize,
    total: AtomicUsize,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    refusals: RefusalLog,
}

/// A counted connection; uncounted when dropped.
pub struct Open {
    guard: Arc<ConnectionGuard>,
    peer: IpAddr,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.guard.total.fetch_sub(1, Ordering::AcqRel);
        self.guard.metrics.connection_open(false);
        if let Ok(mut peers) = self.guard.per_peer.lock() {
            if let Some(n) = peers.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    peers.remove(&self.peer);
                }
            }
        }
    }
}

impl ConnectionGuard {
    /// `open_files` is the process's (raised) soft limit on descriptors.
    pub fn new(gate: ActionGate, open_files: u64) -> Arc<ConnectionGuard> {
        let default_max = usize::try_from(open_files.saturating_mul(8) / 10).unwrap_or(usize::MAX);
        Arc::new(ConnectionGuard {
            metrics: gate.metrics().clone(),
            gate,
            default_max: default_max.max(1),
            total: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            refusals: RefusalLog::default(),
        })
    }

    /// The cap on all connections in force.
    pub fn max_connections(&self) -> usize {
        self.gate
            .config()
            .limits
            .max_connections
            .unwrap_or(self.default_max)
    }

    /// Why a connection from `peer` must be closed now, if it must.
    fn refusal(&self, peer: IpAddr) -> Option<ConnectionRefusal> {
        let config = self.gate.config();
        let ingress = self.gate.ingress();
        let trusted = ingress.is_trusted_proxy(peer);
        if config.fallback.is_none() && !trusted && !ingress.admits(peer) {
            return Some(ConnectionRefusal::Source);
        }
        let max = config.limits.max_connections.unwrap_or(self.default_max);
        if self.total.load(Ordering::Acquire) >= max {
            return Some(ConnectionRefusal::Limit);
        }
        if !trusted {
            let open = self
                .per_peer
                .lock()
                .map(|p| p.get(&peer).copied().unwrap_or(0))
                .unwrap_or(0);
            if open >= config.limits.max_connections_per_source {
                return Some(ConnectionRefusal::PerSource);
            }
        }
        None
    }

    /// The limits in force.
    pub fn limits(&self) -> crate::config::Limits {
        self.gate.config().limits
    }

    /// Counts a connection closed for a timeout, and logs it unless it was only idle (a
    /// pooled keep-alive connection reaching idle_timeout is ordinary, not an attack).
    pub fn cut(&self, peer: SocketAddr, why: ConnectionRefusal) {
        if why == ConnectionRefusal::IdleTimeout {
            self.metrics.connection_refused(why);
            return;
        }
        self.refused(peer.ip().to_canonical(), why);
    }

    /// Counts a refusal, and logs it at most once per peer and reason every 10 s.
    fn refused(&self, peer: IpAddr, why: ConnectionRefusal) {
        self.metrics.connection_refused(why);
        if let Verdict::Log(count) = self.refusals.refused(peer, why.label(), Instant::now()) {
            log::info!(
                target: "actiongate::connection",
                client:% = peer,
                reason = why.label(),
                refused = count;
                "connections closed"
            );
        }
    }

    /// Counts a connection the listener took, or refuses it (connections that passed the
    /// filter together can overshoot a cap; this is where that is caught).
    pub fn open(self: &Arc<Self>, peer: SocketAddr) -> Option<Open> {
        let peer = peer.ip().to_canonical();
        if let Some(why) = self.refusal(peer) {
            self.refused(peer, why);
            return None;
        }
        self.total.fetch_add(1, Ordering::AcqRel);
        self.metrics.connection_open(true);
        if let Ok(mut peers) = self.per_peer.lock() {
            *peers.entry(peer).or_insert(0) += 1;
        }
        Some(Open {
            guard: self.clone(),
            peer,
        })
    }
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("open", &self.total.load(Ordering::Relaxed))
            .finish()
    }
}

/// The accept-time check, for Pingora's listener.
#[derive(Debug, Clone)]
pub struct AcceptFilter(pub Arc<ConnectionGuard>);

#[async_trait]
impl ConnectionFilter for AcceptFilter {
    async fn should_accept(&self, addr: Option<&SocketAddr>) -> bool {
        let Some(addr) = addr else {
            return true;
        };
        let peer = addr.ip().to_canonical();
        match self.0.refusal(peer) {
            None => true,
            Some(why) => {
                self.0.refused(peer, why);
                false
            }
        }
    }
}
