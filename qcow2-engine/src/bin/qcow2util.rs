//! `qcow2util`: create, inspect, map and convert qcow2 images.
//!
//! Keeps the command shape of go-qcow2lib's tool (`create`, `info`, `dd`) and adds `map`.
//! Errors are one line on stderr and exit status 1; usage errors exit 2.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use qcow2_engine::crypto::luks;
use qcow2_engine::crypto::{IvGen, Passphrase};
use qcow2_engine::format::CompressionType;
use qcow2_engine::ops::create::NewEncryption;
use qcow2_engine::ops::{bench, check, convert, info, map};
use qcow2_engine::storage::FileStorage;
use qcow2_engine::{BackingFormat, CreateOptions, Image, OpenOptions};

#[derive(Parser, Debug)]
#[command(
    name = "qcow2util",
    version,
    about = "Create, inspect, map and convert qcow2 images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new image (never overwrites an existing file).
    Create {
        /// Image file to create.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Virtual size (bytes, or with a K/M/G/T suffix); defaults to the backing file's size.
        #[arg(short = 's', long = "size", value_parser = parse_size)]
        size: Option<u64>,
        /// Backing file (stored as given; relative names are relative to the new image).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Backing file format (required with -b: formats are never probed).
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<Fmt>,
        /// Extended L2 entries: 32 subclusters per cluster.
        #[arg(long = "enable-subcluster")]
        enable_subcluster: bool,
        /// Cluster size: a power of two from 512 to 2M.
        #[arg(long = "cluster-size", value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Refcount width in bits (1, 2, 4, 8, 16, 32, 64).
        #[arg(long = "refcount-bits", default_value_t = 16)]
        refcount_bits: u32,
        /// How compressed clusters are compressed.
        #[arg(long = "compression-type", default_value = "zlib")]
        compression_type: CompressionArg,
        #[command(flatten)]
        encrypt: EncryptArgs,
        #[command(flatten)]
        secret: Secret,
        /// Keep guest data in this new external data file (stored as given; a relative
        /// name is relative to the new image), as QEMU's data_file.
        #[arg(long = "data-file")]
        data_file: Option<String>,
        /// Keep the data file a consistent raw image of the guest disk (QEMU's
        /// data_file_raw; no backing file then).
        #[arg(long = "data-file-raw", requires = "data_file")]
        data_file_raw: bool,
    },
    /// Print image information as JSON (qemu-img info keys).
    Info {
        /// Image file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Add the backing chain and metadata statistics.
        #[arg(long)]
        detail: bool,
        /// Indent the JSON.
        #[arg(long)]
        pretty: bool,
        /// Read an image another process holds, without locking (its metadata may be changing).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        secret: Secret,
    },
    /// Convert between raw and qcow2; zero blocks are not written (sparse output).
    Dd {
        /// Input file.
        #[arg(short = 'i', long = "input")]
        input: PathBuf,
        /// Input format.
        #[arg(short = 'f', long = "format", default_value = "raw")]
        format: Fmt,
        /// Output file (must not exist).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// Output format.
        #[arg(short = 'O', long = "output-format")]
        output_format: Fmt,
        /// L2 cache budget (bytes or with a suffix).
        #[arg(long = "l2-cache-size", value_parser = parse_size)]
        l2_cache_size: Option<u64>,
        /// Extended L2 entries for qcow2 output.
        #[arg(long = "enable-subcluster")]
        enable_subcluster: bool,
        /// Cluster size for qcow2 output.
        #[arg(long = "cluster-size", value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// Write the qcow2 output's data clusters compressed (like qemu-img convert -c).
        #[arg(short = 'c', long = "compress")]
        compress: bool,
        /// How compressed clusters are compressed.
        #[arg(long = "compression-type", default_value = "zlib")]
        compression_type: CompressionArg,
        /// Encrypt the qcow2 output with the passphrase (which also opens an encrypted
        /// input).
        #[command(flatten)]
        encrypt: EncryptArgs,
        #[command(flatten)]
        secret: Secret,
    },
    /// Check an image for corruptions and leaks, like `qemu-img check` (same findings, JSON
    /// keys and exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 not a
    /// qcow2 image).
    Check {
        /// Image file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Repair leaks, or leaks and corruptions.
        #[arg(short = 'r', long = "repair")]
        repair: Option<RepairArg>,
        /// Check an image another process holds, without locking (results may be inconsistent).
        #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
        force_share: bool,
        /// Output format.
        #[arg(long = "output", default_value = "human")]
        output: MapOutput,
    },
    /// Measure read or write throughput on an image, like `qemu-img bench` (threads stand in
    /// for queue depth). Prints IOPS, MiB/s and peak memory.
    Bench {
        /// Image file (qcow2).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Write (the default is to read).
        #[arg(short = 'w', long = "write")]
        write: bool,
        /// Sequential (stepping by -S) or random (block-aligned) offsets.
        #[arg(long = "pattern", default_value = "seq")]
        pattern: PatternArg,
        /// Request size.
        #[arg(short = 's', long = "size", value_parser = parse_size, default_value = "4K")]
        block: u64,
        /// Step between sequential requests (default: the request size).
        #[arg(short = 'S', long = "step", value_parser = parse_size)]
        step: Option<u64>,
        /// Queue depth: requests in flight (writes: one thread each).
        #[arg(short = 'd', long = "depth", default_value_t = 1)]
        depth: usize,
        /// Reads: threads sharing the depth, each submitting its share as one batch
        /// (io_uring where available); default: up to 4. 0: one thread per request, each a
        /// plain pread.
        #[arg(long = "threads")]
        threads: Option<usize>,
        /// Number of requests (default 75000 without --time, as qemu-img bench).
        #[arg(short = 'c', long = "count", conflicts_with = "time")]
        count: Option<u64>,
        /// Run for this many seconds instead of a count.
        #[arg(long = "time")]
        time: Option<f64>,
        /// Bypass the page cache for guest data (O_DIRECT; qemu's cache=none).
        #[arg(long = "direct")]
        direct: bool,
        /// First byte of the range requests fall in.
        #[arg(short = 'o', long = "offset", value_parser = parse_size, default_value = "0")]
        offset: u64,
        /// Length of that range (default: to the end of the image).
        #[arg(long = "range", value_parser = parse_size)]
        range: Option<u64>,
        /// Seed of the random pattern.
        #[arg(long = "seed", default_value_t = 1)]
        seed: u64,
        /// Flush after the last request, inside the timed part.
        #[arg(long = "flush")]
        flush: bool,
        /// Output format.
        #[arg(long = "output", default_value = "human")]
        output: MapOutput,
        #[command(flatten)]
        secret: Secret,
    },
    /// Show where the data of an image lives, through its backing chain.
    Map {
        /// Image file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Output format.
        #[arg(long = "output", default_value = "human")]
        output: MapOutput,
        /// Read an image another process holds, without locking.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        secret: Secret,
    },
}

