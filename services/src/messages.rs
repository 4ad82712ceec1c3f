//! Messages the services exchange over the bus. JSON, so a `nats sub`
//! shows what travels; each type says on which subject it travels and who
//! publishes it (see `docs/architecture.md`, "Subjects and messages").
//!
//! Every type here implements [`Payload`], and
//! [`crate::subjects::Subjects`] pairs it with its subject: the typed bus
//! ([`crate::bus::Topic`], [`crate::bus::Service`]) encodes and decodes,
//! so services never handle the bytes.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::bus::Payload;
use crate::stats::DelayStats;

/// Encodes a bus message as JSON (what [`Payload::encode`] does for the
/// JSON messages).
pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(msg).expect("bus messages serialize"))
}

/// Decodes a bus message.
///
/// # Errors
/// The payload is not a valid `T`.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(payload)
}

/// The JSON messages.
macro_rules! json_payload {
    ($($t:ty),* $(,)?) => {
        $(
            impl Payload for $t {
                fn encode(&self) -> Bytes {
                    encode(self)
                }

                fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
                    decode(payload)
                }
            }
        )*
    };
}

json_payload!(
    GatewayReport,
    Broadcast,
    RosterReply,
    RecordBatch,
    SamplesQuery,
    SamplesReply,
    StatsQuery,
    StatsReply,
    DeviceHistoryQuery,
    DeviceHistoryReply,
    ForgetDeviceQuery,
    ForgetDeviceReply,
);

/// The messages whose default value travels as an empty payload (what an
/// older sender sends, and what an older receiver expects): an empty
/// payload decodes as the default, anything else as JSON.
macro_rules! empty_when_default {
    ($($t:ty),* $(,)?) => {
        $(
            impl Payload for $t {
                fn encode(&self) -> Bytes {
                    if *self == Self::default() {
                        Bytes::new()
                    } else {
                        encode(self)
                    }
                }

                fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
                    if payload.is_empty() {
                        Ok(Self::default())
                    } else {
                        decode(payload)
                    }
                }
            }
        )*
    };
}

empty_when_default!(HeartbeatRequest, RosterRequest);

/// Presence asks gateways for their full client list now, on
/// `{prefix}.presence.sync`: every gateway (after presence starts, or after
/// its bus connection came back: an empty payload, what older presences
/// send) or one gateway (its heartbeat's count or digest differs from what
/// presence holds for it). A gateway answers with its list in
/// [`GatewayUpdate::Clients`] pieces (docs/architecture.md, "How the
/// roster converges"); an older gateway answers any request with a
/// heartbeat listing every client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// The one gateway asked; `None`: every gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl HeartbeatRequest {
    /// Whether gateway `id` is asked.
    pub fn asks(&self, id: &str) -> bool {
        self.gateway.as_deref().is_none_or(|g| g == id)
    }
}

/// A request for the roster, on `{prefix}.presence.roster`, answered with
/// a [`RosterReply`]: one page of clients in id order, after the cursor
/// `after`, at most `limit` of them (presence caps it with
/// `--max-roster-page`). An empty payload (no `limit`, what older gateways
/// send) asks for the whole roster in one reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterRequest {
    /// Only clients whose id sorts after this one (the `next` of the
    /// previous page); `None`: from the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many clients; `None`: the whole roster (legacy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One client's share of an order-independent digest of a set of clients
/// by id and name: the set's digest is the XOR of this over its clients.
/// Kept incrementally (XOR a client in when it joins, out when it leaves,
/// both on a rename), so a heartbeat or a periodic roster digest costs
/// O(1) to compute and to send. The first 8 bytes (little-endian) of the
/// SHA-256 of the id's length (8 bytes, little-endian), the id and the
/// name: the same in every process and version.
pub fn client_digest(channel_name: &str, name: &str) -> u64 {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update((channel_name.len() as u64).to_le_bytes());
    h.update(channel_name.as_bytes());
    h.update(name.as_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out[..8].try_into().expect("8 bytes"))
}

