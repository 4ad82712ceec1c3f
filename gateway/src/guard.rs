//! Checks made on a WebSocket upgrade request before it is upgraded
//! (docs/security.md): the Origin allow-list and the per-IP caps.
//!
//! A browser sends `Origin` on every WebSocket handshake, and any web page
//! can open a WebSocket to any host: without this check, any site could
//! make its visitors' browsers connect here. Clients that send no `Origin`
//! (loadgen, scripts, native apps) are not browsers driven by a third-party
//! page, and stay allowed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::connection::TokenBucket;

/// Which browser origins may open WebSockets.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Origins allowed besides the request's own host, lower-cased and
    /// without a trailing slash (`https://ping.example.com`).
    allowed: Vec<String>,
    /// `*` was listed: every origin is allowed.
    any: bool,
}

impl OriginPolicy {
    /// A policy allowing the request's own host and each of `origins`
    /// (`*` allows every origin).
    pub fn new(origins: &[String]) -> Self {
        let mut policy = Self::default();
        for o in origins {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            if o == "*" {
                policy.any = true;
            } else if !o.is_empty() {
                policy.allowed.push(o);
            }
        }
        policy
    }

    /// Whether a request with these headers may be upgraded: it has no
    /// `Origin`, its `Origin` names the host it was sent to (`Host`, the
    /// same `host:port`, any scheme), or its `Origin` is listed.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        if self.any {
            return true;
        }
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.trim().to_ascii_lowercase());
        match host {
            Some(host) => same_host(&origin, &host),
            None => false,
        }
    }
}

/// Whether `origin` (`scheme://host[:port]`, lower case) names `host`
/// (`host[:port]` as in the Host header); a default port (80 for http and
/// ws, 443 for https and wss) may be spelled or left out on either side.
fn same_host(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        // `null` (sandboxed frames, file: pages) and other opaque origins.
        return false;
    };
    let default_port = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let strip = |s: &'_ str| -> String { s.strip_suffix(default_port).unwrap_or(s).to_owned() };
    !authority.is_empty() && strip(authority) == strip(host)
}

/// The answer to a refused upgrade: 403 with a one-line reason.
pub fn forbidden_origin() -> Response {
    (
        StatusCode::FORBIDDEN,
        "403 Forbidden: this Origin may not open WebSockets here (docs/security.md, --allowed-origins)\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn the_own_host_and_listed_origins_pass_others_do_not() {
        let p = OriginPolicy::new(&[]);
        assert!(p.allows(&headers(None, "a.example:8000")), "no Origin");
        assert!(p.allows(&headers(Some("http://a.example:8000"), "a.example:8000")));
        assert!(p.allows(&headers(Some("https://A.example"), "a.example")));
        assert!(p.allows(&headers(Some("https://a.example"), "a.example:443")));
        assert!(!p.allows(&headers(Some("http://a.example:8001"), "a.example:8000")));
        assert!(!p.allows(&headers(Some("http://evil.example"), "a.example")));
        assert!(!p.allows(&headers(Some("null"), "a.example")));
        assert!(!p.allows(&headers(Some("http://a.example.evil"), "a.example")));

        let listed = OriginPolicy::new(&["https://app.example/".into()]);
        assert!(listed.allows(&headers(Some("https://app.example"), "gw.internal")));
        assert!(!listed.allows(&headers(Some("http://app.example"), "gw.internal")));
        let any = OriginPolicy::new(&["*".into()]);
        assert!(any.allows(&headers(Some("null"), "gw.internal")));
    }

    #[test]
    fn proxy_ranges_contain_their_addresses_only() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(&ip("10.200.3.4")));
        assert!(!net("10.0.0.0/8").contains(&ip("11.0.0.1")));
        assert!(net("10.1.2.3").contains(&ip("10.1.2.3")));
        assert!(!net("10.1.2.3").contains(&ip("10.1.2.4")));
        assert!(net("0.0.0.0/0").contains(&ip("203.0.113.1")));
        assert!(!net("0.0.0.0/0").contains(&ip("::1")), "no mixing families");
        assert!(net("fd00::/8").contains(&ip("fd12::1")));
        assert!(!net("fd00::/8").contains(&ip("fe80::1")));
        for bad in ["10.0.0.0/33", "fd00::/129", "ingress", "10.0.0/8", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad:?}");
        }
    }
}

/// An address range, `10.0.0.0/8` or `fd00::/8`, or one address (`10.1.2.3`,
/// a /32 or /128): how `--trusted-proxies` names proxies whose addresses
/// change (an ingress controller's pods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// A `--trusted-proxies` entry that is neither an address nor a range.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not an IP address or range (10.0.0.0/8, fd00::/8, 10.1.2.3)")]
pub struct BadIpNet(String);

