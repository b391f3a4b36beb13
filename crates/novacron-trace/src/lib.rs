//! Traces of long operations across processes: one trace per migration, its
//! root made by the server when the migration is asked for, its W3C
//! `traceparent` stored on the Migration and handed to the agents, which
//! record their parts (the source's whole run and each step of its
//! timeline; the target's preparation and finish) as spans under it, with
//! the times the steps really took. Exported with OTLP over HTTP (JSON) to
//! `--otlp-endpoint`; without it nothing is recorded and no trace context
//! is made.

use std::time::SystemTime;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("Cannot build the OTLP exporter for {endpoint}")]
    Exporter {
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
}

/// Flushes and stops the exporter when dropped (at the process's end).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// Exports this process's spans to `endpoint` (an OTLP/HTTP traces URL,
/// e.g. `http://collector:4318/v1/traces`) as `service`, from `node`.
pub fn init(endpoint: &str, service: &str, node: Option<&str>) -> Result<Guard, TraceError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TraceError::Exporter {
            endpoint: endpoint.to_string(),
            source,
        })?;
    let mut resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_string());
    if let Some(n) = node {
        resource = resource.with_attribute(KeyValue::new("novacron.node", n.to_string()));
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Guard(provider))
}

fn tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer_provider().tracer("novacron")
}

/// `00-TRACE-SPAN-FLAGS` of a span context, or none for an invalid one
/// (tracing off).
fn traceparent(sc: &SpanContext) -> Option<String> {
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The parent a `traceparent` names, as a remote span context.
pub fn parse_traceparent(s: &str) -> Option<SpanContext> {
    let mut parts = s.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

/// Starts a trace with a root span `name` that ends now; its `traceparent`,
/// or none when tracing is off.
pub fn start_trace(name: &str, attributes: &[(&str, &str)]) -> Option<String> {
    let span = tracer()
        .span_builder(name.to_string())
        .with_kind(SpanKind::Internal)
        .with_attributes(attrs(attributes))
        .start(&tracer());
    let sc = span.span_context().clone();
    drop(span);
    traceparent(&sc)
}

fn attrs(list: &[(&str, &str)]) -> Vec<KeyValue> {
    list.iter()
        .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
        .collect()
}

/// A span already over: its times, attributes and the spans within it.
#[derive(Debug, Clone)]
pub struct Finished {
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, String)>,
    pub children: Vec<Finished>,
}

impl Finished {
    pub fn new(name: impl Into<String>, start: SystemTime, end: SystemTime) -> Finished {
        Finished {
            name: name.into(),
            start,
            end,
            attributes: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn attribute(mut self, key: &str, value: impl Into<String>) -> Finished {
        self.attributes.push((key.to_string(), value.into()));
        self
    }
}

/// Records `span` (and its children) under the span `parent` names; nothing
/// when tracing is off or `parent` is not a traceparent.
pub fn record(parent: &str, span: &Finished) {
    let Some(sc) = parse_traceparent(parent) else {
        return;
    };
    emit(&Context::new().with_remote_span_context(sc), span);
}

fn emit(parent: &Context, f: &Finished) {
    let t = tracer();
    let kv: Vec<KeyValue> = f
        .attributes
        .iter()
        .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
        .collect();
    let span = t
        .span_builder(f.name.clone())
        .with_start_time(f.start)
        .with_attributes(kv)
        .start_with_context(&t, parent);
    let cx = parent.with_span(span);
    for c in &f.children {
        emit(&cx, c);
    }
    cx.span().end_with_timestamp(f.end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_refused() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(s).unwrap();
        assert_eq!(traceparent(&sc).as_deref(), Some(s));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-zz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn without_an_exporter_nothing_is_made() {
        assert_eq!(start_trace("migration", &[("vm", "a")]), None);
    }
}
