//! `qcow2-csi`: the plugin binary. `qcow2-csi nbd` serves one image over NBD on a unix socket
//! or a TCP address (the equivalent of `qemu-nbd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use qcow2_csi::attach::{Attacher, Mode, Volume};
use qcow2_csi::nbd::device::RawFile;
use qcow2_csi::nbd::listen::{Endpoint, Listener, ServeOptions, Serving};
use qcow2_csi::nbd::{BlockDevice, Discard, Export, Limits, Server};
use qcow2_engine::{BackingPolicy, CacheMode, Image, OpenOptions};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

#[derive(Parser, Debug)]
#[command(name = "qcow2-csi", version, about = "qcow2 volumes for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve an image over NBD until SIGTERM/SIGINT (or, without --persistent, until the
    /// last client leaves); then drain, flush and close.
    Nbd(NbdArgs),
    /// Run the CSI plugin (Identity, Controller, Node) on a unix socket until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Attach an image as a block device on this host (kernel nbd, or nbdfuse + loop), print
    /// the device path, serve it until SIGTERM/SIGINT, then detach and close.
    Attach(AttachArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The CSI endpoint, unix:///PATH (the parent directory is created; a stale socket is
    /// replaced).
    #[arg(long, default_value = "unix:///tmp/qcow2-csi/csi.sock")]
    endpoint: String,
    /// This node's id (Kubernetes: the node name).
    #[arg(long)]
    node_id: String,
    /// Where layers and volume records live.
    #[arg(long, default_value = "/var/lib/qcow2-csi")]
    state_dir: PathBuf,
    /// The CSI driver name.
    #[arg(long, default_value = qcow2_csi::csi::DRIVER_NAME)]
    driver_name: String,
    /// Where the passphrases of staged encrypted volumes are kept, one root-only file each,
    /// so a restarted plugin can reopen them: must be on tmpfs or ramfs (a host path under
    /// /run), never beside the layers.
    #[arg(long, default_value = qcow2_csi::csi::keys::DEFAULT_DIR)]
    key_dir: PathBuf,
    /// Volumes this node may have staged at once (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: u32,
    /// Layers in a volume's chain (head included) past which a background job flattens it;
    /// every snapshot and clone adds one (0: never flatten).
    #[arg(long, default_value_t = qcow2_csi::csi::flatten::DEFAULT_MAX_DEPTH)]
    max_chain_depth: usize,
    /// How staged volumes become block devices: kernel nbd, nbdfuse + loop, or whichever
    /// this host has (kernel first).
    #[arg(long, default_value = "auto")]
    attach: AttachMode,
    /// Log lines as text or JSON.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    /// After SIGTERM, seconds to keep serving kernel nbd devices while a new plugin process
    /// may take them over without a pause (a rolling update); then exit and leave them to
    /// the next process. Keep it below the pod's termination grace period.
    #[arg(long, default_value_t = 20)]
    handoff_wait: u64,
    /// kubelet's root directory. Every staging and target path a node request names must
    /// lie under it once symlinks are resolved; anything else is refused.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (`:PORT`: every IPv4 address);
    /// empty: no endpoint, and staged volumes do not count their I/O.
    #[arg(long, default_value = "")]
    metrics_address: String,
    /// Apply the VolumeAttributesClass of this node's volumes from the Kubernetes API (the
    /// in-cluster service account): the csi-resizer's ControllerModifyVolume reaches one
    /// leader, which validates the class; each volume's own node applies it, live.
    #[arg(long)]
    watch_volume_attributes: bool,
    /// Label the snapshot contents of this node's volumes (group snapshots and their
    /// members) `snapshot.storage.kubernetes.io/managed-by=<node id>`, so that this node's
    /// csi-snapshotter (`--node-deployment`) takes them: the snapshot-controller labels
    /// single snapshots only.
    #[arg(long)]
    label_snapshot_contents: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct AttachArgs {
    /// Kernel nbd, nbdfuse + loop, or whichever this host has (kernel first).
    #[arg(long, default_value = "auto")]
    mode: AttachMode,
    /// Volume id: the kernel device's backend identifier (default: the image's file name).
    #[arg(long)]
    id: Option<String>,
    /// Private directory for the nbdfuse socket and mount (default: IMAGE.attach/).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    image: ImageArgs,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AttachMode {
    Auto,
    Nbd,
    /// Kernel nbd through the ioctls (kernels without the netlink family).
    NbdIoctl,
    Nbdfuse,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("listen").required(true)))]