impl std::str::FromStr for IpNet {
    type Err = BadIpNet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadIpNet(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl IpNet {
    /// Whether `ip` is in this range (an IPv4 address is never in an IPv6
    /// range, nor the reverse).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        // Both left-aligned in 128 bits, so a prefix counts from the top.
        let bits = |a: &IpAddr| match a {
            IpAddr::V4(a) => u128::from(a.to_bits()) << 96,
            IpAddr::V6(a) => a.to_bits(),
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let mask = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        bits(&self.addr) & mask == bits(ip) & mask
    }
}

/// Most addresses the per-IP table holds; beyond it (after dropping the
/// idle ones) new addresses are refused with 503 until some leave.
pub const MAX_TRACKED_IPS: usize = 100_000;

/// Per-IP caps on concurrent WebSocket connections and on new ones per
/// second, checked before the upgrade (docs/security.md, "Per-IP caps").
///
/// The table holds an entry per address with a live connection or a
/// connect in the last few seconds (until its bucket is full again): idle
/// entries are dropped when their last connection ends, or swept when the
/// table reaches [`MAX_TRACKED_IPS`], so memory stays bounded by the
/// connections and the recent connect rate, at most that many entries.
#[derive(Debug)]
pub struct IpLimits {
    max_connections: u32,
    connects_per_second: u32,
    trusted_proxies: Vec<IpNet>,
    table: Mutex<HashMap<IpAddr, IpEntry>>,
}

#[derive(Debug)]
struct IpEntry {
    connections: u32,
    connects: TokenBucket,
}

/// Why an upgrade was refused by [`IpLimits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRefusal {
    /// The address holds `--max-connections-per-ip` connections already.
    Connections,
    /// The address connected faster than `--max-connects-per-ip-per-second`.
    Rate,
    /// The table is full of live addresses.
    Table,
}

impl IpRefusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            IpRefusal::Connections => "ip_connections",
            IpRefusal::Rate => "ip_rate",
            IpRefusal::Table => "ip_table",
        }
    }

    /// The answer: 429 with `Retry-After` (503 for a full table).
    pub fn response(self) -> Response {
        let (status, retry, text) = match self {
            IpRefusal::Connections => (
                StatusCode::TOO_MANY_REQUESTS,
                "5",
                "429 Too Many Requests: too many connections from this address (--max-connections-per-ip)\n",
            ),
            IpRefusal::Rate => (
                StatusCode::TOO_MANY_REQUESTS,
                "1",
                "429 Too Many Requests: connecting too fast from this address (--max-connects-per-ip-per-second)\n",
            ),
            IpRefusal::Table => (
                StatusCode::SERVICE_UNAVAILABLE,
                "5",
                "503 Service Unavailable: too many client addresses\n",
            ),
        };
        (status, [(header::RETRY_AFTER, retry)], text).into_response()
    }
}

/// A connection counted against its address; dropping it uncounts it.
#[derive(Debug)]
pub struct IpSlot {
    limits: Arc<IpLimits>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut table = self.limits.table.lock().expect("ip table");
        if let Some(e) = table.get_mut(&self.ip) {
            e.connections = e.connections.saturating_sub(1);
            if e.connections == 0 && e.connects.is_full(Instant::now()) {
                table.remove(&self.ip);
            }
        }
    }
}

impl IpLimits {
    /// Caps of `max_connections` and `connects_per_second` (burst: twice
    /// that) per address, 0 turning either off; `X-Forwarded-For` is
    /// believed only from `trusted_proxies`.
    pub fn new(
        max_connections: u32,
        connects_per_second: u32,
        trusted_proxies: Vec<IpNet>,
    ) -> Self {
        Self {
            max_connections,
            connects_per_second,
            trusted_proxies,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The client's address: the peer's, or, when the peer is a trusted
    /// proxy, the last `X-Forwarded-For` entry that is not one (what a
    /// client sends itself is further left and never believed).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|a| a.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        forwarded
            .into_iter()
            .rev()
            .find(|a| !trusted(a))
            .unwrap_or(peer)
    }

    /// Counts a new connection from `ip`, or says why it is refused.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRefusal> {
        let now = Instant::now();
        let mut table = self.table.lock().expect("ip table");
        if table.len() >= MAX_TRACKED_IPS && !table.contains_key(&ip) {
            table.retain(|_, e| e.connections > 0 || !e.connects.is_full(now));
            if table.len() >= MAX_TRACKED_IPS {
                return Err(IpRefusal::Table);
            }
        }
        let rate = f64::from(self.connects_per_second);
        let entry = table.entry(ip).or_insert_with(|| IpEntry {
            connections: 0,
            connects: TokenBucket::new(rate, 2.0 * rate),
        });
        if self.max_connections > 0 && entry.connections >= self.max_connections {
            return Err(IpRefusal::Connections);
        }
        if self.connects_per_second > 0 && !entry.connects.admit(now, 1.0) {
            return Err(IpRefusal::Rate);
        }
        entry.connections += 1;
        Ok(IpSlot {
            limits: self.clone(),
            ip,
        })
    }
}

/// A per-address request budget: a token bucket per client address, `rate`
/// a second with a burst of twice as many, 0 turning it off. The table
/// holds addresses whose bucket is not full again yet (a couple of seconds
/// after their last request), swept when it reaches [`MAX_TRACKED_IPS`];
/// if it is still full, unknown addresses are refused.
#[derive(Debug)]
pub struct IpBudget {
    rate: u32,
    table: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl IpBudget {
    /// `rate` requests a second per address (0: unlimited).
    pub fn new(rate: u32) -> Self {
        Self {
            rate,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a request from `ip`; false when it is over the budget.
    pub fn admit(&self, ip: IpAddr) -> bool {
        if self.rate == 0 {
            return true;
        }
        let now = Instant::now();
        let mut table = self.table.lock().expect("ip budget table");
        if table.len() >= MAX_TRACKED_IPS && !table.contains_key(&ip) {
            table.retain(|_, bucket| !bucket.is_full(now));
            if table.len() >= MAX_TRACKED_IPS {
                return false;
            }
        }
        let rate = f64::from(self.rate);
        table
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, 2.0 * rate))
            .admit(now, 1.0)
    }
}
