//! What a scrape reads at that moment: the node's filesystem, its volumes, their chains
//! and their attachments ([`NodeView`], gathered by the plugin), and each volume's I/O
//! counters, encoded as Prometheus families.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::io::{IoStats, Op, OpSnapshot, Throttled};

/// A volume's identifying labels: its id, and its claim when the provisioner named it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeLabels {
    pub volume: String,
    pub pvc_namespace: String,
    pub pvc_name: String,
}

impl VolumeLabels {
    fn with(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        let mut l = vec![
            ("volume", self.volume.clone()),
            ("pvc_namespace", self.pvc_namespace.clone()),
            ("pvc_name", self.pvc_name.clone()),
        ];
        l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        l
    }
}

/// One volume of the node.
#[derive(Debug, Clone, Default)]
pub struct VolumeView {
    pub labels: VolumeLabels,
    /// Virtual size.
    pub size: u64,
    /// Bytes the head layer's file occupies on the node's filesystem.
    pub head_allocated: u64,
    /// Bytes its whole chain's files occupy (layers shared with other volumes or snapshots
    /// count in each).
    pub chain_allocated: u64,
    /// Layers in the chain, head included; `None` when a header could not be read.
    pub depth: Option<usize>,
    /// Its attachment, when staged here.
    pub staged: Option<StagedView>,
}

/// A staged volume's attachment.
#[derive(Debug, Clone, Default)]
pub struct StagedView {
    /// `nbd`, `nbd_ioctl` or `nbdfuse`.
    pub mode: &'static str,
    /// `attached`, `lost` or `frozen`.
    pub state: &'static str,
    /// Writes held by a full node filesystem now.
    pub paused_writes: u64,
}

/// The node at one scrape.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// Whether the state directory is loaded (the rest is empty until it is).
    pub ready: bool,
    /// The state directory's filesystem: size and bytes free to unprivileged users (`None`
    /// when statvfs failed: no series then, rather than a 0 that would look full).
    pub fs_size: Option<u64>,
    pub fs_free: Option<u64>,
    /// Bytes all layer files occupy.
    pub layers_allocated: u64,
    pub layers: usize,
    pub snapshots: usize,
    /// Chains deeper than the flatten limit (0: no limit).
    pub max_chain_depth: usize,
    pub volumes: Vec<VolumeView>,
}

impl NodeView {
    /// Sum of the volumes' virtual sizes: what the node promised.
    pub fn promised(&self) -> u64 {
        self.volumes.iter().map(|v| v.size).sum()
    }
}

/// Encodes one gauge family: `samples` are (labels, value).
fn gauges<L, V>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes one unlabelled gauge: its description, and its sample when it has a value.
fn gauge<V>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<V>,
) -> std::fmt::Result
where
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    let family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    match value {
        Some(v) => ConstGauge::new(v).encode(family),
        None => Ok(()),
    }
}

