//! Prometheus metrics (`docs/metrics.md`): what the NBD server counts per volume on the
//! request path ([`io`]), what the plugin counts as it runs ([`plugin`]), what a scrape
//! reads from the state directory and the staged volumes ([`scrape`]), and the `/metrics`
//! endpoint that serves them all ([`http`]), in the Prometheus text format or OpenMetrics.
//!
//! Labels are bounded: a volume's id and claim, a request kind, an RPC method and code,
//! a reason. Nothing per request, per path or per client.

pub mod http;
pub mod io;
pub mod plugin;
pub mod scrape;

use prometheus_client::encoding::{prometheus_text, text as openmetrics_text};
use prometheus_client::registry::Registry;

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what Prometheus and promtool read by default.
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The format an HTTP `Accept` header asks for: OpenMetrics when it names it.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Everything `registry` holds, in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    match format {
        Format::Prometheus => prometheus_text::encode(&mut out, registry)?,
        Format::OpenMetrics => openmetrics_text::encode(&mut out, registry)?,
    }
    Ok(out)
}

/// Adds `qcow2_csi_build_info{version}`, always 1.
pub fn register_build_info(registry: &mut Registry) {
    registry.register(
        "qcow2_csi_build",
        "The running qcow2-csi's version",
        prometheus_client::metrics::info::Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
}

/// The CSI methods, the only values of the `method` label.
const METHODS: &[&str] = &[
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

/// `method` as a label value: a CSI method's name, or `unknown` (a client cannot mint
/// label values).
pub fn rpc_method(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// A gRPC code's canonical name (as grpc-go and the CSI sidecars print it).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_csi_methods_become_label_values() {
        assert_eq!(rpc_method("NodeStageVolume"), "NodeStageVolume");
        assert_eq!(rpc_method("\"/csi.v1.Evil/X\""), "unknown");
        assert_eq!(rpc_method(""), "unknown");
    }

    #[test]
    fn openmetrics_is_served_only_to_those_who_ask() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(
            Format::from_accept(Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")),
            Format::Prometheus
        );
        let prom = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prom)), Format::OpenMetrics);
    }
}
