//! One log line per gRPC call, written by one tower layer around every service, which also
//! counts the call in the metrics (by method and code, with its duration).
//!
//! The layer opens a span `rpc{method=… volume=… snapshot=…}` around the call (so whatever
//! the handler logs carries them too) and, when the call ends, logs its gRPC code, error
//! message and duration (`took`): at error level for a failure; at info for a call that changes something;
//! at debug for the reads the sidecars repeat every few seconds (Probe, capabilities,
//! capacity, stats, lists). The ids come from the handler (`subject`): the layer sees only
//! HTTP frames. Nothing else of a request is logged, so secrets, parameters and contexts never
//! reach the log, and every id is quoted and clipped, so a hostile one cannot forge lines.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use csi_proto::v1::*;
use tonic::codegen::http;
use tracing::Instrument;
use tracing::field::Empty;

use crate::metrics::plugin::PluginMetrics;

/// The RPCs that change nothing and that the sidecars call periodically: logged at debug
/// when they succeed.
const ROUTINE: &[&str] = &[
    "Probe",
    "GetPluginInfo",
    "GetPluginCapabilities",
    "ControllerGetCapabilities",
    "NodeGetCapabilities",
    "NodeGetInfo",
    "GetCapacity",
    "ListVolumes",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerGetVolume",
    "NodeGetVolumeStats",
    "ValidateVolumeCapabilities",
];

/// Longest id or name logged; longer ones are clipped.
const CLIP: usize = 128;

/// The layer: `Server::builder().layer(RpcLogLayer::new(metrics))`.
#[derive(Debug, Clone)]
pub struct RpcLogLayer {
    metrics: Arc<PluginMetrics>,
}

impl RpcLogLayer {
    pub fn new(metrics: Arc<PluginMetrics>) -> Self {
        RpcLogLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;
    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLogLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct RpcLog<S> {
    inner: S,
    metrics: Arc<PluginMetrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_of(req.uri().path());
        let span = tracing::info_span!(
            "rpc",
            method = %method,
            volume = Empty,
            snapshot = Empty,
            name = Empty
        );
        let started = Instant::now();
        let call = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                let result = call.await;
                let took = started.elapsed();
                let code = match &result {
                    Ok(resp) => {
                        let failed = status_of(resp.headers());
                        let code = failed.as_ref().map_or(tonic::Code::Ok, |s| s.code());
                        log_end(&method, failed, took);
                        code
                    }
                    Err(_) => {
                        tracing::error!(?took, "the call failed below gRPC");
                        tonic::Code::Unknown
                    }
                };
                metrics.rpc(&method, code, took);
                result
            }
            .instrument(span),
        )
    }
}

/// The CSI method a request path names (`/csi.v1.Node/NodeStageVolume` →
/// `NodeStageVolume`), or the whole path clipped and quoted when it is not one.
fn method_of(path: &str) -> String {
    match path
        .strip_prefix("/csi.v1.")
        .and_then(|p| p.split_once('/'))
    {
        Some((service, m))
            if matches!(service, "Identity" | "Controller" | "Node")
                && !m.is_empty()
                && m.len() <= 64
                && m.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            m.to_string()
        }
        _ => clip(path),
    }
}

/// The call's gRPC status if it failed: tonic puts a failure's `grpc-status` in the
/// response headers; a success carries it in the trailers (code OK).
fn status_of(headers: &http::HeaderMap) -> Option<tonic::Status> {
    tonic::Status::from_header_map(headers).filter(|s| s.code() != tonic::Code::Ok)
}

fn log_end(method: &str, failed: Option<tonic::Status>, took: Duration) {
    let ok = tonic::Code::Ok;
    match failed {
        Some(s) => tracing::error!(code = ?s.code(), error = %clip(s.message()), ?took, "failed"),
        None if ROUTINE.contains(&method) => tracing::debug!(code = ?ok, ?took, "done"),
        None => tracing::info!(code = ?ok, ?took, "done"),
    }
}

/// `s` quoted and escaped (no control characters reach the log), at most [`CLIP`]
/// characters of it.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(CLIP).collect::<String>();
    if s.chars().nth(CLIP).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

