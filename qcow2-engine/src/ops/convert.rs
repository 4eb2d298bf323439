//! Converting between raw and qcow2 (`qcow2util dd`): sparse output, zero blocks never written.

use std::path::Path;
use std::sync::Arc;

use crate::error::{IoContext, Result};
use crate::image::{Image, OpenOptions};
use crate::ops::create::{self, CreateOptions};
use crate::ops::map;
use crate::storage::{FileStorage, Storage};
use crate::sync::Recover;

/// Image formats `convert` reads and writes.
pub use crate::ops::create::BackingFormat as Format;

/// Conversion settings.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Input format (never probed).
    pub input_format: Format,
    /// Output format.
    pub output_format: Format,
    /// Creation options for qcow2 output (the size is taken from the input).
    pub create: CreateOptions,
    /// L2 cache budget for qcow2 input and output.
    pub l2_cache_bytes: Option<u64>,
    /// qcow2 output: write data clusters compressed (zlib, or zstd with
    /// `create.compression`), like `qemu-img convert -c`.
    pub compress: bool,
    /// Passphrase of an encrypted qcow2 input (and its encrypted backing files).
    pub input_passphrase: Option<crate::crypto::Passphrase>,
    /// Passphrase that opens an encrypted output; by default the one a new key is made
    /// with (`create.encryption`).
    pub output_passphrase: Option<crate::crypto::Passphrase>,
}

/// A source of guest bytes with a cheap "known zero" hint.
enum Source {
    Raw {
        storage: Arc<dyn Storage>,
        size: u64,
    },
    Qcow2(Box<Image>),
}

impl Source {
    fn size(&self) -> u64 {
        match self {
            Source::Raw { size, .. } => *size,
            Source::Qcow2(img) => img.size(),
        }
    }

    /// Ranges `[start, end)` that may hold non-zero bytes.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        match self {
            Source::Raw { size, .. } => Ok(vec![(0, *size)]),
            Source::Qcow2(img) => Ok(map::map(img)?
                .into_iter()
                .filter(|e| e.data || !e.zero)
                .map(|e| (e.start, e.start + e.length))
                .collect()),
        }
    }

    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match self {
            Source::Raw { storage, .. } => storage
                .read_at(buf, off)
                .ctx(|| format!("reading input at {off:#x}")),
            Source::Qcow2(img) => img.read_at(buf, off),
        }
    }
}

enum Sink {
    Raw(FileStorage),
    Qcow2(Box<Image>),
    /// qcow2 output taking whole clusters compressed.
    Compressed(Box<Image>),
}

impl Sink {
    fn write(&self, buf: &[u8], off: u64) -> Result<()> {
        match self {
            Sink::Raw(s) => s
                .write_at(buf, off)
                .ctx(|| format!("writing output at {off:#x}")),
            Sink::Qcow2(img) | Sink::Compressed(img) => img.write_at(buf, off),
        }
    }
    fn flush(&self) -> Result<()> {
        match self {
            Sink::Raw(s) => s.flush().ctx(|| "syncing the output".to_string()),
            Sink::Qcow2(img) | Sink::Compressed(img) => img.flush(),
        }
    }
}

