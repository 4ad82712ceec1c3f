//! The shared kit every PingApp service is built from.
//!
//! A reader should find any message type in one place: the browser protocol
//! lives in [`protocol`], the messages the services exchange over the bus in
//! [`messages`], and the subjects they travel on in [`subjects`]. The [`bus`]
//! is the one seam between the services: the standalone binary injects the
//! in-memory implementation, the distributed services inject NATS.

pub mod admin;
pub mod bus;
pub mod config;
pub mod ids;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod shutdown;
pub mod stats;
pub mod subjects;
pub mod telemetry;

/// Milliseconds since the Unix epoch, as the wire protocol carries time.
pub fn unix_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Microseconds since the Unix epoch, as samples are stored.
pub fn unix_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
