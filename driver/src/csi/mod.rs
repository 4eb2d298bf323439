//! The CSI plugin: Identity, Controller and Node services over the state directory
//! ([`state`]).
//! `qcow2-csi serve` ([`serve`]) runs them on a unix socket.

pub mod attributes;
pub mod capability;
pub mod client;
pub mod contents;
pub mod controller;
pub mod flatten;
pub mod freeze;
pub mod group;
pub mod handoff;
pub mod host;
pub mod identity;
pub mod keys;
pub mod live;
pub mod locks;
pub mod modify;
pub mod mounts;
pub mod node;
pub mod observe;
pub mod options;
pub mod params;
pub mod paths;
pub mod rpclog;
pub mod serve;
pub mod snapshot;
pub mod staged;
pub mod staging;
pub mod state;

use qcow2_engine::sync::Recover;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::attach::Attacher;
use crate::error::{Error, Result};
use crate::metrics::plugin::PluginMetrics;
use state::State;

/// The driver name (`GetPluginInfo`, the `CSIDriver` object).
pub const DRIVER_NAME: &str = "qcow2.csi.dev";
/// The topology key: volumes live on one node.
pub const TOPOLOGY_KEY: &str = "topology.qcow2.csi.dev/node";

/// How the plugin was started.
#[derive(Debug, Clone)]
pub struct Config {
    pub driver_name: String,
    pub node_id: String,
    pub state_dir: PathBuf,
    /// Volumes a node may have staged at once (0: no limit).
    pub max_volumes: i64,
    /// How staged volumes become block devices.
    pub attach: crate::attach::Mode,
    /// Layers in a volume's chain past which it is flattened in the background (0: never).
    pub max_chain_depth: usize,
    /// After SIGTERM, how long to keep serving kernel nbd devices while waiting for a new
    /// process to take them over ([`handoff`]); then exit and leave them waiting.
    pub handoff_wait: std::time::Duration,
    /// kubelet's root directory: every staging and target path must lie under it.
    pub kubelet_dir: PathBuf,
    /// Whether staged volumes count their I/O (the metrics endpoint is on).
    pub metrics: bool,
    /// This node applies the VolumeAttributesClass of its volumes' PersistentVolumes from
    /// the Kubernetes API, so ControllerModifyVolume accepts (validated) volumes it does not
    /// have: they are other nodes' ([`modify::controller_modify`]).
    pub watch_volume_attributes: bool,
    /// This node labels the snapshot contents of its volumes for its own csi-snapshotter
    /// ([`contents`]): group snapshots need it under distributed snapshotting.
    pub label_snapshot_contents: bool,
    /// Where staged encrypted volumes' passphrases are kept (memory-backed; [`keys`]).
    pub key_dir: PathBuf,
}

/// The plugin's shared state: every service holds an `Arc` of it.
#[derive(Debug)]
pub struct Plugin {
    pub config: Config,
    /// `None` until the state directory is loaded (Probe says not ready meanwhile).
    state: Mutex<Option<State>>,
    /// Why loading failed, if it did: every RPC then says so.
    load_error: Mutex<Option<String>>,
    /// True once loading has ended, loaded or failed ([`Plugin::loaded`]).
    load_ended: tokio::sync::watch::Sender<bool>,
    pub locks: locks::Locks,
    /// Operations in progress (see [`Plugin::blocking`]).
    operations: AtomicUsize,
    /// Volumes staged on this node.
    pub node: staged::NodeState,
    /// How staged volumes become block devices.
    pub attacher: Attacher,
    /// The host tools the node service runs (mount, mkfs, ...).
    pub host: Arc<dyn host::HostTools>,
    /// Layers being made whose record is not written yet: collection leaves them alone.
    pending: Mutex<HashSet<String>>,
    /// Volumes with a flatten running.
    flattening: Mutex<HashSet<String>>,
    /// Handing the volumes over to a new process ([`handoff`]).
    pub handoff: handoff::Handoff,
    /// What the plugin counts for the metrics endpoint.
    pub metrics: Arc<PluginMetrics>,
    /// Passphrases of the staged encrypted volumes.
    pub keys: keys::KeyStore,
}