struct NbdArgs {
    /// Unix socket to listen on (a stale socket file is replaced; any other file is not).
    #[arg(long, group = "listen")]
    socket: Option<PathBuf>,
    /// TCP address to listen on, ADDR:PORT (no TLS: keep it on a trusted network).
    #[arg(long, group = "listen")]
    bind: Option<SocketAddr>,
    /// Export name (clients asking for "" get this export too).
    #[arg(long, default_value = "")]
    name: String,
    /// Clients connected at once; further clients wait until one leaves.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    shared: u32,
    /// Keep serving after the last client disconnects.
    #[arg(long)]
    persistent: bool,
    /// Disconnect a client silent this many seconds with nothing in flight (or stalled inside
    /// a request, or not reading its replies), freeing its `--shared` slot; 0 never does.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// At SIGTERM or SIGINT, seconds the connections get to answer what they have read
    /// before they are cut off.
    #[arg(long, default_value_t = 5)]
    drain_timeout: u64,
    /// Serve Prometheus metrics of the export's requests at http://ADDR:PORT/metrics
    /// (`:PORT`: every IPv4 address); empty: none, and requests are not counted.
    #[arg(long, default_value = "")]
    metrics_address: String,
    /// QoS: READs per second (0: no limit).
    #[arg(long, default_value = "")]
    read_iops: String,
    /// QoS: WRITEs (and zeroings, trims) per second (0: no limit).
    #[arg(long, default_value = "")]
    write_iops: String,
    /// QoS: bytes read per second, with K, M or G (0: no limit).
    #[arg(long, default_value = "")]
    read_bytes_per_second: String,
    /// QoS: bytes written per second, with K, M or G (0: no limit).
    #[arg(long, default_value = "")]
    write_bytes_per_second: String,
    /// QoS: seconds of each rate an idle export may spend at once.
    #[arg(long, default_value = "1")]
    burst_seconds: String,
    #[command(flatten)]
    image: ImageArgs,
}