/// A public client as the roster knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterClient {
    /// Its id.
    pub channel_name: String,
    /// Its display name.
    pub name: String,
    /// The gateway it is connected to.
    pub gateway: String,
    /// When it connected, Unix ms.
    pub connected_at_ms: i64,
    /// Its latest delay statistics, once it has reported one.
    #[serde(default)]
    pub stats: Option<DelayStats>,
}

/// What a gateway tells presence, on `{prefix}.presence.gw.{gateway}`.
/// One subject per gateway keeps its reports in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayReport {
    /// The reporting gateway's id.
    pub gateway: String,
    /// Increases by one with every report of this gateway's process, so
    /// presence can tell a stale heartbeat from a newer event.
    pub seq: u64,
    /// What happened.
    pub update: GatewayUpdate,
}

/// The content of a [`GatewayReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayUpdate {
    /// A public client joined.
    Connect {
        /// The client.
        client: RosterClient,
    },
    /// A public client renamed itself.
    Rename {
        /// Its id.
        channel_name: String,
        /// The new name.
        name: String,
    },
    /// A public client left.
    Disconnect {
        /// Its id.
        channel_name: String,
    },
    /// The public clients whose delay changed in the last roster tick. A
    /// gateway sends one at every tick, empty or not, so that presence can
    /// broadcast a tick's updates as soon as every gateway closed it.
    Delays {
        /// New statistics by client id.
        delays: BTreeMap<String, DelayStats>,
        /// The wall-clock roster tick this report closes (Unix ms, a
        /// multiple of the tick period). Absent from older gateways:
        /// presence then waits for its own deadline.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tick_ms: Option<i64>,
    },
    /// Sent periodically: the gateway is alive, with the count and the
    /// [`client_digest`] of its public clients (O(1) bytes). Presence
    /// expires a gateway whose heartbeats stop, and asks a gateway whose
    /// count or digest differs from its own record for its full list
    /// ([`HeartbeatRequest`]). An older gateway's heartbeat has no count
    /// and lists every client instead; presence reconciles with that list.
    Heartbeat {
        /// All public clients of the gateway (older gateways only; empty
        /// and left out when `count` is given).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        clients: Vec<RosterClient>,
        /// How often heartbeats come; presence expires the gateway after
        /// three missed ones.
        interval_ms: u64,
        /// How many public clients the gateway holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        /// XOR of [`client_digest`] over them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<u64>,
    },
    /// One piece of the gateway's full client list, sent when presence asks
    /// ([`HeartbeatRequest`]): pieces `0, 1, …` of at most
    /// `--presence-piece-clients` clients each, in consecutive reports, the
    /// last one marked. Presence replaces the gateway's clients with the
    /// pieces' union when the last arrives.
    Clients {
        /// The piece's number, from 0.
        part: u32,
        /// Whether this is the last piece.
        last: bool,
        /// The clients of this piece.
        clients: Vec<RosterClient>,
    },
    /// The gateway is shutting down: all its clients are gone.
    Goodbye,
}

/// What presence tells every gateway, on `{prefix}.broadcast`. One subject
/// keeps every client's events in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Broadcast {
    /// A client joined.
    Connect {
        /// The client.
        client: RosterClient,
    },
    /// A client renamed itself.
    Rename {
        /// Its id.
        channel_name: String,
        /// The new name.
        name: String,
    },
    /// A client left or was expired.
    Disconnect {
        /// Its id.
        channel_name: String,
    },
    /// Coalesced delay updates of one roster tick.
    Delays {
        /// New statistics by client id.
        delays: BTreeMap<String, DelayStats>,
    },
    /// The whole roster: gateways reconcile their copy with it. Sent by
    /// older presences only (when a replica took over, and periodically);
    /// a gateway now builds one itself from [`RosterReply`] pages.
    Snapshot {
        /// Every public client.
        clients: Vec<RosterClient>,
    },
    /// The count and digest of the whole roster (XOR of [`client_digest`]
    /// over every client), sent periodically and when a replica takes over.
    /// A gateway whose copy differs fetches the roster in pages
    /// ([`RosterRequest`]) and reconciles.
    Digest {
        /// Number of clients.
        count: u64,
        /// XOR of [`client_digest`] over them.
        digest: u64,
    },
}

