//! Presence: the authority on who is connected to the public page across
//! all gateways.
//!
//! Gateways report connects, renames, disconnects, delay updates and
//! periodic heartbeats (their full list of public clients); presence keeps
//! the roster, expires the clients of a gateway whose heartbeats stop, and
//! broadcasts every change, delay updates coalesced once per roster tick.
//! Every replica keeps the whole roster; the one holding the lease
//! publishes. After a restart presence rebuilds its roster from heartbeats
//! without announcing anyone twice, then publishes a snapshot so gateways
//! reconcile.
//!
//! [`roster`] is the pure state machine; [`Presence`] wires it to the bus;
//! [`PresenceCli`] is the `presence` binary's command line, which gives the
//! plain [`PresenceConfig`].

mod config;
mod lease;
mod metrics;
pub mod roster;
mod service;

pub use config::PresenceCli;
pub use service::{Presence, PresenceConfig, default_replica_id};