/// A layer being made ([`Plugin::pending_layer`]); no longer pending when dropped.
#[derive(Debug)]
pub struct PendingLayer<'a> {
    plugin: &'a Plugin,
    pub name: String,
}

impl Drop for PendingLayer<'_> {
    fn drop(&mut self) {
        self.plugin.pending.lock().recover().remove(&self.name);
    }
}

/// What loading the state directory found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// What interrupted operations left and was collected.
    pub cleanup: state::Cleanup,
    /// Volumes a previous process had staged.
    pub recovered: staged::Recovered,
}

impl Plugin {
    pub fn new(config: Config) -> Self {
        let attacher = Attacher::new(config.attach);
        Self::with_attacher(config, attacher)
    }

    /// A plugin attaching through `attacher` (tests: a simulated kernel).
    pub fn with_attacher(config: Config, attacher: Attacher) -> Self {
        Self::with_host(config, attacher, Arc::new(host::SystemTools))
    }

    /// A plugin attaching through `attacher` and running `host`'s tools (tests: a model).
    pub fn with_host(config: Config, attacher: Attacher, host: Arc<dyn host::HostTools>) -> Self {
        Self {
            host,
            node: staged::NodeState::new(&config.state_dir),
            metrics: Arc::new(PluginMetrics::new(config.metrics)),
            keys: keys::KeyStore::new(config.key_dir.clone()),
            config,
            state: Mutex::new(None),
            load_error: Mutex::new(None),
            load_ended: tokio::sync::watch::Sender::new(false),
            locks: locks::Locks::default(),
            operations: AtomicUsize::new(0),
            attacher,
            pending: Mutex::default(),
            flattening: Mutex::default(),
            handoff: handoff::Handoff::default(),
        }
    }

    /// Marks a flatten of `id` as running; false if one already is.
    pub(crate) fn begin_flatten(&self, id: &str) -> bool {
        self.flattening.lock().recover().insert(id.to_string())
    }

    /// Flattens running now.
    pub(crate) fn flattening(&self) -> usize {
        self.flattening.lock().recover().len()
    }

    pub(crate) fn end_flatten(&self, id: &str) {
        self.flattening.lock().recover().remove(id);
    }