/// Reply to a roster request on `{prefix}.presence.roster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RosterReply {
    /// The page's clients, in id order (the whole roster for a request
    /// without a limit).
    pub clients: Vec<RosterClient>,
    /// The cursor of the next page (the `after` of the next request);
    /// `None` on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A client as the recorder stores it: whether it is public and the digest
/// of its token, so history reads can be authorized on any gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Its id.
    pub channel_name: String,
    /// Public clients' samples are readable by anyone.
    pub public: bool,
    /// SHA-256 hex of the client's token (v2 clients only).
    pub token_digest: Option<String>,
    /// The gateway it connected to.
    pub gateway: String,
    /// When it connected, Unix µs.
    pub connected_at_us: i64,
    /// The browser identity this connection presented (the `device`
    /// command, docs/protocol.md): [`crate::ids::device_digest`] of its
    /// secret. Every connection of one browser carries the same digest, so
    /// its history survives reloads. Absent: the connection is its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// One delay sample accepted by a gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// The client's id.
    pub channel_name: String,
    /// The gateway's own counter of this client's samples: with the id, the
    /// unique key that makes redelivery harmless.
    pub n: u64,
    /// The ping the client says it measured.
    pub seq: Option<u64>,
    /// When the gateway accepted it, Unix µs.
    pub at_us: i64,
    /// The delay in milliseconds.
    pub delay_ms: f64,
    /// Whether the client is public (private samples never enter stats).
    pub public: bool,
}

/// A batch of records a gateway persists on `{prefix}.samples.{gateway}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecordBatch {
    /// The gateway that accepted these records.
    pub gateway: String,
    /// New clients (written before the samples).
    #[serde(default)]
    pub clients: Vec<ClientRecord>,
    /// Accepted samples.
    #[serde(default)]
    pub samples: Vec<SampleRecord>,
}

impl RecordBatch {
    /// No records at all.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.samples.is_empty()
    }
}

/// A history request on `{prefix}.recorder.samples`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplesQuery {
    /// Whose samples.
    pub channel_name: String,
    /// The digest ([`crate::ids::token_digest`]) of the bearer token
    /// presented, if any: the token itself never crosses the bus
    /// (docs/security.md, "The bus"). An older gateway's `token` field is
    /// ignored, so its private reads answer 404 until it is upgraded.
    #[serde(default)]
    pub token_digest: Option<String>,
    /// Only samples at or after this time, Unix µs.
    pub since_us: Option<i64>,
    /// At most this many, oldest first.
    pub limit: u32,
    /// When the asker stops waiting, Unix ms (the gateway's request
    /// timeout from when it asked): the recorder reads no longer than this
    /// (and its own `--read-timeout-ms`), and not at all once it has
    /// passed (docs/architecture.md, "Bounds"). `None` (an older gateway):
    /// the read timeout alone. Compared with the recorder's clock, so
    /// skewed clocks shorten or lengthen it by their skew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<i64>,
}

/// One persisted sample as the API returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSample {
    /// When it was accepted, Unix µs.
    pub at_us: i64,
    /// Milliseconds.
    pub delay_ms: f64,
    /// The client's ping sequence number.
    pub seq: Option<u64>,
}

/// Reply to a [`SamplesQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SamplesReply {
    /// The client exists and the caller may read it.
    Found {
        /// Oldest first.
        samples: Vec<StoredSample>,
    },
    /// Unknown id, or a private client without its token.
    NotFound,
    /// The recorder refused or could not answer the query.
    Error {
        /// Whose fault: the query's (the API answers 400) or the
        /// recorder's (503).
        #[serde(default)]
        kind: ReplyErrorKind,
        /// What went wrong.
        message: String,
    },
}