/// Where the passphrase of an encrypted image comes from: never the command line, where
/// every user of the machine could read it.
#[derive(clap::Args, Debug)]
struct Secret {
    /// Read the passphrase of an encrypted image from this file: all its bytes, as QEMU's
    /// `--object secret,file=` reads them (a trailing newline is part of it).
    #[arg(long = "passphrase-file", conflicts_with = "passphrase_env")]
    passphrase_file: Option<PathBuf>,
    /// Read the passphrase from this environment variable.
    #[arg(long = "passphrase-env")]
    passphrase_env: Option<String>,
}

impl Secret {
    fn get(&self) -> anyhow::Result<Option<Passphrase>> {
        let bytes = match (&self.passphrase_file, &self.passphrase_env) {
            (Some(path), _) => std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("reading the passphrase file {}: {e}", path.display())
            })?,
            (None, Some(name)) => std::env::var_os(name)
                .ok_or_else(|| anyhow::anyhow!("the environment variable {name} is not set"))?
                .into_encoded_bytes(),
            (None, None) => return Ok(None),
        };
        anyhow::ensure!(!bytes.is_empty(), "the passphrase is empty");
        Ok(Some(Passphrase::new(bytes)))
    }
}

/// LUKS encryption of a new image (QEMU's `encrypt.format=luks` and its options).
#[derive(clap::Args, Debug)]
struct EncryptArgs {
    /// Encrypt the image (LUKS, as QEMU's encrypt.format=luks); needs a passphrase.
    #[arg(long = "encrypt")]
    encrypt: bool,
    /// AES key size.
    #[arg(
        long = "encrypt-cipher",
        default_value = "aes-256",
        requires = "encrypt"
    )]
    cipher: CipherArg,
    /// PBKDF2 hash of the key slot and digest.
    #[arg(long = "encrypt-hash", default_value = "sha256", requires = "encrypt")]
    hash: String,
    /// IV generator: plain64 (the default) or plain (32-bit sector numbers).
    #[arg(
        long = "encrypt-ivgen",
        default_value = "plain64",
        requires = "encrypt"
    )]
    ivgen: IvGenArg,
    /// Milliseconds of PBKDF2 an unlock costs on this CPU (QEMU's iter-time).
    #[arg(
        long = "encrypt-iter-time",
        default_value_t = 2000,
        requires = "encrypt"
    )]
    iter_time: u32,
}

