//! `qcow2-csi`: the plugin binary. `qcow2-csi nbd` serves one image over NBD on a unix socket
//! (the equivalent of `qemu-nbd`).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use qcow2_csi::nbd::device::RawFile;
use qcow2_csi::nbd::{BlockDevice, Export, Limits, Server};
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
    /// Serve an image over NBD on a unix socket until killed.
    Nbd {
        /// Unix socket to listen on (a stale socket file is replaced; any other file is not).
        #[arg(long)]
        socket: PathBuf,
        /// Export name (clients asking for "" get this export too).
        #[arg(long, default_value = "")]
        name: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Page cache (writeback) or O_DIRECT (none) for guest data.
        #[arg(long, default_value = "writeback")]
        cache: Cache,
        /// Image format (never probed).
        #[arg(long, default_value = "qcow2")]
        format: Format,
        /// The qcow2 image.
        image: PathBuf,
    },
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

fn listen(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Nbd {
            socket,
            name,
            read_only,
            cache,
            format,
            image,
        } => {
            let opts = OpenOptions {
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
                    Image::open(&image, &opts)
                        .with_context(|| format!("opening {}", image.display()))?,
                ),
                Format::Raw => Arc::new(
                    RawFile::open(&image, !read_only, opts.cache)
                        .with_context(|| format!("opening {}", image.display()))?,
                ),
            };
            let server = Arc::new(Server::new(
                vec![Export {
                    name,
                    description: Some(image.display().to_string()),
                    device,
                }],
                Limits {
                    io_flusher: true,
                    ..Limits::default()
                },
            ));
            let listener = listen(&socket)?;
            eprintln!(
                "qcow2-csi: serving {} on {}",
                image.display(),
                socket.display()
            );
            serve_until_signal(&listener, &socket, server)?;
            let _ = std::fs::remove_file(&socket);
            Ok(())
        }
    }
}

/// Accepts connections, one thread each, until SIGTERM or SIGINT; then stops accepting, lets
/// every connection finish the request it is serving (their read side is shut down), and
/// returns once all are done, so that dropping the server closes the image cleanly.
fn serve_until_signal(
    listener: &UnixListener,
    socket: &Path,
    server: Arc<Server>,
) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("installing signal handlers")?;
    let waker = {
        let (stop, socket) = (stop.clone(), socket.to_path_buf());
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                stop.store(true, Ordering::SeqCst);
                // Wake the accept() below.
                let _ = UnixStream::connect(&socket);
            }
        })
    };
    // Open connections by id: a second handle of each, to shut its read side at stop. A
    // connection removes its own entry when it ends, so its socket closes at once (a client
    // waiting for the server to hang up, after ABORT say, is not kept waiting).
    let open: Arc<Mutex<HashMap<u64, UnixStream>>> = Arc::default();
    let mut threads = Vec::new();
    for (id, conn) in listener.incoming().enumerate() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("qcow2-csi: accept: {e}");
                continue;
            }
        };
        let id = id as u64;
        open.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn.try_clone().context("cloning a connection")?);
        let (server, open) = (server.clone(), open.clone());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = server.serve(conn) {
                eprintln!("qcow2-csi: connection ended: {e}");
            }
            open.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        }));
        threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    let draining: Vec<UnixStream> = open
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, s)| s)
        .collect();
    eprintln!(
        "qcow2-csi: stopping: draining {} connections",
        draining.len()
    );
    for stream in draining {
        let _ = stream.shutdown(Shutdown::Read);
    }
    for t in threads {
        let _ = t.join();
    }
    let _ = waker.join();
    match Arc::try_unwrap(server) {
        Ok(server) => drop(server),
        Err(_) => anyhow::bail!("a connection still holds the image"),
    }
    eprintln!("qcow2-csi: image closed");
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