/// What a request is about, for the log: the ids it names, never anything else of it.
pub(crate) trait Subject {
    fn volume(&self) -> Option<&str> {
        None
    }
    fn snapshot(&self) -> Option<&str> {
        None
    }
    /// The CO's name for an object being created.
    fn name(&self) -> Option<&str> {
        None
    }
}

/// Records the ids of `req` in the current call's span (see the module doc).
pub(crate) fn subject<T: Subject>(req: &tonic::Request<T>) {
    let span = tracing::Span::current();
    let req = req.get_ref();
    if let Some(v) = req.volume() {
        span.record("volume", tracing::field::display(clip(v)));
    }
    if let Some(s) = req.snapshot() {
        span.record("snapshot", tracing::field::display(clip(s)));
    }
    if let Some(n) = req.name() {
        span.record("name", tracing::field::display(clip(n)));
    }
}

macro_rules! by_volume_id {
    ($($t:ty),* $(,)?) => {
        $(impl Subject for $t {
            fn volume(&self) -> Option<&str> {
                Some(&self.volume_id)
            }
        })*
    };
}

by_volume_id!(
    DeleteVolumeRequest,
    ValidateVolumeCapabilitiesRequest,
    ControllerGetVolumeRequest,
    ControllerModifyVolumeRequest,
    NodeStageVolumeRequest,
    NodeUnstageVolumeRequest,
    NodePublishVolumeRequest,
    NodeUnpublishVolumeRequest,
    NodeGetVolumeStatsRequest,
    NodeExpandVolumeRequest,
);

impl Subject for CreateVolumeRequest {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
    fn volume(&self) -> Option<&str> {
        use volume_content_source::Type;
        match self.volume_content_source.as_ref()?.r#type.as_ref()? {
            Type::Volume(v) => Some(&v.volume_id),
            Type::Snapshot(_) => None,
        }
    }
    fn snapshot(&self) -> Option<&str> {
        use volume_content_source::Type;
        match self.volume_content_source.as_ref()?.r#type.as_ref()? {
            Type::Snapshot(s) => Some(&s.snapshot_id),
            Type::Volume(_) => None,
        }
    }
}

impl Subject for CreateSnapshotRequest {
    fn volume(&self) -> Option<&str> {
        Some(&self.source_volume_id)
    }
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
}

impl Subject for CreateVolumeGroupSnapshotRequest {
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
}

/// A group snapshot's id is logged as its snapshot.
impl Subject for DeleteVolumeGroupSnapshotRequest {
    fn snapshot(&self) -> Option<&str> {
        Some(&self.group_snapshot_id)
    }
}

impl Subject for GetVolumeGroupSnapshotRequest {
    fn snapshot(&self) -> Option<&str> {
        Some(&self.group_snapshot_id)
    }
}

impl Subject for DeleteSnapshotRequest {
    fn snapshot(&self) -> Option<&str> {
        Some(&self.snapshot_id)
    }
}

impl Subject for GetSnapshotRequest {
    fn snapshot(&self) -> Option<&str> {
        Some(&self.snapshot_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_csi_names_and_anything_else_is_quoted_and_clipped() {
        assert_eq!(method_of("/csi.v1.Node/NodeStageVolume"), "NodeStageVolume");
        assert_eq!(method_of("/csi.v1.Identity/Probe"), "Probe");
        assert_eq!(method_of("/csi.v1.Evil/X"), "\"/csi.v1.Evil/X\"");
        assert_eq!(
            method_of("/csi.v1.Node/Stage\nINFO forged"),
            "\"/csi.v1.Node/Stage\\nINFO forged\""
        );
        let long = format!("/{}", "a".repeat(500));
        assert_eq!(method_of(&long).chars().count(), CLIP + 3);
    }

    #[test]
    fn a_failure_status_is_read_from_the_headers() {
        let mut h = http::HeaderMap::new();
        assert!(status_of(&h).is_none(), "no status header: a success");
        tonic::Status::not_found("no such volume")
            .add_header(&mut h)
            .unwrap();
        let s = status_of(&h).unwrap();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "no such volume");
    }
}
