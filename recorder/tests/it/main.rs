//! The recorder's integration tests, in one binary: the store contract
//! against SQLite and Postgres, and the service over NATS and the in-memory
//! bus. Needs the machine's PostgreSQL and NATS (with JetStream) servers;
//! see `it/helpers.rs` for the environment variables.

#[macro_use]
mod helpers;
mod deadline;
mod devices;
mod migration;
mod pack_race;
mod packing;
mod roles;
mod service;
mod store;
mod tiers;
mod tls;
