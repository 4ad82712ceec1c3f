//! The system end-to-end tests of PingApp live in `tests/distributed`: the
//! real `gateway`, `presence` and `recorder` binaries as processes over a
//! real `nats-server` (JetStream, file storage) and PostgreSQL, each test
//! with its own server, database and subject prefix.
//!
//! Run with `cargo test -p pingapp-systest`; the test kit builds the
//! service binaries first if they are missing or older than their sources.
//! This library is empty: a package needs a target, and the tests need no
//! shared code beyond the test kit and their own `helpers.rs`.
