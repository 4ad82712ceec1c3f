//! The admin listener every service has: `/metrics`, `/livez`, `/readyz`.
//! Not for the public internet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// Readiness: a latch that turns ready once the service has started, stays
/// ready while every dependency check passes, and turns unready for good
/// when draining starts.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    started: AtomicBool,
    draining: AtomicBool,
    checks: RwLock<Vec<(String, Check)>>,
}

impl Readiness {
    /// Not ready until [`Readiness::set_started`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a dependency check, e.g. "nats" → bus connected.
    pub fn add_check(&self, name: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.inner
            .checks
            .write()
            .expect("readiness lock")
            .push((name.to_owned(), Box::new(check)));
    }

    /// Start-up finished.
    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
    }

    /// Draining started: unready from now on.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else why not.
    pub fn status(&self) -> Result<(), String> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err("draining".into());
        }
        if !self.inner.started.load(Ordering::SeqCst) {
            return Err("starting".into());
        }
        let failing: Vec<String> = self
            .inner
            .checks
            .read()
            .expect("readiness lock")
            .iter()
            .filter(|(_, check)| !check())
            .map(|(name, _)| format!("{name} down"))
            .collect();
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing.join(", "))
        }
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

/// The admin routes.
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            registry,
            readiness,
        })
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&s.registry),
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    match s.readiness.status() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Serves the admin routes on `listener` until `stop` is cancelled. The
/// admin listener outlives the drain of the main listener, so `/readyz`
/// answers 503 throughout it.
pub async fn serve(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    stop: CancellationToken,
) {
    let app = router(registry, readiness);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

/// A running admin listener: started before anything else, so `/readyz`
/// answers 503 while a service starts, and stopped last, so it answers
/// 503 throughout the drain.
pub struct AdminServer {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` and serves the admin routes.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub async fn start(
        addr: std::net::SocketAddr,
        registry: Registry,
        readiness: Readiness,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, registry, readiness, stop.clone()));
        Ok(Self { addr, stop, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the listener to close.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_latch() {
        let r = Readiness::new();
        assert_eq!(r.status(), Err("starting".into()));
        let up = Arc::new(AtomicBool::new(true));
        let u = up.clone();
        r.add_check("nats", move || u.load(Ordering::SeqCst));
        r.set_started();
        assert_eq!(r.status(), Ok(()));
        up.store(false, Ordering::SeqCst);
        assert_eq!(r.status(), Err("nats down".into()));
        up.store(true, Ordering::SeqCst);
        r.set_draining();
        assert_eq!(r.status(), Err("draining".into()));
    }
}
