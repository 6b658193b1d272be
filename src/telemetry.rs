//! Logging: an EnvFilter from RUST_LOG (default `info`), as text or JSON lines.
//! With `--otlp-endpoint`, fleetcare's spans are also exported over OTLP/gRPC
//! (see [`crate::grpc::trace`] for the per-call span); without it nothing else
//! is installed.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TracingArgs};

/// What [`init`] installed that must be flushed before the process exits.
#[must_use = "call shutdown() so the last spans are exported"]
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (blocking: call
    /// it off the async workers, e.g. in `spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "otlp: flush at shutdown failed");
        }
    }
}

/// Logs only (the operator commands).
pub fn init(format: LogFormat) {
    let _ = install(format, None);
}

/// Logs, and the OTLP exporter when `tracing.otlp_endpoint` is set. The
/// exporter's batch processor honours the standard `OTEL_BSP_*` variables
/// (`OTEL_BSP_SCHEDULE_DELAY`, milliseconds, 5000 by default). Must run inside
/// the tokio runtime (the gRPC exporter's channel lives on it).
pub fn init_serve(format: LogFormat, tracing: &TracingArgs) -> Result<Telemetry, String> {
    let provider = match &tracing.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(tracing.otlp_service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    // Already installed (a second server in one test process): keep that one.
    let _ = install(format, provider.as_ref());
    if let Some(endpoint) = &tracing.otlp_endpoint {
        tracing::info!(%endpoint, service = %tracing.otlp_service_name, "otlp: exporting spans");
    }
    Ok(Telemetry { provider })
}

/// The logs' filter when `RUST_LOG` is not set. The per-call `rpc` span
/// (target `fleetcare::grpc::trace`) is left out of the logs: formatting its
/// fields for every call cost a third of a heartbeat's CPU (measured with
/// callgrind: 100.9k instructions per heartbeat with it, 85k without;
/// docs/benchmarks.md),
/// and the log lines written inside a call are few. It is still exported
/// with `--otlp-endpoint`; `RUST_LOG=info,fleetcare::grpc::trace=info` puts
/// `rpc{...}` back on the log lines of a call.
pub const DEFAULT_LOG_FILTER: &str =
    "info,sqlx=warn,h2=warn,tower=warn,fleetcare::grpc::trace=warn";

fn install(format: LogFormat, provider: Option<&SdkTracerProvider>) -> Result<(), String> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colour only for a person at a terminal: piped to a file, journald or a
    // log collector, the lines carry no escape sequences.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    // The exported spans are fleetcare's own, at info and above, whatever
    // RUST_LOG says about the logs: never the exporter's own gRPC client (h2,
    // tonic, hyper), whose spans would feed back into the export.
    let otel = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("fleetcare"))
            .with_filter(Targets::new().with_target("fleetcare", LevelFilter::INFO))
    });
    // try_init: tests initialise once per process, however many servers they start.
    // Without an exporter the stack holds the logs alone: an absent layer
    // (`Option::None`) counts as interested in every span, so every span
    // would be created, and its filter checked, for no one.
    let installed = match otel {
        Some(otel) => tracing_subscriber::registry()
            .with(fmt)
            .with(otel)
            .try_init(),
        None => tracing_subscriber::registry().with(fmt).try_init(),
    };
    installed.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;

    /// What a fmt layer with `filter` writes for a log line inside a call's
    /// span (the span `grpc::trace` makes: target `fleetcare::grpc::trace`).
    fn logged_inside_a_call(filter: &str) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = out.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Buffer(writer.clone()));
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::Layer::with_filter(fmt, EnvFilter::new(filter)),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span =
                tracing::info_span!(target: "fleetcare::grpc::trace", "rpc", agent_id = "a-1");
            let _entered = span.enter();
            tracing::warn!(target: "fleetcare::grpc::agent_status", "inside the call");
        });
        String::from_utf8(out.lock().unwrap().clone()).unwrap()
    }

    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_default_logs_leave_the_call_span_out_and_rust_log_can_put_it_back() {
        let default = logged_inside_a_call(super::DEFAULT_LOG_FILTER);
        assert!(default.contains("inside the call"), "{default}");
        assert!(!default.contains("rpc{"), "{default}");
        let asked = logged_inside_a_call("info,fleetcare::grpc::trace=info");
        assert!(asked.contains("rpc{agent_id=\"a-1\"}: "), "{asked}");
    }
}
