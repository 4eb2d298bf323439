//! What the CSI plugin counts as it runs: RPCs, flattens, collections, takeovers, full-disk
//! pauses, volume condition changes, and each volume's I/O counters. The gauges (sizes,
//! depths, free space) are read at scrape time instead ([`super::scrape`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use qcow2_engine::sync::Recover;

use super::io::IoStats;

/// One label, both halves fixed strings (bounded by construction).
pub type Label = [(&'static str, &'static str); 1];
/// Two labels, both fixed strings.
pub type Labels2 = [(&'static str, &'static str); 2];

/// Why a staged volume's condition is abnormal (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its device ended with a previous plugin process.
    Lost,
    /// Writes are held: the node's filesystem is full.
    Full,
    /// Its block device node is gone.
    DeviceGone,
}

impl Reason {
    pub const ALL: [Reason; 3] = [Reason::Lost, Reason::Full, Reason::DeviceGone];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Lost => "lost",
            Reason::Full => "full",
            Reason::DeviceGone => "device_gone",
        }
    }
}

/// How a restarted plugin got a staged volume's device back (the `how` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Handed over, sockets and all, by the process before (a planned restart).
    Handover,
    /// Reconnected after the process before ended (a crash).
    Reattach,
    /// Taken back later by the healer (a process that served it ended after this one
    /// started).
    Heal,
}

impl Takeover {
    fn label(self) -> &'static str {
        match self {
            Takeover::Handover => "handover",
            Takeover::Reattach => "reattach",
            Takeover::Heal => "heal",
        }
    }
}

/// Buckets of operation durations (RPCs, flattens, collections), seconds: 1 ms to 10 min.
fn operation_buckets() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        300.0, 600.0,
    ])
}

/// The plugin's counters; registered with [`PluginMetrics::register`].
#[derive(Debug)]
pub struct PluginMetrics {
    /// Whether staged volumes count their requests (the metrics endpoint is on).
    count_io: bool,
    /// Each volume's I/O counters, kept from stage to stage until the volume is deleted.
    volumes: Mutex<HashMap<String, Arc<IoStats>>>,
    /// The last condition each staged volume was seen in.
    conditions: Mutex<HashMap<String, Reason>>,
    rpc_calls: Family<Labels2, Counter>,
    rpc_seconds: Family<Label, Histogram, fn() -> Histogram>,
    flattens: Family<Label, Counter>,
    flatten_seconds: Histogram,
    collections: Family<Label, Counter>,
    collection_seconds: Histogram,
    layers_collected: Counter,
    takeovers: Family<Label, Counter>,
    full_pauses: Counter,
    transitions: Family<Label, Counter>,
}

impl PluginMetrics {
    /// `count_io`: whether staged volumes' exports count their requests.
    pub fn new(count_io: bool) -> PluginMetrics {
        let metrics = PluginMetrics {
            count_io,
            volumes: Mutex::default(),
            conditions: Mutex::default(),
            rpc_calls: Family::default(),
            rpc_seconds: Family::new_with_constructor(operation_buckets),
            flattens: Family::default(),
            flatten_seconds: operation_buckets(),
            collections: Family::default(),
            collection_seconds: operation_buckets(),
            layers_collected: Counter::default(),
            takeovers: Family::default(),
            full_pauses: Counter::default(),
            transitions: Family::default(),
        };
        // Every reason and way of taking over shows from the start, at 0: an alert on
        // `increase()` then sees the first one.
        for r in Reason::ALL {
            let _ = metrics.transitions.get_or_create(&[("reason", r.label())]);
        }
        for t in [Takeover::Handover, Takeover::Reattach, Takeover::Heal] {
            let _ = metrics.takeovers.get_or_create(&[("how", t.label())]);
        }
        for r in ["done", "abandoned", "failed"] {
            let _ = metrics.flattens.get_or_create(&[("result", r)]);
        }
        for r in ["done", "failed"] {
            let _ = metrics.collections.get_or_create(&[("result", r)]);
        }
        metrics
    }