/// A statistics request on `{prefix}.recorder.stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsQuery {
    /// How far back, milliseconds.
    pub window_ms: u64,
    /// Bucket width, milliseconds.
    pub bucket_ms: u64,
    /// When the asker stops waiting, Unix ms (the gateway's request
    /// timeout from when it asked): the recorder reads no longer than this
    /// (and its own `--read-timeout-ms`), and not at all once it has
    /// passed (docs/architecture.md, "Bounds"). `None` (an older gateway):
    /// the read timeout alone. Compared with the recorder's clock, so
    /// skewed clocks shorten or lengthen it by their skew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<i64>,
}

/// Public samples of one time bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsBucket {
    /// Bucket start, Unix µs.
    pub start_us: i64,
    /// Number of samples.
    pub count: u64,
    /// Smallest delay, ms.
    pub min: f64,
    /// Median, ms.
    pub p50: f64,
    /// 95th percentile, ms.
    pub p95: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Largest delay, ms.
    pub max: f64,
}

/// Reply to a [`StatsQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum StatsReply {
    /// Buckets with at least one sample, oldest first.
    Ok {
        /// The buckets.
        buckets: Vec<StatsBucket>,
    },
    /// The recorder refused or could not answer the query.
    Error {
        /// Whose fault: the query's (the API answers 400) or the
        /// recorder's (503).
        #[serde(default)]
        kind: ReplyErrorKind,
        /// What went wrong.
        message: String,
    },
}

/// A browser's own history over a window, on
/// `{prefix}.recorder.device_history` (docs/protocol.md, "Your history").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceHistoryQuery {
    /// [`crate::ids::device_digest`] of the secret presented: the secret
    /// never crosses the bus.
    pub device: String,
    /// How far back, milliseconds (bounds: [`crate::limits::check_device_history`]).
    pub window_ms: u64,
    /// Bucket width, milliseconds.
    pub bucket_ms: u64,
    /// When the asker stops waiting, Unix ms: as
    /// [`SamplesQuery::deadline_unix_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<i64>,
}

/// One bucket of a browser's own history: every sample of every
/// connection of that browser in `[start_us, start_us + bucket)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryBucket {
    /// Bucket start, Unix µs.
    pub start_us: i64,
    /// Number of samples.
    pub count: u64,
    /// Smallest delay, ms.
    pub min: f64,
    /// Mean delay, ms.
    pub mean: f64,
    /// Median, ms (exact or within the rollup sketch's bound).
    pub p50: f64,
    /// 95th percentile, ms.
    pub p95: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Largest delay, ms.
    pub max: f64,
    /// Mean absolute difference of consecutive samples, ms; `None` with
    /// fewer than two samples.
    pub jitter: Option<f64>,
}

/// Reply to a [`DeviceHistoryQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DeviceHistoryReply {
    /// The device has stored samples: buckets with at least one sample,
    /// oldest first.
    Found {
        /// The buckets.
        buckets: Vec<HistoryBucket>,
    },
    /// No device with that digest (never stored a sample, forgotten, or a
    /// wrong secret: the same answer).
    NotFound,
    /// The recorder refused or could not answer the query.
    Error {
        /// Whose fault.
        #[serde(default)]
        kind: ReplyErrorKind,
        /// What went wrong.
        message: String,
    },
}

/// Forget a browser: delete every sample and rollup of every connection
/// that presented this device, on `{prefix}.recorder.forget_device`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForgetDeviceQuery {
    /// [`crate::ids::device_digest`] of the secret presented.
    pub device: String,
    /// When the asker stops waiting, Unix ms: a forget that comes after it
    /// is not done (the asker was told 503 and may ask again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix_ms: Option<i64>,
}

/// Reply to a [`ForgetDeviceQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ForgetDeviceReply {
    /// Deleted.
    Forgotten {
        /// How many connections (channels) of the device were deleted.
        channels: u64,
    },
    /// No device with that digest.
    NotFound,
    /// The recorder refused or could not answer the query.
    Error {
        /// Whose fault.
        #[serde(default)]
        kind: ReplyErrorKind,
        /// What went wrong.
        message: String,
    },
}