impl EncryptArgs {
    fn new_encryption(&self, secret: Option<&Passphrase>) -> anyhow::Result<Option<NewEncryption>> {
        if !self.encrypt {
            return Ok(None);
        }
        let passphrase = secret.cloned().ok_or_else(|| {
            anyhow::anyhow!("--encrypt needs --passphrase-file or --passphrase-env")
        })?;
        Ok(Some(NewEncryption::New {
            passphrase,
            params: luks::NewHeader {
                aes_key_bytes: match self.cipher {
                    CipherArg::Aes128 => 16,
                    CipherArg::Aes256 => 32,
                },
                ivgen: match self.ivgen {
                    IvGenArg::Plain64 => IvGen::Plain64,
                    IvGenArg::Plain => IvGen::Plain,
                },
                hash: self.hash.parse()?,
                iter_time_ms: self.iter_time,
            },
        }))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CompressionArg {
    Zlib,
    Zstd,
}

impl From<CompressionArg> for CompressionType {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zlib => CompressionType::Zlib,
            CompressionArg::Zstd => CompressionType::Zstd,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CipherArg {
    #[value(name = "aes-256")]
    Aes256,
    #[value(name = "aes-128")]
    Aes128,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum IvGenArg {
    Plain64,
    Plain,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Fmt {
    Raw,
    Qcow2,
}

impl From<Fmt> for BackingFormat {
    fn from(f: Fmt) -> Self {
        match f {
            Fmt::Raw => BackingFormat::Raw,
            Fmt::Qcow2 => BackingFormat::Qcow2,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PatternArg {
    Seq,
    Rand,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RepairArg {
    Leaks,
    All,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MapOutput {
    Human,
    Json,
}

/// Parses `4096`, `64K`, `1.5G` style sizes (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} overflows"));
    }
    let f: f64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    if !f.is_finite() || f < 0.0 || f * mult as f64 > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}"));
    }
    Ok((f * mult as f64).round() as u64)
}

/// Exit status of `check` when the check could not be completed.
const CHECK_FAILED: u8 = 1;
/// Exit status of `check` for a file that is not a qcow2 image (qemu-img: format without checks).
const CHECK_UNSUPPORTED: u8 = 63;

fn run_check(file: &Path, repair: Option<RepairArg>, output: MapOutput, force_share: bool) -> u8 {
    let repair = match repair {
        None => check::Repair::None,
        Some(RepairArg::Leaks) => check::Repair::Leaks,
        Some(RepairArg::All) => check::Repair::All,
    };
    let writable = repair != check::Repair::None;
    let storage = if force_share {
        FileStorage::open_unlocked(file)
    } else {
        FileStorage::open(file, writable)
    };
    let result = storage
        .map_err(|e| qcow2_engine::Error::io(format!("opening {}", file.display()), e))
        .and_then(|s| {
            let storage: Arc<dyn qcow2_engine::storage::Storage> = Arc::new(s);
            check::check(&storage, repair)
        });
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let not_qcow2 =
                matches!(&e, qcow2_engine::Error::InvalidImage(m) if m.contains("magic"));
            if not_qcow2 {
                eprintln!("qcow2util: This image format does not support checks ({e})");
                return CHECK_UNSUPPORTED;
            }
            eprintln!("qcow2util: Check failed: {e}");
            return CHECK_FAILED;
        }
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    match output {
        MapOutput::Human => print!("{}", report.summary()),
        MapOutput::Json => {
            let mut v = serde_json::to_value(&report).expect("report serialises");
            if let Some(map) = v.as_object_mut() {
                map.insert("filename".into(), file.display().to_string().into());
                map.insert("format".into(), "qcow2".into());
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("value serialises")
            );
        }
    }
    report.exit_code() as u8
}

/// Runs a command; returns the exit status for commands that report one (check).
fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Check {
            file,
            repair,
            output,
            force_share,
        } => return Ok(run_check(&file, repair, output, force_share)),
        Command::Bench {
            file,
            write,
            pattern,
            block,
            step,
            depth,
            threads,
            count,
            time,
            direct,
            offset,
            range,
            seed,
            flush,
            output,
            secret,
        } => {
            let time = match time {
                Some(t) if t.is_finite() && t > 0.0 => Some(std::time::Duration::from_secs_f64(t)),
                Some(t) => anyhow::bail!("--time must be a positive number of seconds, not {t}"),
                None => None,
            };
            let opts = bench::BenchOptions {
                write,
                pattern: match pattern {
                    PatternArg::Seq => bench::Pattern::Seq,
                    PatternArg::Rand => bench::Pattern::Rand,
                },
                block,
                step,
                depth,
                threads: match threads {
                    None => Some(depth.clamp(1, 4)),
                    Some(0) => None,
                    Some(t) => Some(t),
                },
                count: count.or(if time.is_none() { Some(75_000) } else { None }),
                time,
                direct,
                offset,
                range,
                seed,
                flush,
                passphrase: secret.get()?,
                ..bench::BenchOptions::default()
            };
            let report = bench::bench_file(&file, &opts)?;
            match output {
                MapOutput::Human => println!("{}", report.summary()),
                MapOutput::Json => println!("{}", serde_json::to_string(&report)?),
            }
        }
        Command::Create {
            file,
            size,
            backing,
            backing_format,
            enable_subcluster,
            cluster_size,
            refcount_bits,
            compression_type,
            encrypt,
            secret,
            data_file,
            data_file_raw,
        } => {
            let encryption = encrypt.new_encryption(secret.get()?.as_ref())?;
            let backing = match (backing, backing_format) {
                (Some(b), Some(f)) => Some((b, f.into())),
                (Some(_), None) => {
                    anyhow::bail!("-b needs -F qcow2|raw (backing formats are never probed)")
                }
                (None, Some(_)) => anyhow::bail!("-F given without -b"),
                (None, None) => None,
            };
            let opts = CreateOptions {
                size,
                cluster_size,
                extended_l2: enable_subcluster,
                refcount_bits,
                backing,
                encryption,
                compression: compression_type.into(),
                data_file: data_file.map(|name| qcow2_engine::ops::create::NewDataFile {
                    name,
                    raw: data_file_raw,
                }),
            };
            qcow2_engine::create(&file, &opts)?;
            let img = Image::open(
                &file,
                &OpenOptions {
                    skip_backing: true,
                    ..OpenOptions::default()
                },
            )?;
            println!(
                "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} size={}{}",
                file.display(),
                cluster_size,
                if enable_subcluster { "on" } else { "off" },
                img.size(),
                if encrypt.encrypt {
                    " encrypt.format=luks"
                } else {
                    ""
                }
            );
        }
        Command::Info {
            file,
            detail,
            pretty,
            force_share,
            secret,
        } => {
            let info = info::info(&file, detail, force_share, secret.get()?.as_ref())?;
            let text = if pretty {
                serde_json::to_string_pretty(&info)?
            } else {
                serde_json::to_string(&info)?
            };
            println!("{text}");
        }
        Command::Dd {
            input,
            format,
            output,
            output_format,
            l2_cache_size,
            enable_subcluster,
            cluster_size,
            compress,
            compression_type,
            encrypt,
            secret,
        } => {
            let passphrase = secret.get()?;
            let opts = convert::ConvertOptions {
                input_format: format.into(),
                output_format: output_format.into(),
                create: CreateOptions {
                    cluster_size,
                    extended_l2: enable_subcluster,
                    encryption: encrypt.new_encryption(passphrase.as_ref())?,
                    compression: compression_type.into(),
                    ..CreateOptions::default()
                },
                compress,
                l2_cache_bytes: l2_cache_size,
                input_passphrase: passphrase.clone(),
                output_passphrase: None,
            };
            let bar = std::io::stderr().is_terminal().then(|| {
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .expect("valid template"),
                );
                bar
            });
            convert::convert(&input, &output, &opts, |done, total| {
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(done);
                }
            })?;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        }
        Command::Map {
            file,
            output,
            force_share,
            secret,
        } => {
            let opts = OpenOptions {
                force_share,
                passphrase: secret.get()?,
                ..OpenOptions::default()
            };
            let img = Image::open(&file, &opts)?;
            let extents = map::map(&img)?;
            let mut out = std::io::stdout().lock();
            match output {
                MapOutput::Json => {
                    writeln!(out, "[")?;
                    for (i, e) in extents.iter().enumerate() {
                        let sep = if i + 1 < extents.len() { "," } else { "" };
                        writeln!(out, "{}{sep}", serde_json::to_string(e)?)?;
                    }
                    writeln!(out, "]")?;
                }
                MapOutput::Human => {
                    writeln!(
                        out,
                        "{:<20}{:<20}{:<20}{:<8}Kind",
                        "Offset", "Length", "Mapped to", "Depth"
                    )?;
                    for e in extents.iter().filter(|e| e.present) {
                        let kind = if e.compressed {
                            "compressed"
                        } else if e.data {
                            "data"
                        } else {
                            "zero"
                        };
                        let mapped = e
                            .offset
                            .map(|o| format!("{o:#x}"))
                            .unwrap_or_else(|| "-".into());
                        writeln!(
                            out,
                            "{:<#20x}{:<#20x}{:<20}{:<8}{kind}",
                            e.start, e.length, mapped, e.depth
                        )?;
                    }
                }
            }
        }
    }
    Ok(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            // One line: the error and any causes its message does not already include.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !msg.contains(&cause) {
                    msg.push_str(": ");
                    msg.push_str(&cause);
                }
            }
            eprintln!("qcow2util: error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_accept_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4T"), Ok(4 << 40));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
