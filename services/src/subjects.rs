//! Subject names, each with the message type that travels on it (the
//! table "Subjects and messages" in `docs/architecture.md` lists them).
//! Every subject starts with a configurable prefix, so several deployments
//! (or tests) can share one NATS server.

use crate::bus::{DurableStream, LeaseKey, Service, Topic};
use crate::messages::{
    Broadcast, DeviceHistoryQuery, DeviceHistoryReply, ForgetDeviceQuery, ForgetDeviceReply,
    GatewayReport, HeartbeatRequest, RecordBatch, RosterReply, RosterRequest, SamplesQuery,
    SamplesReply, StatsQuery, StatsReply,
};

/// The subjects of one deployment.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `prefix` (a valid subject token, e.g. `pingapp`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: token(prefix),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where a gateway sends its [`GatewayReport`]s (one subject per
    /// gateway keeps its reports in order).
    pub fn gateway_reports(&self, gateway: &str) -> Topic<GatewayReport> {
        Topic::new(format!("{}.presence.gw.{}", self.prefix, token(gateway)))
    }

    /// Every gateway's reports (presence subscribes here).
    pub fn all_gateway_reports(&self) -> Topic<GatewayReport> {
        Topic::new(format!("{}.presence.gw.*", self.prefix))
    }

    /// Presence asks every gateway for a heartbeat now (after it starts).
    pub fn presence_sync(&self) -> Topic<HeartbeatRequest> {
        Topic::new(format!("{}.presence.sync", self.prefix))
    }

    /// Request/reply: the whole roster from presence.
    pub fn roster_request(&self) -> Service<RosterRequest, RosterReply> {
        Service::new(format!("{}.presence.roster", self.prefix))
    }

    /// Presence's [`Broadcast`]s to every gateway.
    pub fn broadcast(&self) -> Topic<Broadcast> {
        Topic::new(format!("{}.broadcast", self.prefix))
    }

    /// Where a gateway persists its [`RecordBatch`]es (captured by
    /// [`Subjects::samples_stream`]).
    pub fn samples(&self, gateway: &str) -> Topic<RecordBatch> {
        Topic::new(format!("{}.samples.{}", self.prefix, token(gateway)))
    }

    /// The durable stream holding every gateway's sample batches.
    pub fn samples_stream(&self) -> DurableStream<RecordBatch> {
        DurableStream::new(
            format!("{}_SAMPLES", self.prefix.to_uppercase().replace('-', "_")),
            format!("{}.samples.>", self.prefix),
        )
    }

    /// The durable consumer the recorder replicas share.
    pub fn recorder_durable(&self) -> String {
        "recorder".to_owned()
    }

    /// Request/reply: a client's history from the recorder.
    pub fn query_samples(&self) -> Service<SamplesQuery, SamplesReply> {
        Service::new(format!("{}.recorder.samples", self.prefix))
    }

    /// Request/reply: public statistics from the recorder.
    pub fn query_stats(&self) -> Service<StatsQuery, StatsReply> {
        Service::new(format!("{}.recorder.stats", self.prefix))
    }

    /// Request/reply: a browser's own history (its device) from the recorder.
    pub fn query_device_history(&self) -> Service<DeviceHistoryQuery, DeviceHistoryReply> {
        Service::new(format!("{}.recorder.device_history", self.prefix))
    }

    /// Request/reply: forget a browser (delete its device's samples).
    pub fn forget_device(&self) -> Service<ForgetDeviceQuery, ForgetDeviceReply> {
        Service::new(format!("{}.recorder.forget_device", self.prefix))
    }

    /// The key-value bucket holding this deployment's leases.
    pub fn lease_bucket(&self) -> String {
        format!("{}_leases", self.prefix.replace('-', "_"))
    }

    /// The presence leader lease.
    pub fn presence_lease(&self) -> LeaseKey {
        LeaseKey::new(self.lease_bucket(), "presence")
    }
}

/// Makes `s` one valid subject token: `.`, `*`, `>` and white space become `_`.
pub fn token(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| match c {
            '.' | '*' | '>' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect();
    if t.is_empty() { "_".to_owned() } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_ids_become_single_tokens() {
        let s = Subjects::new("t1");
        assert_eq!(
            s.gateway_reports("gw-1.example.com").subject(),
            "t1.presence.gw.gw-1_example_com"
        );
        assert_eq!(s.samples("a b>").subject(), "t1.samples.a_b_");
        assert_eq!(s.samples_stream().name(), "T1_SAMPLES");
        assert_eq!(s.samples_stream().subjects(), "t1.samples.>");
        let lease = Subjects::new("t-1").presence_lease();
        assert_eq!((lease.bucket(), lease.key()), ("t_1_leases", "presence"));
        assert_eq!(token(""), "_");
    }
}
