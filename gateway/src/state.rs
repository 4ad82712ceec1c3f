//! What the routes of one gateway share: its settings and a handle to each
//! of its parts. Every part owns its own state behind its own interface;
//! nothing here is locked.

use std::sync::Arc;

use services::bus::SharedBus;
use services::subjects::Subjects;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::caps::Caps;
use crate::config::GatewayArgs;
use crate::guard::{IpBudget, IpLimits, OriginPolicy};
use crate::metrics::GatewayMetrics;
use crate::persist::Records;
use crate::room::Room;

/// The axum state of the public listener.
pub struct Shared {
    /// Limits and timings.
    pub(crate) args: GatewayArgs,
    /// This gateway's id.
    pub(crate) gateway_id: String,
    /// Subject names (the API's queries to the recorder).
    pub(crate) subjects: Subjects,
    /// The bus (the API's queries to the recorder).
    pub(crate) bus: SharedBus,
    /// Metric families.
    pub(crate) metrics: GatewayMetrics,
    /// The public room: roster copy, local fan-out, reports to presence.
    pub(crate) room: Arc<Room>,
    /// Accepted records on their way to the durable stream.
    pub(crate) records: Records,
    /// Cancelled when the gateway starts draining.
    pub(crate) shutdown: CancellationToken,
    /// Which browser origins may open WebSockets.
    pub(crate) origins: OriginPolicy,
    /// The gateway's connection caps.
    pub(crate) caps: Caps,
    /// Per-IP connection caps.
    pub(crate) ip_limits: Arc<IpLimits>,
    /// Per-IP budget of API requests.
    pub(crate) api_budget: IpBudget,
    /// Every connection task, so the drain can wait for them.
    pub(crate) tracker: TaskTracker,
}