/// The per-volume I/O families of `volumes` (operations, errors, bytes, latency, in flight).
pub fn encode_io(
    enc: &mut DescriptorEncoder<'_>,
    volumes: &[(VolumeLabels, Arc<IoStats>)],
) -> std::fmt::Result {
    let snaps: Vec<_> = volumes
        .iter()
        .map(|(l, s)| (l, Op::ALL.map(|op| (op, s.of(op)))))
        .collect();
    /// A counter family: name, help, the value of a snapshot, the kinds it has series for.
    type CounterFamily = (
        &'static str,
        &'static str,
        fn(&OpSnapshot) -> u64,
        &'static [Op],
    );
    let counters: [CounterFamily; 3] = [
        (
            "qcow2_csi_volume_io_operations",
            "NBD requests answered, by kind (op)",
            |s| s.done,
            &Op::ALL,
        ),
        (
            "qcow2_csi_volume_io_errors",
            "NBD requests answered with an error, by kind",
            |s| s.errors,
            &Op::ALL,
        ),
        (
            "qcow2_csi_volume_io_bytes",
            "Bytes read, written, trimmed or zeroed by successful NBD requests",
            |s| s.bytes,
            &[Op::Read, Op::Write, Op::Trim, Op::Zero],
        ),
    ];
    for (name, help, value, kinds) in counters {
        let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, ops) in &snaps {
            for (op, snap) in ops.iter().filter(|(op, _)| kinds.contains(op)) {
                let l = labels.with(&[("op", op.label())]);
                ConstCounter::new(value(snap)).encode(family.encode_family(&l)?)?;
            }
        }
    }
    let mut family = enc.encode_descriptor(
        "qcow2_csi_volume_io_duration_seconds",
        "Time from reading an NBD request to sending its reply, by kind",
        None,
        MetricType::Histogram,
    )?;
    for (labels, ops) in &snaps {
        for (op, snap) in ops {
            let l = labels.with(&[("op", op.label())]);
            family.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                snap.seconds,
                snap.observed(),
                &snap.histogram(),
                None,
            )?;
        }
    }
    /// A QoS counter family: name, help, the value of a direction's [`Throttled`].
    type ThrottledFamily = (&'static str, &'static str, fn(Throttled) -> f64);
    let throttled: [ThrottledFamily; 2] = [
        (
            "qcow2_csi_volume_qos_throttled_requests",
            "NBD requests that waited for the volume's QoS limits, reads or writes (op)",
            |t| t.requests as f64,
        ),
        (
            "qcow2_csi_volume_qos_throttled_seconds",
            "Seconds NBD requests waited for the volume's QoS limits, reads or writes (op)",
            |t| t.seconds,
        ),
    ];
    for (name, help, value) in throttled {
        let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, stats) in volumes {
            for (op, write) in [(Op::Read, false), (Op::Write, true)] {
                let l = labels.with(&[("op", op.label())]);
                ConstCounter::new(value(stats.throttled(write)))
                    .encode(family.encode_family(&l)?)?;
            }
        }
    }
    gauges(
        enc,
        "qcow2_csi_volume_io_in_flight",
        "NBD requests read and not yet answered",
        volumes
            .iter()
            .map(|(l, s)| (l.with(&[]), s.in_flight() as i64)),
    )
}