    /// A fresh layer name, protected from collection until the guard drops (after the
    /// record that reaches it is written, or the operation failed).
    pub fn pending_layer(&self) -> PendingLayer<'_> {
        let name = format!("{}.qcow2", state::new_id("layer-"));
        self.pending.lock().recover().insert(name.clone());
        PendingLayer { plugin: self, name }
    }

    /// Deletes layers nothing reaches (after a delete); returns how many. The layer headers
    /// are read without the state lock (Probe, List and GetCapacity need it); a record
    /// written meanwhile means walking again.
    pub fn collect_garbage(&self) -> Result<usize> {
        let started = std::time::Instant::now();
        let collected = self.collect_unreached();
        let n = collected.as_ref().ok().copied();
        self.metrics.collection(n, started.elapsed());
        collected
    }

    fn collect_unreached(&self) -> Result<usize> {
        for _ in 0..3 {
            let (layers, roots) = {
                let st = self.state()?;
                (st.layers_dir(), st.roots())
            };
            let reach = state::walk(&layers, &roots);
            let mut st = self.state()?;
            if st.generation() != roots.generation {
                continue;
            }
            let pending = self.pending.lock().recover().clone();
            return st.collect(&reach, &pending);
        }
        tracing::info!("records keep changing: collection left to the next one");
        Ok(0)
    }

    /// Loads the state directory, collects what interrupted operations left, and takes back
    /// the volumes a previous process staged; only then do the services answer. A plugin
    /// process still running on this state directory hands its devices over first
    /// ([`handoff`]).
    pub fn load(&self) -> Result<Loaded> {
        failpoint("state-load"); // a slow state directory, in tests
        let loaded = handoff::request(&self.config.state_dir).and_then(|mut taking| {
            let (st, cleanup) = match State::load(&self.config.state_dir) {
                Ok(l) => l,
                Err(e) => {
                    if let Some(t) = taking {
                        t.refuse(&e.to_string());
                    }
                    return Err(e);
                }
            };
            if let Some(t) = taking.as_mut()
                && let Err(e) = t.ready()
            {
                if let Some(t) = taking {
                    t.refuse(&e.to_string());
                }
                return Err(e);
            }
            let recovered = self.node.recover(
                &st,
                &self.attacher,
                &self.config.state_dir,
                &self.keys,
                taking.as_mut().map(|t| &mut t.volumes),
                &self.metrics,
            );
            if let Some(t) = taking {
                match &recovered {
                    Ok(r) if r.not_adopted.is_empty() => t.accept()?,
                    Ok(r) => {
                        let why = format!("could not take over {:?}", r.not_adopted);
                        self.node.release(&r.adopted);
                        t.refuse(&why);
                        return Err(Error::Unavailable(format!(
                            "{why}; the previous plugin process serves on"
                        )));
                    }
                    Err(e) => {
                        t.refuse(&e.to_string());
                    }
                }
            }
            Ok((
                st,
                Loaded {
                    cleanup,
                    recovered: recovered?,
                },
            ))
        });
        let result = match loaded {
            Ok((st, loaded)) => {
                *self.state.lock().recover() = Some(st);
                Ok(loaded)
            }
            Err(e) => {
                *self.load_error.lock().recover() = Some(e.to_string());
                Err(e)
            }
        };
        self.load_ended.send_replace(true);
        result
    }

    /// Waits until loading the state directory has ended; true if it loaded. The API
    /// watches wait for it: an event read before would find none of the volumes and be
    /// passed over as another node's, and the watch would not see it again.
    pub async fn loaded(&self) -> bool {
        let mut ended = self.load_ended.subscribe();
        // The sender lives as long as `self`: the wait cannot fail while we borrow it.
        let _ = ended.wait_for(|ended| *ended).await;
        self.ready()
    }

    /// Why the state directory could not be loaded, if it could not.
    pub fn load_error(&self) -> Option<String> {
        self.load_error.lock().recover().clone()
    }

    pub fn ready(&self) -> bool {
        self.state.lock().recover().is_some()
    }

    /// The loaded state, or UNAVAILABLE while loading.
    pub fn state(&self) -> Result<StateGuard<'_>> {
        let g = self.state.lock().recover();
        if g.is_none() {
            return Err(Error::Unavailable(match self.load_error() {
                Some(e) => format!("the state directory failed to load: {e}"),
                None => "the state directory is still loading".into(),
            }));
        }
        Ok(StateGuard(g))
    }

    /// The record of volume `id`: INVALID_ARGUMENT without an id, NOT_FOUND for any id that
    /// names no volume (malformed ones included).
    pub fn volume_record(&self, id: &str) -> Result<state::VolumeRecord> {
        if id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        self.state()?
            .volume(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no volume {id:?}")))
    }

    /// This node's topology segment.
    pub fn topology(&self) -> csi_proto::v1::Topology {
        csi_proto::v1::Topology {
            segments: [(TOPOLOGY_KEY.to_string(), self.config.node_id.clone())].into(),
        }
    }
}

/// The loaded state under its lock.
#[derive(Debug)]
pub struct StateGuard<'a>(MutexGuard<'a, Option<State>>);

impl std::ops::Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.0.as_ref().expect("checked when locked")
    }
}

impl std::ops::DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.0.as_mut().expect("checked when locked")
    }
}

impl Plugin {
    /// Runs an operation's blocking work (file I/O, fsync, image creation) off the async
    /// executor, counted in [`Plugin::operations`] until it ends, even if the client gives up
    /// waiting: shutdown waits for these.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.operations.fetch_add(1, Ordering::SeqCst);
        // Counted first, refused second: a handover that set the flag after this count
        // waits for it, one that set it before is seen here.
        if self.handoff.handing.load(Ordering::SeqCst) {
            self.operations.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Unavailable(
                "this plugin process is handing its volumes over to a new one; retry".into(),
            ));
        }
        self.run_counted(f).await
    }

    /// Like [`Plugin::blocking`], but runs even while handing over (loading the state
    /// directory is what asks for a handover).
    pub(crate) async fn blocking_unchecked<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.operations.fetch_add(1, Ordering::SeqCst);
        self.run_counted(f).await
    }

    /// Runs `f` off the executor; it was counted in [`Plugin::operations`] by the caller
    /// and is uncounted when it ends.
    async fn run_counted<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        /// Uncounts the operation when dropped, even when `f` panics.
        struct Counted(Arc<Plugin>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.operations.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let counted = Counted(self.clone());
        // The caller's span (the RPC's, see `rpclog`) goes with the work to its thread.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _counted = counted;
            let _span = span.entered();
            f()
        })
        .await
        .map_err(|e| Error::Internal(format!("a worker thread failed: {e}")))?
    }

    /// Operations running now.
    pub fn operations(&self) -> usize {
        self.operations.load(Ordering::SeqCst)
    }
}