    /// Adds the counters to `registry` (they stay shared with this).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "qcow2_csi_rpc_calls",
            "CSI calls answered, by method and gRPC code",
            self.rpc_calls.clone(),
        );
        registry.register(
            "qcow2_csi_rpc_duration_seconds",
            "Time to answer a CSI call, by method",
            self.rpc_seconds.clone(),
        );
        registry.register(
            "qcow2_csi_flattens",
            "Background flatten runs, by result (done, abandoned because a snapshot froze the head, failed)",
            self.flattens.clone(),
        );
        registry.register(
            "qcow2_csi_flatten_duration_seconds",
            "Time a flatten run took, whatever its result",
            self.flatten_seconds.clone(),
        );
        registry.register(
            "qcow2_csi_collections",
            "Collections of layers nothing reaches, by result",
            self.collections.clone(),
        );
        registry.register(
            "qcow2_csi_collection_duration_seconds",
            "Time a collection took",
            self.collection_seconds.clone(),
        );
        registry.register(
            "qcow2_csi_layers_collected",
            "Layers deleted by collection",
            self.layers_collected.clone(),
        );
        registry.register(
            "qcow2_csi_takeovers",
            "Staged volumes whose device a restarted plugin took back, by how",
            self.takeovers.clone(),
        );
        registry.register(
            "qcow2_csi_full_disk_pauses",
            "Times a volume's writes were paused because the node's filesystem was full (ENOSPC or EDQUOT)",
            self.full_pauses.clone(),
        );
        registry.register(
            "qcow2_csi_volume_abnormal_transitions",
            "Times a staged volume's condition turned abnormal, by reason",
            self.transitions.clone(),
        );
    }

    /// The I/O counters a newly staged volume's export keeps: `None` when metrics are off.
    pub fn io_of(&self, volume: &str) -> Option<Arc<IoStats>> {
        if !self.count_io {
            return None;
        }
        let mut map = self.volumes.lock().recover();
        Some(map.entry(volume.to_string()).or_default().clone())
    }

    /// Every volume's I/O counters, by volume id.
    pub fn io(&self) -> Vec<(String, Arc<IoStats>)> {
        let map = self.volumes.lock().recover();
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The volume was deleted: its series go.
    pub fn forget_volume(&self, volume: &str) {
        self.volumes.lock().recover().remove(volume);
        self.conditions.lock().recover().remove(volume);
    }

    /// One CSI call answered. `method` is one of the CSI method names (anything else counts
    /// as `unknown`); `code` a gRPC code name.
    pub fn rpc(&self, method: &str, code: tonic::Code, took: Duration) {
        let method = super::rpc_method(method);
        self.rpc_calls
            .get_or_create(&[("method", method), ("code", super::code_name(code))])
            .inc();
        self.rpc_seconds
            .get_or_create(&[("method", method)])
            .observe(took.as_secs_f64());
    }

    /// A flatten run ended.
    pub fn flatten(&self, result: &'static str, took: Duration) {
        self.flattens.get_or_create(&[("result", result)]).inc();
        self.flatten_seconds.observe(took.as_secs_f64());
    }

    /// A collection ended, having deleted `collected` layers (`None`: it failed).
    pub fn collection(&self, collected: Option<usize>, took: Duration) {
        let result = if collected.is_some() {
            "done"
        } else {
            "failed"
        };
        self.collections.get_or_create(&[("result", result)]).inc();
        self.collection_seconds.observe(took.as_secs_f64());
        self.layers_collected.inc_by(collected.unwrap_or(0) as u64);
    }

    /// A restarted plugin took a staged volume's device back.
    pub fn takeover(&self, how: Takeover) {
        self.takeovers.get_or_create(&[("how", how.label())]).inc();
    }

    /// A volume's writes started waiting for space.
    pub fn full_disk_paused(&self) {
        self.full_pauses.inc();
    }

    /// Records staged volume `volume`'s condition as seen now (`None`: normal). A change to
    /// abnormal, or from one reason to another, is logged and counted; a return to normal is
    /// logged.
    pub fn condition(&self, volume: &str, now: Option<Reason>, message: &str) {
        let mut seen = self.conditions.lock().recover();
        let before = seen.get(volume).copied();
        if before == now {
            return;
        }
        match now {
            Some(r) => {
                seen.insert(volume.to_string(), r);
                drop(seen);
                self.transitions
                    .get_or_create(&[("reason", r.label())])
                    .inc();
                tracing::warn!(volume = %volume, reason = r.label(), message = %message, "volume condition: abnormal");
            }
            None => {
                seen.remove(volume);
                drop(seen);
                tracing::info!(volume = %volume, "volume condition: normal again");
            }
        }
    }

    /// Records a condition seen by asking (NodeGetVolumeStats, a scrape). A full disk is
    /// the pause's own to report, when it starts and ends ([`PluginMetrics::condition`]
    /// from the image): a poll that saw it just before it ended would count it again.
    pub fn polled(&self, volume: &str, now: Option<Reason>, message: &str) {
        if now != Some(Reason::Full) {
            self.condition(volume, now, message);
        }
    }

    /// Clears `volume`'s condition if it is `reason` (the cause ended).
    pub fn clear_condition(&self, volume: &str, reason: Reason) {
        let current = self.conditions.lock().recover().get(volume).copied();
        if current == Some(reason) {
            self.condition(volume, None, "");
        }
    }

    /// The volume is no longer staged: it has no condition.
    pub fn unstaged(&self, volume: &str) {
        self.conditions.lock().recover().remove(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transitions(m: &PluginMetrics, r: Reason) -> u64 {
        m.transitions.get_or_create(&[("reason", r.label())]).get()
    }

    #[test]
    fn a_condition_is_counted_when_it_turns_abnormal_not_while_it_stays() {
        let m = PluginMetrics::new(true);
        m.condition("v", None, "");
        assert_eq!(transitions(&m, Reason::Full), 0);
        m.condition("v", Some(Reason::Full), "full");
        m.condition("v", Some(Reason::Full), "still full");
        assert_eq!(transitions(&m, Reason::Full), 1);
        m.condition("v", Some(Reason::DeviceGone), "gone");
        assert_eq!(transitions(&m, Reason::DeviceGone), 1);
        // Only the cause that ended clears it.
        m.clear_condition("v", Reason::Full);
        m.condition("v", Some(Reason::DeviceGone), "gone");
        assert_eq!(transitions(&m, Reason::DeviceGone), 1);
        m.clear_condition("v", Reason::DeviceGone);
        m.condition("v", Some(Reason::Full), "full again");
        assert_eq!(transitions(&m, Reason::Full), 2);
        m.unstaged("v");
        m.condition("v", Some(Reason::Full), "staged again and full");
        assert_eq!(transitions(&m, Reason::Full), 3);
        // A poll that saw the pause just before it ended does not count it again.
        m.clear_condition("v", Reason::Full);
        m.polled("v", Some(Reason::Full), "seen before the end");
        assert_eq!(transitions(&m, Reason::Full), 3);
        m.polled("v", Some(Reason::Lost), "lost");
        assert_eq!(transitions(&m, Reason::Lost), 1);
    }

    #[test]
    fn io_counters_outlive_a_restage_and_go_with_the_volume() {
        let m = PluginMetrics::new(true);
        let a = m.io_of("v").unwrap();
        assert!(Arc::ptr_eq(&a, &m.io_of("v").unwrap()));
        m.forget_volume("v");
        assert!(m.io().is_empty());
        assert!(PluginMetrics::new(false).io_of("v").is_none());
    }
}
