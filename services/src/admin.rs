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

/// Readiness, from per-component latches: not ready until at least one
/// component registered a [`Latch`] and every registered latch is set; then
/// ready while every dependency check passes; unready for good once
/// draining starts.
///
/// Each component registers its latch when it starts building and sets it
/// when it is built, so `/readyz` names whatever is still starting. A
/// binary that composes several components registers a latch of its own
/// first and sets it once all of them are built, so that no component
/// built early makes the whole binary ready.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    draining: AtomicBool,
    latches: RwLock<Vec<(String, Arc<AtomicBool>)>>,
    checks: RwLock<Vec<(String, Check)>>,
}

/// One component's part of [`Readiness`]: starting until [`Latch::set`].
#[derive(Debug, Clone)]
pub struct Latch {
    up: Arc<AtomicBool>,
}

impl Latch {
    /// The component is built and serving.
    pub fn set(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Readiness {
    /// Not ready until a component registers a latch and sets it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers the latch of `component` (e.g. "recorder"); readiness
    /// waits for it.
    pub fn latch(&self, component: &str) -> Latch {
        let up = Arc::new(AtomicBool::new(false));
        self.inner
            .latches
            .write()
            .expect("readiness lock")
            .push((component.to_owned(), up.clone()));
        Latch { up }
    }

    /// Adds a dependency check, e.g. "nats" → bus connected.
    pub fn add_check(&self, name: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.inner
            .checks
            .write()
            .expect("readiness lock")
            .push((name.to_owned(), Box::new(check)));
    }

    /// Registers and sets a latch named "started" at once: for a caller
    /// that has no latch of its own to hand out.
    pub fn set_started(&self) {
        self.latch("started").set();
    }

    /// Draining started: unready from now on.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    /// Turns unready for good as soon as `shutdown` is cancelled (from a
    /// task of its own; call it inside a tokio runtime).
    pub fn drain_on(&self, shutdown: &CancellationToken) {
        let (this, shutdown) = (self.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            this.set_draining();
        });
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
        {
            let latches = self.inner.latches.read().expect("readiness lock");
            if latches.is_empty() {
                return Err("starting".into());
            }
            let starting: Vec<&str> = latches
                .iter()
                .filter(|(_, up)| !up.load(Ordering::SeqCst))
                .map(|(name, _)| name.as_str())
                .collect();
            if !starting.is_empty() {
                return Err(format!("starting: {}", starting.join(", ")));
            }
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
        let gateway = r.latch("gateway");
        let recorder = r.latch("recorder");
        gateway.set();
        assert_eq!(r.status(), Err("starting: recorder".into()));
        recorder.set();
        assert_eq!(r.status(), Ok(()));
        up.store(false, Ordering::SeqCst);
        assert_eq!(r.status(), Err("nats down".into()));
        up.store(true, Ordering::SeqCst);
        r.set_draining();
        assert_eq!(r.status(), Err("draining".into()));
    }

    #[test]
    fn set_started_is_a_latch_of_its_own() {
        let r = Readiness::new();
        let presence = r.latch("presence");
        r.set_started();
        assert_eq!(r.status(), Err("starting: presence".into()));
        presence.set();
        assert_eq!(r.status(), Ok(()));
    }

    #[tokio::test]
    async fn draining_follows_the_shutdown_token() {
        let r = Readiness::new();
        r.set_started();
        let shutdown = CancellationToken::new();
        r.drain_on(&shutdown);
        assert_eq!(r.status(), Ok(()));
        shutdown.cancel();
        for _ in 0..100 {
            if r.is_draining() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(r.status(), Err("draining".into()));
    }
}