/// Crash-test hook: when `QCOW2_CSI_FAILPOINT` names this point, the process aborts here, as
/// a `kill -9` at that instant would (the restart tests use it); `NAME:sleep=MS` pauses here
/// instead (the shutdown tests use it to catch an operation in flight), and
/// `NAME:sleep-once=MS` pauses only the first time (a slow storage request). The variable is
/// read once per process. Compiled in only with the `failpoints` feature (the tests').
#[cfg(feature = "failpoints")]
pub(crate) fn failpoint(name: &str) {
    static SET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    static SLEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Some(v) = SET.get_or_init(|| {
        std::env::var_os("QCOW2_CSI_FAILPOINT").map(|v| v.to_string_lossy().into_owned())
    }) else {
        return;
    };
    let (point, action) = v.split_once(':').unwrap_or((v, "abort"));
    if point != name {
        return;
    }
    let ms = |prefix: &str| action.strip_prefix(prefix).and_then(|ms| ms.parse().ok());
    if let Some(ms) = ms("sleep-once=") {
        if !SLEPT.swap(true, Ordering::SeqCst) {
            eprintln!("qcow2-csi: failpoint {name}: sleeping {ms} ms, once");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        return;
    }
    match ms("sleep=") {
        Some(ms) => {
            eprintln!("qcow2-csi: failpoint {name}: sleeping {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        None => {
            eprintln!("qcow2-csi: failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

/// Without the `failpoints` feature a failpoint is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn failpoint(_name: &str) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> Config {
        Config {
            driver_name: DRIVER_NAME.into(),
            node_id: "n".into(),
            state_dir: dir.join("state"),
            max_volumes: 0,
            attach: crate::attach::Mode::Nbdfuse,
            max_chain_depth: 0,
            handoff_wait: std::time::Duration::ZERO,
            kubelet_dir: dir.to_path_buf(),
            watch_volume_attributes: false,
            label_snapshot_contents: false,
            metrics: false,
            key_dir: dir.join("keys"),
        }
    }

    #[tokio::test]
    async fn a_panicking_operation_is_uncounted() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = Arc::new(Plugin::new(config(dir.path())));
        let r: Result<()> = plugin.blocking(|| panic!("a bug in an RPC")).await;
        assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
        assert_eq!(plugin.operations(), 0, "shutdown would wait for it");
        plugin.blocking(|| Ok(())).await.unwrap();
        assert_eq!(plugin.operations(), 0);
    }

    /// The watches wait on `loaded`: it ends when loading ends, either way, and says which.
    #[tokio::test(flavor = "multi_thread")]
    async fn loaded_waits_for_the_load_and_says_whether_it_succeeded() {
        for fails in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            if fails {
                std::fs::write(dir.path().join("state"), b"a file, not a directory").unwrap();
            }
            let plugin = Arc::new(Plugin::new(config(dir.path())));
            let waiter = tokio::spawn({
                let plugin = plugin.clone();
                async move { plugin.loaded().await }
            });
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(!waiter.is_finished(), "returned before the load");
            let p = plugin.clone();
            let loaded = tokio::task::spawn_blocking(move || p.load()).await.unwrap();
            assert_eq!(loaded.is_err(), fails, "{loaded:?}");
            let said = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("still waiting after the load ended")
                .unwrap();
            assert_eq!(said, !fails);
            assert_eq!(
                plugin.loaded().await,
                !fails,
                "a later wait returns at once"
            );
        }
    }
}