/// The node and volume gauges of `view`.
pub fn encode_node(enc: &mut DescriptorEncoder<'_>, view: &NodeView) -> std::fmt::Result {
    gauge(
        enc,
        "qcow2_csi_node_ready",
        "1 once the state directory is loaded and the plugin answers",
        Some(i64::from(view.ready)),
    )?;
    if !view.ready {
        return Ok(());
    }
    gauge(
        enc,
        "qcow2_csi_node_filesystem_size_bytes",
        "Size of the filesystem holding the state directory",
        view.fs_size,
    )?;
    gauge(
        enc,
        "qcow2_csi_node_filesystem_free_bytes",
        "Bytes free on the state directory's filesystem (for unprivileged users, as statvfs f_bavail)",
        view.fs_free,
    )?;
    gauge(
        enc,
        "qcow2_csi_node_layers_allocated_bytes",
        "Bytes the node's qcow2 layer files occupy",
        Some(view.layers_allocated),
    )?;
    let promised = view.promised();
    gauge(
        enc,
        "qcow2_csi_node_promised_bytes",
        "Sum of the node's volumes' virtual sizes",
        Some(promised),
    )?;
    let ratio = view
        .fs_size
        .filter(|&size| size > 0)
        .map(|size| promised as f64 / size as f64);
    gauge(
        enc,
        "qcow2_csi_node_overcommit_ratio",
        "Bytes promised over the filesystem's size (above 1: more promised than the disk holds)",
        ratio,
    )?;
    gauge(
        enc,
        "qcow2_csi_node_volumes",
        "Volumes on the node",
        Some(view.volumes.len() as i64),
    )?;
    gauge(
        enc,
        "qcow2_csi_node_staged_volumes",
        "Volumes staged on the node",
        Some(view.volumes.iter().filter(|v| v.staged.is_some()).count() as i64),
    )?;
    gauge(
        enc,
        "qcow2_csi_node_snapshots",
        "Snapshots on the node",
        Some(view.snapshots as i64),
    )?;
    gauge(
        enc,
        "qcow2_csi_node_layers",
        "qcow2 layer files on the node (heads, snapshots and the layers under them)",
        Some(view.layers as i64),
    )?;
    gauge(
        enc,
        "qcow2_csi_node_max_chain_depth",
        "Layers in a chain past which the plugin flattens it (0: never)",
        Some(view.max_chain_depth as i64),
    )?;
    let vols = &view.volumes;
    gauges(
        enc,
        "qcow2_csi_volume_size_bytes",
        "A volume's virtual size",
        vols.iter().map(|v| (v.labels.with(&[]), v.size)),
    )?;
    gauges(
        enc,
        "qcow2_csi_volume_head_allocated_bytes",
        "Bytes a volume's head layer occupies on the node's filesystem",
        vols.iter().map(|v| (v.labels.with(&[]), v.head_allocated)),
    )?;
    gauges(
        enc,
        "qcow2_csi_volume_chain_allocated_bytes",
        "Bytes a volume's whole chain occupies (layers shared with snapshots or clones count in each)",
        vols.iter().map(|v| (v.labels.with(&[]), v.chain_allocated)),
    )?;
    gauges(
        enc,
        "qcow2_csi_volume_chain_depth",
        "Layers in a volume's chain, head included (absent when a layer's header cannot be read)",
        vols.iter()
            .filter_map(|v| v.depth.map(|d| (v.labels.with(&[]), d as i64))),
    )?;
    let staged = || {
        vols.iter()
            .filter_map(|v| v.staged.as_ref().map(|s| (v, s)))
    };
    gauges(
        enc,
        "qcow2_csi_volume_attachment",
        "1 for each staged volume, labelled with how it is attached (mode) and its state (attached, lost, frozen)",
        staged().map(|(v, s)| (v.labels.with(&[("mode", s.mode), ("state", s.state)]), 1i64)),
    )?;
    gauges(
        enc,
        "qcow2_csi_volume_paused_writes",
        "A staged volume's writes waiting for space on a full node filesystem",
        staged().map(|(v, s)| (v.labels.with(&[]), s.paused_writes)),
    )
}

/// Encodes a view made at each scrape.
pub struct ViewCollector<F> {
    view: F,
}

impl<F> ViewCollector<F> {
    pub fn new(view: F) -> Self {
        ViewCollector { view }
    }
}

impl<F> std::fmt::Debug for ViewCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ViewCollector")
    }
}

/// What one scrape shows: the node (none for a lone `qcow2-csi nbd` export) and the
/// volumes' I/O counters.
#[derive(Debug, Default)]
pub struct Scrape {
    pub node: Option<NodeView>,
    pub io: Vec<(VolumeLabels, Arc<IoStats>)>,
}

