//! Connection caps of one gateway (docs/protocol.md, "Connection caps";
//! docs/architecture.md, "Bounds"): every WebSocket connection, public
//! ones, and public v1 ones (whose cost grows with the room). A handshake
//! over a cap is refused before the upgrade with 503 and `Retry-After`,
//! so a full gateway never takes the memory of one more connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use services::protocol::{Page, Version};

/// Seconds a refused client is asked to wait.
pub const RETRY_AFTER_SECS: u64 = 5;

/// One cap: how many are held, and the most.
struct Cap {
    held: AtomicU32,
    max: u32,
}

impl Cap {
    fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU32::new(0),
            max,
        })
    }

    /// Takes one place if one is free.
    fn take(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn give_back(&self) {
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapRefusal {
    /// `--max-connections`.
    Connections,
    /// `--max-public-clients`.
    Public,
    /// `--max-v1-public-clients`.
    V1Public,
}

impl CapRefusal {
    /// The metric label (`pingapp_gateway_refused_total{reason}`).
    pub fn as_str(self) -> &'static str {
        match self {
            CapRefusal::Connections => "max_connections",
            CapRefusal::Public => "max_public_clients",
            CapRefusal::V1Public => "max_v1_public_clients",
        }
    }

    /// The answer: 503 with `Retry-After` and a JSON body naming the cap.
    pub fn response(self) -> Response {
        let detail = match self {
            CapRefusal::Connections => {
                "this gateway is at its connection cap (--max-connections); retry later"
            }
            CapRefusal::Public => {
                "this gateway is at its public client cap (--max-public-clients); retry later"
            }
            CapRefusal::V1Public => {
                "this gateway is at its cap of public v1 clients (--max-v1-public-clients); retry later or use ?v=2"
            }
        };
        let mut resp = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "at_capacity", "detail": detail})),
        )
            .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        resp
    }
}

/// The caps of one gateway.
pub struct Caps {
    all: Arc<Cap>,
    public: Arc<Cap>,
    v1_public: Arc<Cap>,
}

/// The places one connection holds; given back when dropped (when the
/// connection ends, or with the upgrade if it never completes).
pub struct CapSlot {
    held: Vec<Arc<Cap>>,
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        for cap in &self.held {
            cap.give_back();
        }
    }
}

impl Caps {
    /// Caps of `max_connections` connections, `max_public` public ones and
    /// `max_v1_public` public v1 ones.
    pub fn new(max_connections: u32, max_public: u32, max_v1_public: u32) -> Self {
        Self {
            all: Cap::new(max_connections),
            public: Cap::new(max_public),
            v1_public: Cap::new(max_v1_public),
        }
    }

    /// Takes the places a connection of `page` and `version` needs, or
    /// says which cap is full (taking none).
    pub fn admit(&self, page: Page, version: Version) -> Result<CapSlot, CapRefusal> {
        let mut slot = CapSlot { held: Vec::new() };
        let mut need = vec![(&self.all, CapRefusal::Connections)];
        if page == Page::Public {
            need.push((&self.public, CapRefusal::Public));
            if version == Version::V1 {
                need.push((&self.v1_public, CapRefusal::V1Public));
            }
        }
        for (cap, refusal) in need {
            if !cap.take() {
                // Dropping `slot` gives back what was taken.
                return Err(refusal);
            }
            slot.held.push(cap.clone());
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cap_counts_its_connections_and_frees_them_on_drop() {
        let caps = Caps::new(3, 2, 1);
        let v1 = caps.admit(Page::Public, Version::V1).unwrap();
        assert_eq!(
            caps.admit(Page::Public, Version::V1).err(),
            Some(CapRefusal::V1Public)
        );
        let v2 = caps.admit(Page::Public, Version::V2).unwrap();
        assert_eq!(
            caps.admit(Page::Public, Version::V2).err(),
            Some(CapRefusal::Public)
        );
        let private = caps.admit(Page::Private, Version::V2).unwrap();
        assert_eq!(
            caps.admit(Page::Private, Version::V2).err(),
            Some(CapRefusal::Connections)
        );
        drop(v1);
        drop(private);
        // The refusals above took nothing: one of each is free again.
        let again = caps.admit(Page::Public, Version::V1).unwrap();
        let third = caps.admit(Page::Private, Version::V1).unwrap();
        assert_eq!(
            caps.admit(Page::Private, Version::V1).err(),
            Some(CapRefusal::Connections)
        );
        drop((v2, again, third));
        assert!(caps.admit(Page::Public, Version::V2).is_ok());
    }
}
