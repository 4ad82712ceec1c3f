//! Logging and tracing for every binary.
//!
//! Logs go to stderr as text or JSON lines, filtered by `RUST_LOG`. Traces
//! are exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the standard `OTEL_*`
//! variables apply (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_PROTOCOL`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_SDK_DISABLED`, ...). Unset: nothing is
//! exported and nothing complains.
//!
//! W3C trace context crosses the bus in message headers:
//! [`context_headers`] on the sending side, [`set_parent_from`] on the
//! receiving side, so one trace runs from a gateway into the recorder.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::bus::Headers;
use crate::config::LogFormat;

/// Flushes and stops the trace exporter when dropped: keep it alive in
/// `main` until the service has drained.
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the environment asks for trace export.
pub fn export_requested() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`),
/// text or JSON lines on stderr, and OTLP trace export when configured;
/// `service` is the service name unless `OTEL_SERVICE_NAME` says otherwise.
/// Safe to call more than once (tests): later calls only return a guard.
pub fn init(format: LogFormat, service: &str) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = if export_requested() {
        match build_provider(service) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: trace export disabled: {e}");
                None
            }
        }
    } else {
        None
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("pingapp")));
    let text = (format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    TelemetryGuard { provider }
}

fn build_provider(service: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| e.to_string())?;
    let resource = if env_set("OTEL_SERVICE_NAME") {
        opentelemetry_sdk::Resource::builder().build()
    } else {
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_owned())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of `span`, as bus
/// message headers; empty when tracing is off.
pub fn context_headers(span: &tracing::Span) -> Headers {
    let mut headers = Headers::new();
    TraceContextPropagator::new()
        .inject_context(&span.context(), &mut HeaderInjector(&mut headers));
    headers
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &Headers) {
    if headers.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}
