//! `qcow2-csi`: the plugin binary. `qcow2-csi nbd` serves one image over NBD on a unix socket
//! or a TCP address (the equivalent of `qemu-nbd`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
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
    /// Refuse writes.
    #[arg(long)]
    read_only: bool,
    /// Clients connected at once; further clients wait until one leaves.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    shared: u32,
    /// Keep serving after the last client disconnects.
    #[arg(long)]
    persistent: bool,
    /// Page cache (writeback) or O_DIRECT (none) for guest data.
    #[arg(long, default_value = "writeback")]
    cache: Cache,
    /// Image format (never probed).
    #[arg(long, default_value = "qcow2")]
    format: Format,
    /// What client discards do: free the space (unmap) or nothing (ignore).
    #[arg(long, default_value = "unmap")]
    discard: DiscardArg,
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
    }
}

fn nbd(args: NbdArgs) -> anyhow::Result<()> {
    let image = &args.image;
    let opts = OpenOptions {
        writable: !args.read_only,
        backing: BackingPolicy::Allow,
        cache: match args.cache {
            Cache::None => CacheMode::Direct,
            Cache::Writeback => CacheMode::Buffered,
        },
        ..OpenOptions::default()
    };
    let device: Arc<dyn BlockDevice> = match args.format {
        Format::Qcow2 => Arc::new(
            Image::open(image, &opts).with_context(|| format!("opening {}", image.display()))?,
        ),
        Format::Raw => Arc::new(
            RawFile::open(image, !args.read_only, opts.cache)
                .with_context(|| format!("opening {}", image.display()))?,
        ),
    };
    let mut export = Export::new(args.name, device);
    export.description = Some(image.display().to_string());
    export.discard = match args.discard {
        DiscardArg::Unmap => Discard::Unmap,
        DiscardArg::Ignore => Discard::Ignore,
    };
    let server = Arc::new(Server::new(
        vec![export],
        Limits {
            io_flusher: true,
            ..Limits::default()
        },
    ));
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
    let image_held = Arc::downgrade(&server);
    let serving = Serving::new(
        listener,
        server,
        ServeOptions {
            shared: args.shared as usize,
            persistent: args.persistent,
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
