//! The delivery path: from a due delivery in the spool to an upstream's 2xx or a dead letter.
//!
//! [`dispatcher`] runs one lane per (action, upstream), each with its own concurrency limit,
//! so a slow or dead upstream never holds up another. [`client`] makes one attempt; [`retry`]
//! decides what follows; [`when`] and [`template`] decide whether and what to send.

pub mod client;
pub mod dispatcher;
pub mod order;
pub mod path;
pub mod projection;
pub mod report;
pub mod request;
pub mod retry;
pub mod schema;
pub mod template;
pub mod when;

/// How a delivery step ended: the `outcome` label of `actiongate_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryOutcome {
    Delivered,
    Retried,
    DeadLettered,
    Skipped,
}

impl DeliveryOutcome {
    pub const ALL: [DeliveryOutcome; 4] = [
        DeliveryOutcome::Delivered,
        DeliveryOutcome::Retried,
        DeliveryOutcome::DeadLettered,
        DeliveryOutcome::Skipped,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retried => "retried",
            DeliveryOutcome::DeadLettered => "dead_lettered",
            DeliveryOutcome::Skipped => "skipped",
        }
    }
}