/// The image and how it is opened and exported: shared by `nbd` and `attach`.
#[derive(Args, Debug)]
struct ImageArgs {
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Page cache (writeback) or O_DIRECT (none) for guest data.
    #[arg(long, default_value = "writeback")]
    cache: Cache,
    /// Image format (never probed).
    #[arg(long, default_value = "qcow2")]
    format: Format,
    /// What client discards do: free the space (unmap) or nothing (ignore).
    #[arg(long, default_value = "unmap")]
    discard: DiscardArg,
    /// The passphrase of a LUKS-encrypted image (and its encrypted backing files): all the
    /// bytes of this file, as QEMU's `--object secret,file=` reads them. Never on the
    /// command line, where every user of the host could read it.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// The image.
    image: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DiscardArg {
    Unmap,
    Ignore,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Qcow2,
    Raw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Cache {
    None,
    Writeback,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Nbd(args) => nbd(args),
        Command::Attach(args) => attach(args),
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    anyhow::ensure!(!args.node_id.is_empty(), "--node-id must not be empty");
    let metrics_address = metrics_address(&args.metrics_address)?;
    // Layers, records and work files are the tenants' data: no one else on the host reads
    // them (the state directory itself is made 0700 too).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let plugin = Arc::new(qcow2_csi::csi::Plugin::new(qcow2_csi::csi::Config {
        driver_name: args.driver_name,
        node_id: args.node_id,
        state_dir: args.state_dir,
        max_volumes: i64::from(args.max_volumes),
        attach: mode_of(args.attach),
        max_chain_depth: args.max_chain_depth,
        handoff_wait: Duration::from_secs(args.handoff_wait),
        kubelet_dir: args.kubelet_dir,
        metrics: metrics_address.is_some(),
        watch_volume_attributes: args.watch_volume_attributes,
        label_snapshot_contents: args.label_snapshot_contents,
        key_dir: args.key_dir,
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        if let Some(address) = metrics_address {
            let listener = qcow2_csi::metrics::http::bind(address)
                .await
                .with_context(|| format!("listening for metrics on {address}"))?;
            let address = listener.local_addr().unwrap_or(address);
            tracing::info!(%address, "serving metrics at /metrics");
            let registry = Arc::new(qcow2_csi::csi::observe::registry(&plugin));
            // Served until the process exits.
            tokio::spawn(qcow2_csi::metrics::http::serve(
                listener,
                registry,
                std::future::pending(),
            ));
        }
        if plugin.config.watch_volume_attributes {
            tokio::spawn(qcow2_csi::csi::attributes::watch(plugin.clone()));
        }
        if plugin.config.label_snapshot_contents {
            tokio::spawn(qcow2_csi::csi::contents::watch(plugin.clone()));
        }
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received: draining RPCs");
        };
        qcow2_csi::csi::serve::serve(plugin, &args.endpoint, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
}

/// A server of one export: the image opened as asked.
fn open_server(
    args: &ImageArgs,
    name: String,
    idle_timeout: Option<Duration>,
    stats: Option<Arc<qcow2_csi::metrics::io::IoStats>>,
    qos: Option<qcow2_csi::nbd::qos::Limits>,
) -> anyhow::Result<Arc<Server>> {
    let ImageArgs {
        read_only,
        cache,
        format,
        discard,
        ref passphrase_file,
        ref image,
    } = *args;
    let passphrase = match passphrase_file {
        None => None,
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("reading the passphrase file {}", path.display()))?;
            anyhow::ensure!(
                !bytes.is_empty(),
                "the passphrase file {} is empty",
                path.display()
            );
            Some(qcow2_engine::crypto::Passphrase::new(bytes))
        }
    };
    let opts = OpenOptions {
        passphrase,
        writable: !read_only,
        backing: BackingPolicy::Allow,
        cache: match cache {
            Cache::None => CacheMode::Direct,
            Cache::Writeback => CacheMode::Buffered,
        },
        ..OpenOptions::default()
    };
    let device: Arc<dyn BlockDevice> = match format {
        Format::Qcow2 => Arc::new(
            Image::open(image, &opts).with_context(|| format!("opening {}", image.display()))?,
        ),
        Format::Raw => Arc::new(
            RawFile::open(image, !read_only, opts.cache)
                .with_context(|| format!("opening {}", image.display()))?,
        ),
    };
    let mut export = Export::new(name, device);
    export.description = Some(image.display().to_string());
    export.stats = stats;
    // Attached even with no limit, as on a CSI volume: one atomic load per request.
    export.qos = qos.map(|l| Arc::new(qcow2_csi::nbd::qos::Qos::new(l)));
    export.discard = match discard {
        DiscardArg::Unmap => Discard::Unmap,
        DiscardArg::Ignore => Discard::Ignore,
    };
    Ok(Arc::new(Server::new(
        vec![export],
        Limits {
            io_flusher: true,
            idle_timeout,
            ..Limits::default()
        },
    )))
}

/// `--metrics-address`: `None` when empty.
fn metrics_address(arg: &str) -> anyhow::Result<Option<SocketAddr>> {
    if arg.is_empty() {
        return Ok(None);
    }
    qcow2_csi::metrics::http::parse_address(arg)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("--metrics-address: {e}"))
}

/// Serves the metrics of one export's requests on `address`, on a thread of its own, until
/// the process exits; returns the address bound.
fn serve_export_metrics(
    address: SocketAddr,
    volume: String,
    stats: Arc<qcow2_csi::metrics::io::IoStats>,
) -> anyhow::Result<SocketAddr> {
    use qcow2_csi::metrics::scrape::{Scrape, ViewCollector, VolumeLabels};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the metrics runtime")?;
    let listener = runtime
        .block_on(qcow2_csi::metrics::http::bind(address))
        .with_context(|| format!("listening for metrics on {address}"))?;
    let bound = listener.local_addr().unwrap_or(address);
    let mut registry = prometheus_client::registry::Registry::default();
    qcow2_csi::metrics::register_build_info(&mut registry);
    let labels = VolumeLabels {
        volume,
        ..VolumeLabels::default()
    };
    registry.register_collector(Box::new(ViewCollector::new(move || Scrape {
        node: None,
        io: vec![(labels.clone(), stats.clone())],
    })));
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(qcow2_csi::metrics::http::serve(
                listener,
                Arc::new(registry),
                std::future::pending(),
            ));
        })
        .context("starting the metrics thread")?;
    Ok(bound)
}

