//! An in-process gateway on port 0 over the in-memory bus, with the test
//! standing in for presence: it reads the gateway's reports and publishes
//! broadcasts. Browsers are the kit's WebSocket client.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use gateway::{Gateway, GatewayArgs, GatewayConfig};
use services::admin::Readiness;
use services::bus::Consumed;
use services::bus::SharedBus;
use services::bus::memory::MemoryBus;
use services::bus::topic::Inbox;
use services::messages::{Broadcast, GatewayReport, GatewayUpdate, HeartbeatRequest, RecordBatch};
use services::subjects::Subjects;
use testkit::ws::{Client, WAIT as WITHIN};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A gateway running on this test's runtime.
pub struct TestGateway {
    /// Where browsers connect.
    pub addr: SocketAddr,
    /// The bus it was given.
    pub bus: SharedBus,
    /// Its subjects.
    pub subjects: Subjects,
    /// Its metric families.
    pub registry: prometheus::Registry,
    reports: Inbox<GatewayReport>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestGateway {
    /// Starts a gateway `gw` with `args`; its reports are captured from
    /// before it starts.
    pub async fn start(args: GatewayArgs) -> TestGateway {
        let bus: SharedBus = Arc::new(MemoryBus::new());
        let subjects = Subjects::new("t");
        let reports = subjects
            .all_gateway_reports()
            .subscribe(&*bus)
            .await
            .expect("subscribe to reports");
        let cfg = GatewayConfig {
            args,
            gateway_id: "gw".into(),
            subjects: subjects.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let registry = prometheus::Registry::new();
        let gateway = Gateway::build(cfg, bus.clone(), &registry, Readiness::new())
            .await
            .expect("gateway builds");
        let addr = gateway.local_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway.run(shutdown.clone()));
        TestGateway {
            addr,
            bus,
            subjects,
            registry,
            reports,
            shutdown,
            task,
        }
    }

    /// The value of the series of `family` with exactly `labels`, 0 when
    /// it does not exist.
    pub fn metric(&self, family: &str, labels: &[(&str, &str)]) -> f64 {
        let families = self.registry.gather();
        let Some(f) = families.iter().find(|f| f.name() == family) else {
            return 0.0;
        };
        f.get_metric()
            .iter()
            .find(|m| {
                m.get_label().len() == labels.len()
                    && labels.iter().all(|(k, v)| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == *k && l.value() == *v)
                    })
            })
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
            .unwrap_or(0.0)
    }

    /// Opens a WebSocket on `path` (e.g. `/ws/public/?v=2`).
    pub async fn ws(&self, path: &str) -> Client {
        Client::connect(self.addr, path).await
    }

    /// The next report that `keep` accepts (others are skipped).
    pub async fn report(&mut self, keep: impl Fn(&GatewayReport) -> bool) -> GatewayReport {
        let found = tokio::time::timeout(WITHIN, async {
            while let Some(m) = self.reports.next().await {
                let r = m.message.expect("a report");
                if keep(&r) {
                    return r;
                }
            }
            panic!("report subscription ended")
        })
        .await;
        found.expect("the expected report did not come")
    }

    /// The next report other than a heartbeat or a `Delays` tick.
    pub async fn event(&mut self) -> GatewayReport {
        self.report(|r| {
            !matches!(
                r.update,
                GatewayUpdate::Heartbeat { .. } | GatewayUpdate::Delays { .. }
            )
        })
        .await
    }

    /// Asks for this gateway's full list as presence does, and returns
    /// its pieces, checked to be numbered and consecutive, the last one
    /// marked.
    pub async fn list_now(&mut self) -> Vec<GatewayReport> {
        self.subjects
            .presence_sync()
            .publish(
                &*self.bus,
                &HeartbeatRequest {
                    gateway: Some("gw".into()),
                },
            )
            .await
            .expect("publish sync request");
        let mut pieces: Vec<GatewayReport> = Vec::new();
        loop {
            let r = self
                .report(|r| matches!(r.update, GatewayUpdate::Clients { .. }))
                .await;
            let GatewayUpdate::Clients { part, last, .. } = r.update else {
                unreachable!()
            };
            assert_eq!(part as usize, pieces.len(), "pieces in order");
            if let Some(prev) = pieces.last() {
                assert_eq!(r.seq, prev.seq + 1, "pieces are consecutive reports");
            }
            pieces.push(r);
            if last {
                return pieces;
            }
        }
    }

    /// The clients of `pieces`.
    pub fn listed(pieces: &[GatewayReport]) -> Vec<services::messages::RosterClient> {
        pieces
            .iter()
            .flat_map(|p| match &p.update {
                GatewayUpdate::Clients { clients, .. } => clients.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// Publishes a broadcast as presence would.
    pub async fn broadcast(&self, b: Broadcast) {
        self.subjects
            .broadcast()
            .publish(&*self.bus, &b)
            .await
            .expect("publish broadcast");
    }

    /// Consumes the sample stream (as the recorder would) through the
    /// durable consumer `test`.
    pub async fn consume_samples(&self) -> Consumed<RecordBatch> {
        self.subjects
            .samples_stream()
            .consume(&*self.bus, "test")
            .await
            .expect("consume the sample stream")
    }

    /// Starts the drain and waits until `run` returns.
    pub async fn stop(self) -> (Inbox<GatewayReport>, anyhow::Result<()>) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WITHIN, self.task)
            .await
            .expect("the gateway drains in time")
            .expect("the gateway task does not panic");
        (self.reports, result)
    }
}