/// Why a query got an `Error` reply: the gateway's HTTP API answers 400 for
/// [`ReplyErrorKind::BadRequest`] and 503 for
/// [`ReplyErrorKind::Unavailable`] (`docs/protocol.md`, "HTTP API").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyErrorKind {
    /// The query is malformed or outside the bounds of [`crate::limits`]:
    /// asking again will not help.
    BadRequest,
    /// The recorder cannot answer now (its database is down or failed);
    /// also what a reply without a kind (an older recorder) means.
    #[default]
    Unavailable,
    /// The recorder's read budget is spent (`--read-concurrency`): ask
    /// again in a moment. The gateway answers 429 with `Retry-After`.
    Busy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let r = GatewayReport {
            gateway: "g".into(),
            seq: 3,
            update: GatewayUpdate::Heartbeat {
                clients: vec![RosterClient {
                    channel_name: "a".into(),
                    name: "A".into(),
                    gateway: "g".into(),
                    connected_at_ms: 1,
                    stats: None,
                }],
                interval_ms: 2000,
                count: None,
                digest: None,
            },
        };
        assert_eq!(decode::<GatewayReport>(&encode(&r)).unwrap(), r);
        let b = Broadcast::Disconnect {
            channel_name: "a".into(),
        };
        assert_eq!(decode::<Broadcast>(&encode(&b)).unwrap(), b);
        let q = SamplesReply::NotFound;
        assert_eq!(decode::<SamplesReply>(&encode(&q)).unwrap(), q);
    }

    #[test]
    fn requests_keep_their_empty_legacy_form() {
        assert!(HeartbeatRequest::default().encode().is_empty());
        assert!(RosterRequest::default().encode().is_empty());
        assert_eq!(
            HeartbeatRequest::decode(b"").unwrap(),
            HeartbeatRequest::default()
        );
        let one = HeartbeatRequest {
            gateway: Some("g".into()),
        };
        assert_eq!(HeartbeatRequest::decode(&one.encode()).unwrap(), one);
        assert!(one.asks("g") && !one.asks("h"));
        assert!(HeartbeatRequest::default().asks("h"));
        let page = RosterRequest {
            after: Some("a".into()),
            limit: Some(10),
        };
        assert_eq!(RosterRequest::decode(&page.encode()).unwrap(), page);
    }

    #[test]
    fn a_digest_heartbeat_has_no_list_and_a_legacy_one_still_decodes() {
        let hb = GatewayUpdate::Heartbeat {
            clients: vec![],
            interval_ms: 2000,
            count: Some(10_000),
            digest: Some(u64::MAX),
        };
        let json = serde_json::to_string(&hb).unwrap();
        assert_eq!(
            json,
            r#"{"type":"heartbeat","interval_ms":2000,"count":10000,"digest":18446744073709551615}"#
        );
        let old = r#"{"type":"heartbeat","clients":[],"interval_ms":5}"#;
        let Ok(GatewayUpdate::Heartbeat { count, .. }) = serde_json::from_str(old) else {
            panic!("a legacy heartbeat decodes");
        };
        assert_eq!(count, None);
        // The digest is order-independent and sees names.
        let (a, b) = (client_digest("a", "A"), client_digest("b", "B"));
        assert_eq!(a ^ b, b ^ a);
        assert_ne!(client_digest("a", "A"), client_digest("a", "B"));
        assert_ne!(client_digest("ab", ""), client_digest("a", "b"));
    }

    #[test]
    fn reply_errors_carry_their_kind() {
        let bad = StatsReply::Error {
            kind: ReplyErrorKind::BadRequest,
            message: "at most 5000 buckets per request".into(),
        };
        let json = encode(&bad);
        assert_eq!(
            std::str::from_utf8(&json).unwrap(),
            r#"{"status":"error","kind":"bad_request","message":"at most 5000 buckets per request"}"#
        );
        assert_eq!(decode::<StatsReply>(&json).unwrap(), bad);
        // An older recorder's error has no kind: the recorder's fault.
        let old = br#"{"status":"error","message":"database unavailable"}"#;
        let Ok(SamplesReply::Error { kind, .. }) = decode::<SamplesReply>(old) else {
            panic!("an error without a kind decodes");
        };
        assert_eq!(kind, ReplyErrorKind::Unavailable);
    }
}