impl<F> Collector for ViewCollector<F>
where
    F: Fn() -> Scrape + Send + Sync + 'static,
{
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let scrape = (self.view)();
        if let Some(node) = &scrape.node {
            encode_node(&mut enc, node)?;
        }
        encode_io(&mut enc, &scrape.io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, encode};
    use prometheus_client::registry::Registry;

    fn labels(id: &str) -> VolumeLabels {
        VolumeLabels {
            volume: id.into(),
            pvc_namespace: "ns".into(),
            pvc_name: "data".into(),
        }
    }

    fn sample(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{series} not in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn a_scrape_shows_the_node_its_volumes_and_their_io() {
        let io = Arc::new(IoStats::default());
        io.finished(io.started(), Op::Write, 4096, true);
        io.finished(io.started(), Op::Write, 4096, true);
        let _held = io.started();
        let view = NodeView {
            ready: true,
            fs_size: Some(1000),
            fs_free: Some(400),
            layers_allocated: 600,
            layers: 3,
            snapshots: 1,
            max_chain_depth: 16,
            volumes: vec![
                VolumeView {
                    labels: labels("vol-a"),
                    size: 1500,
                    head_allocated: 100,
                    chain_allocated: 300,
                    depth: Some(2),
                    staged: Some(StagedView {
                        mode: "nbd",
                        state: "attached",
                        paused_writes: 0,
                    }),
                },
                VolumeView {
                    labels: labels("vol-b"),
                    size: 500,
                    depth: None,
                    ..VolumeView::default()
                },
            ],
        };
        let mut registry = Registry::default();
        let io_for = io.clone();
        registry.register_collector(Box::new(ViewCollector::new(move || Scrape {
            node: Some(view.clone()),
            io: vec![(labels("vol-a"), io_for.clone())],
        })));
        let text = encode(&registry, Format::Prometheus).unwrap();
        let a = r#"volume="vol-a",pvc_namespace="ns",pvc_name="data""#;
        assert_eq!(sample(&text, "qcow2_csi_node_promised_bytes"), 2000.0);
        assert_eq!(sample(&text, "qcow2_csi_node_overcommit_ratio"), 2.0);
        assert_eq!(
            sample(&text, &format!("qcow2_csi_volume_chain_depth{{{a}}}")),
            2.0
        );
        assert!(!text.contains(r#"qcow2_csi_volume_chain_depth{volume="vol-b""#));
        assert_eq!(
            sample(
                &text,
                &format!(r#"qcow2_csi_volume_attachment{{{a},mode="nbd",state="attached"}}"#)
            ),
            1.0
        );
        let ops = format!(r#"qcow2_csi_volume_io_operations_total{{{a},op="write"}}"#);
        assert_eq!(sample(&text, &ops), 2.0);
        let bytes = format!(r#"qcow2_csi_volume_io_bytes_total{{{a},op="write"}}"#);
        assert_eq!(sample(&text, &bytes), 8192.0);
        let count = format!(r#"qcow2_csi_volume_io_duration_seconds_count{{{a},op="write"}}"#);
        assert_eq!(sample(&text, &count), 2.0);
        let inf =
            format!(r#"qcow2_csi_volume_io_duration_seconds_bucket{{{a},op="write",le="+Inf"}}"#);
        assert_eq!(sample(&text, &inf), 2.0);
        assert_eq!(
            sample(&text, &format!("qcow2_csi_volume_io_in_flight{{{a}}}")),
            1.0
        );
        // No bytes series for kinds that move none.
        assert!(!text.contains(r#"qcow2_csi_volume_io_bytes_total{volume="vol-a",pvc_namespace="ns",pvc_name="data",op="flush"}"#));

        let om = encode(&registry, Format::OpenMetrics).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(sample(&om, &ops), 2.0);
    }

    #[test]
    fn a_node_still_loading_shows_only_that() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ViewCollector::new(|| Scrape {
            node: Some(NodeView::default()),
            io: Vec::new(),
        })));
        let text = encode(&registry, Format::Prometheus).unwrap();
        assert_eq!(sample(&text, "qcow2_csi_node_ready"), 0.0);
        assert!(!text.contains("qcow2_csi_node_volumes"), "{text}");
    }

    #[test]
    fn an_unreadable_filesystem_shows_no_size_rather_than_a_full_disk() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ViewCollector::new(|| Scrape {
            node: Some(NodeView {
                ready: true,
                ..NodeView::default()
            }),
            io: Vec::new(),
        })));
        let text = encode(&registry, Format::Prometheus).unwrap();
        assert_eq!(sample(&text, "qcow2_csi_node_volumes"), 0.0);
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        for absent in [
            "qcow2_csi_node_filesystem_free_bytes",
            "qcow2_csi_node_filesystem_size_bytes",
            "qcow2_csi_node_overcommit_ratio",
        ] {
            assert!(!samples.iter().any(|l| l.starts_with(absent)), "{text}");
        }
    }
}
