//! PingApp load generator: simulated WebSocket clients ([`run`]) and the bare
//! echo server ([`echo`]) that serves as the benchmark baseline.
//!
//! Both binaries only parse flags, install the signal handler (the shared
//! kit's [`services::shutdown::signal`]) and hand over to this library, so the integration tests drive exactly the code the
//! binaries run.

pub mod cli;
mod client;
pub mod echo;
mod runner;
pub mod summary;
mod usage;

pub use cli::{Args, Config, ConfigError, Page, Protocol};
pub use runner::run;
pub use summary::{ChurnStats, SelfUsage, Summary};
