//! Subject names. Every subject starts with a configurable prefix, so
//! several deployments (or tests) can share one NATS server.

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

    /// Where a gateway sends its [`crate::messages::GatewayReport`]s.
    pub fn gateway_reports(&self, gateway: &str) -> String {
        format!("{}.presence.gw.{}", self.prefix, token(gateway))
    }

    /// Every gateway's reports (presence subscribes here).
    pub fn all_gateway_reports(&self) -> String {
        format!("{}.presence.gw.*", self.prefix)
    }

    /// Presence asks every gateway for a heartbeat now (after it starts).
    pub fn presence_sync(&self) -> String {
        format!("{}.presence.sync", self.prefix)
    }

    /// Request/reply: the whole roster from presence.
    pub fn roster_request(&self) -> String {
        format!("{}.presence.roster", self.prefix)
    }

    /// Presence's [`crate::messages::Broadcast`]s to every gateway.
    pub fn broadcast(&self) -> String {
        format!("{}.broadcast", self.prefix)
    }

    /// Where a gateway persists its [`crate::messages::RecordBatch`]es.
    pub fn samples(&self, gateway: &str) -> String {
        format!("{}.samples.{}", self.prefix, token(gateway))
    }

    /// Every gateway's sample batches (the durable stream's subjects).
    pub fn all_samples(&self) -> String {
        format!("{}.samples.>", self.prefix)
    }

    /// The durable stream holding sample batches.
    pub fn samples_stream(&self) -> String {
        format!("{}_SAMPLES", self.prefix.to_uppercase().replace('-', "_"))
    }

    /// The durable consumer the recorder replicas share.
    pub fn recorder_durable(&self) -> String {
        "recorder".to_owned()
    }

    /// Request/reply: a client's history from the recorder.
    pub fn query_samples(&self) -> String {
        format!("{}.recorder.samples", self.prefix)
    }

    /// Request/reply: public statistics from the recorder.
    pub fn query_stats(&self) -> String {
        format!("{}.recorder.stats", self.prefix)
    }

    /// The key-value bucket holding the presence leader lease.
    pub fn lease_bucket(&self) -> String {
        format!("{}_leases", self.prefix.replace('-', "_"))
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
            s.gateway_reports("gw-1.example.com"),
            "t1.presence.gw.gw-1_example_com"
        );
        assert_eq!(s.samples("a b>"), "t1.samples.a_b_");
        assert_eq!(s.samples_stream(), "T1_SAMPLES");
        assert_eq!(token(""), "_");
    }
}