fn mode_of(m: AttachMode) -> Mode {
    match m {
        AttachMode::Auto => Mode::Auto,
        AttachMode::Nbd => Mode::Nbd,
        AttachMode::NbdIoctl => Mode::NbdIoctl,
        AttachMode::Nbdfuse => Mode::Nbdfuse,
    }
}

fn attach(args: AttachArgs) -> anyhow::Result<()> {
    let image = &args.image.image;
    // The one client is this process's own nbdfuse or kernel connection: it may idle.
    let server = open_server(&args.image, String::new(), None, None, None)?;
    let id = match args.id {
        Some(id) => id,
        None => image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the image path has no file name")?,
    };
    let work = args.work_dir.unwrap_or_else(|| {
        let mut w = image.clone().into_os_string();
        w.push(".attach");
        PathBuf::from(w)
    });
    let mode = mode_of(args.mode);
    // Installed before attaching, so a signal during the attach is not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let image_held = Arc::downgrade(&server);
    let attached = Attacher::new(mode)
        .attach(Volume {
            id: &id,
            server,
            work_dir: &work,
        })
        .with_context(|| format!("attaching {}", image.display()))?;
    println!("{}", attached.device().display());
    eprintln!(
        "qcow2-csi: {} attached as {} ({:?})",
        image.display(),
        attached.device().display(),
        attached.mode()
    );
    signals.forever().next();
    attached.detach().context("detaching")?;
    anyhow::ensure!(image_held.strong_count() == 0, "the image is still held");
    let _ = std::fs::remove_dir(work.join("fuse"));
    let _ = std::fs::remove_dir(&work);
    eprintln!("qcow2-csi: detached and closed {}", image.display());
    Ok(())
}

fn nbd(args: NbdArgs) -> anyhow::Result<()> {
    let image = &args.image.image;
    let idle = (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout));
    let metrics = metrics_address(&args.metrics_address)?;
    let stats = metrics.map(|_| Arc::new(qcow2_csi::metrics::io::IoStats::default()));
    let volume = match args.name.as_str() {
        "" => image
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        name => name.to_string(),
    };
    // The same names, checks and messages as the StorageClass parameters.
    let qos = qcow2_csi::nbd::qos::Limits::parse(
        &[
            ("readIOPS", &args.read_iops),
            ("writeIOPS", &args.write_iops),
            ("readBytesPerSecond", &args.read_bytes_per_second),
            ("writeBytesPerSecond", &args.write_bytes_per_second),
            ("burstSeconds", &args.burst_seconds),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect(),
    )?;
    let server = open_server(&args.image, args.name, idle, stats.clone(), Some(qos))?;
    let endpoint = match (args.socket, args.bind) {
        (Some(path), _) => Endpoint::Unix(path),
        (None, Some(addr)) => Endpoint::Tcp(addr),
        (None, None) => unreachable!("clap requires --socket or --bind"),
    };
    let listener = Listener::bind(&endpoint)?;
    eprintln!(
        "qcow2-csi: serving {} on {}",
        image.display(),
        listener.local()
    );
    if let (Some(address), Some(stats)) = (metrics, stats) {
        let bound = serve_export_metrics(address, volume, stats)?;
        eprintln!("qcow2-csi: metrics at http://{bound}/metrics");
    }
    let image_held = Arc::downgrade(&server);
    let serving = Serving::new(
        listener,
        server,
        ServeOptions {
            shared: args.shared as usize,
            persistent: args.persistent,
            drain: Duration::from_secs(args.drain_timeout),
        },
    );
    let stopper = serving.stopper();
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let signal_handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stopper.stop();
        }
    });
    let served = serving.run()?;
    signal_handle.close();
    let _ = waiter.join();
    anyhow::ensure!(
        image_held.strong_count() == 0,
        "a connection still holds the image"
    );
    eprintln!("qcow2-csi: image closed after {served} connections");
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcow2-csi: {e:#}");
            ExitCode::FAILURE
        }
    }
}