/// A chunk into a compressing sink: runs of whole non-zero clusters go compressed, zero
/// clusters are skipped, and the parts of clusters at the chunk's edges (the image's last,
/// short cluster) are written as usual.
fn write_compressed_chunk(sink: &Sink, img: &Image, chunk: &[u8], off: u64) -> Result<()> {
    let cs = img.geometry().cluster_size() as usize;
    let end = off + chunk.len() as u64;
    let first = off.next_multiple_of(cs as u64);
    let last = end - end % cs as u64;
    if first >= last {
        return write_nonzero(sink, chunk, off);
    }
    let head = (first - off) as usize;
    write_nonzero(sink, &chunk[..head], off)?;
    let mut run: Option<usize> = None;
    let whole = &chunk[head..head + (last - first) as usize];
    for (i, cluster) in whole.chunks(cs).enumerate() {
        let zero = cluster.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(start)) => {
                img.write_compressed(&whole[start * cs..i * cs], first + (start * cs) as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        img.write_compressed(&whole[start * cs..], first + (start * cs) as u64)?;
    }
    write_nonzero(sink, &chunk[head + whole.len()..], last)
}

/// Granularity of zero detection: runs of non-zero 4 KiB blocks are written, zero blocks are not.
const ZERO_BLOCK: usize = 4096;

fn write_nonzero(sink: &Sink, chunk: &[u8], off: u64) -> Result<()> {
    let mut run: Option<usize> = None;
    for (i, block) in chunk.chunks(ZERO_BLOCK).enumerate() {
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(i * ZERO_BLOCK),
            (true, Some(start)) => {
                sink.write(&chunk[start..i * ZERO_BLOCK], off + start as u64)?;
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        sink.write(&chunk[start..], off + start as u64)?;
    }
    Ok(())
}

/// Chunk size for copying: large enough for throughput, small enough for a fine zero map.
const CHUNK: usize = 2 << 20;
/// Threads writing the output while the calling thread reads the input: reads and writes
/// overlap, and an allocating write of one chunk overlaps another's (qemu-img convert keeps
/// 8 requests in flight for the same reason).
const WRITERS: usize = 2;
/// Chunks read ahead of the writers (the memory of a copy: `(WRITERS + AHEAD + 1) * CHUNK`,
/// the one more being read).
const AHEAD: usize = 4;

/// Converts `input` to a new file `output`, calling `progress(done, total)` as it goes.
pub fn convert(
    input: &Path,
    output: &Path,
    opts: &ConvertOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<()> {
    if opts.compress && opts.output_format != Format::Qcow2 {
        return Err(crate::error::Error::arg(
            "only qcow2 output can be compressed",
        ));
    }
    let source = match opts.input_format {
        Format::Raw => {
            let storage =
                FileStorage::open(input, false).ctx(|| format!("opening {}", input.display()))?;
            let size = storage
                .len()
                .ctx(|| format!("sizing {}", input.display()))?;
            // Read front to back once: a larger readahead, and no point keeping the pages.
            storage.advise_sequential();
            Source::Raw {
                storage: Arc::new(storage),
                size,
            }
        }
        Format::Qcow2 => {
            let o = OpenOptions {
                l2_cache_bytes: opts.l2_cache_bytes,
                passphrase: opts.input_passphrase.clone(),
                ..OpenOptions::default()
            };
            Source::Qcow2(Box::new(Image::open(input, &o)?))
        }
    };
    let size = source.size();
    let sink = match opts.output_format {
        Format::Raw => {
            let s =
                FileStorage::create_new(output).ctx(|| format!("creating {}", output.display()))?;
            s.set_len(size)
                .ctx(|| format!("sizing {}", output.display()))?;
            Sink::Raw(s)
        }
        Format::Qcow2 => {
            let c = CreateOptions {
                size: Some(size),
                backing: None,
                ..opts.create.clone()
            };
            create::create(output, &c)?;
            let passphrase =
                opts.output_passphrase
                    .clone()
                    .or_else(|| match &opts.create.encryption {
                        Some(create::NewEncryption::New { passphrase, .. }) => {
                            Some(passphrase.clone())
                        }
                        _ => None,
                    });
            let o = OpenOptions {
                l2_cache_bytes: opts.l2_cache_bytes,
                passphrase,
                ..OpenOptions::writable()
            };
            let img = Box::new(Image::open(output, &o)?);
            if opts.compress {
                Sink::Compressed(img)
            } else {
                Sink::Qcow2(img)
            }
        }
    };
    let result = copy(&source, &sink, size, &mut progress).and_then(|()| sink.flush());
    if let Err(e) = result {
        drop(sink);
        let _ = std::fs::remove_file(output);
        return Err(e);
    }
    Ok(())
}

/// Copies every data range: this thread reads chunks, [`WRITERS`] threads write their
/// non-zero blocks. Buffers go round between them (no allocation per chunk). The first
/// error stops both sides and is returned.
fn copy(
    source: &Source,
    sink: &Sink,
    size: u64,
    progress: &mut impl FnMut(u64, u64),
) -> Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(AHEAD);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..WRITERS + AHEAD + 1 {
        empty_tx
            .send(vec![0u8; CHUNK])
            .expect("the receiver is here");
    }
    let full_rx = Mutex::new(full_rx);
    let failed: Mutex<Option<crate::error::Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fail = |e| {
        stop.store(true, Ordering::Release);
        failed.lock().recover().get_or_insert(e);
    };
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            let empty_tx = empty_tx.clone();
            let (full_rx, fail, stop) = (&full_rx, &fail, &stop);
            scope.spawn(move || {
                loop {
                    let next = full_rx.lock().recover().recv();
                    let Ok((off, buf)) = next else { return };
                    let write = || match sink {
                        Sink::Compressed(img) => write_compressed_chunk(sink, img, &buf, off),
                        _ => write_nonzero(sink, &buf, off),
                    };
                    if !stop.load(Ordering::Acquire)
                        && let Err(e) = write()
                    {
                        fail(e);
                    }
                    let _ = empty_tx.send(buf);
                }
            });
        }
        let mut read_all = || -> Result<()> {
            let mut done = 0;
            for (start, end) in source.data_ranges()? {
                progress(start, size);
                let mut off = start;
                while off < end && !stop.load(Ordering::Acquire) {
                    let n = ((end - off) as usize).min(CHUNK - (off % CHUNK as u64) as usize);
                    let mut buf = empty_rx.recv().expect("buffers come back until we stop");
                    buf.resize(n, 0);
                    source.read(&mut buf, off)?;
                    if full_tx.send((off, buf)).is_err() {
                        break;
                    }
                    off += n as u64;
                    done = off;
                    progress(done, size);
                }
            }
            progress(size.max(done), size);
            Ok(())
        };
        if let Err(e) = read_all() {
            fail(e);
        }
        drop(full_tx); // the writers finish what is queued and stop
    });
    match failed.into_inner().recover() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
