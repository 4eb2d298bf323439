//! Keeping chains short. Every snapshot and clone adds a layer under a volume's head, and
//! reads that miss the upper layers walk down the chain. Past `--max-chain-depth` layers, a
//! background job flattens: it copies everything the head's backing chain holds into one new
//! standalone layer, then points the head at it. The head keeps its own data and the volume
//! reads the same bytes; the old layers go when nothing else (snapshots, clones) reaches them.
//!
//! The copy reads only frozen layers, so the volume stays in use meanwhile, staged or not.
//! Only the switch holds the volume: under its lock, a staged volume's export is quiesced
//! while the head's header names the new backing file (the same pause as a snapshot's
//! pivot). Crash safety: the copy is pending until the switch, so a crash before it leaves an
//! orphan for collection; the switch is one in-place rewrite of the backing name (same
//! length), after which the copy is reached and the old chain collected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qcow2_engine::crypto::Passphrase;
use qcow2_engine::ops::convert::{ConvertOptions, convert};
use qcow2_engine::ops::create::NewEncryption;
use qcow2_engine::{BackingFormat, BackingPolicy, CreateOptions, Image, OpenOptions};

use super::params::Params;
use super::{Plugin, failpoint};
use crate::error::{Error, Result};

/// Default `--max-chain-depth`: layers in a volume's chain, head included.
pub const DEFAULT_MAX_DEPTH: usize = 16;

/// How long the switch waits for the volume's lock (other operations hold it briefly).
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Layers in the chain from `head` down, head included.
pub fn depth(plugin: &Plugin, head: &str) -> Result<usize> {
    let st = plugin.state()?;
    let mut n = 1;
    let mut layer = head.to_string();
    while let Some(parent) = st.backing_of(&layer)? {
        n += 1;
        layer = parent;
    }
    Ok(n)
}

/// Failed runs retried (a second apart) before leaving it to the next check.
const RETRIES: u32 = 5;

/// Whether volume `id`'s chain is deeper than the limit.
fn still_deep(plugin: &Plugin, id: &str) -> bool {
    let limit = plugin.config.max_chain_depth;
    if limit == 0 {
        return false;
    }
    let volume = plugin.state().ok().and_then(|st| st.volume(id).cloned());
    let deep = volume.as_ref().map(|v| depth(plugin, &v.head));
    match deep {
        Some(Ok(d)) if d > limit && volume.is_some_and(|v| key_missing(plugin, &v)) => {
            tracing::info!(volume = %id, depth = d, "an encrypted chain is made shorter once the volume is staged (the copy needs its passphrase)");
            false
        }
        Some(Ok(d)) => d > limit,
        Some(Err(e)) => {
            tracing::warn!(volume = %id, error = %e, "measuring the chain");
            false
        }
        None => false,
    }
}

/// Whether `rec` is encrypted and this process has no passphrase for it (it is not staged
/// here): the copy must decrypt and encrypt.
fn key_missing(plugin: &Plugin, rec: &super::state::VolumeRecord) -> bool {
    let encrypted = Params::from_canonical(&rec.parameters).is_ok_and(|p| p.encrypted);
    encrypted && staged_passphrase(plugin, &rec.id).is_none()
}

fn staged_passphrase(plugin: &Plugin, id: &str) -> Option<Passphrase> {
    plugin.node.get(id).and_then(|s| s.passphrase.clone())
}

/// Starts a flatten of volume `id` in the background if its chain is deeper than the limit
/// and none is running for it (the running one measures again when it ends).
pub fn check(plugin: &Arc<Plugin>, id: &str) {
    if !still_deep(plugin, id) || !plugin.begin_flatten(id) {
        return;
    }
    let (worker, volume) = (plugin.clone(), id.to_string());
    let spawned = std::thread::Builder::new()
        .name("flatten".into())
        .spawn(move || {
            let (plugin, id) = (worker, volume);
            let mut failures = 0;
            let ended_ok = loop {
                let t = Instant::now();
                let done = flatten(&plugin, &id);
                let result = match &done {
                    Ok(true) => "done",
                    // The head changed, or the volume went.
                    Ok(false) | Err(Error::NotFound(_)) => "abandoned",
                    Err(_) => "failed",
                };
                plugin.metrics.flatten(result, t.elapsed());
                match &done {
                    Ok(true) => tracing::info!(volume = %id, ms = t.elapsed().as_millis() as u64, "flattened"),
                    Ok(false) => tracing::info!(volume = %id, "flatten abandoned: the head changed"),
                    Err(e) => tracing::warn!(volume = %id, error = %e, "flatten failed"),
                }
                if !matches!(done, Ok(true)) {
                    // A copy nothing reaches (the volume went, the switch failed) is collected.
                    if let Err(e) = plugin.collect_garbage() {
                        tracing::warn!(error = %e, "collecting after a flatten");
                    }
                }
                match done {
                    // The volume is gone: nothing to do.
                    Err(Error::NotFound(_)) => break false,
                    // A transient failure (the head open elsewhere for a moment, a full
                    // disk): try again a few times, then leave it to the next check.
                    Err(_) if failures < RETRIES => {
                        failures += 1;
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    Err(_) => break false,
                    // Snapshots taken meanwhile may have deepened the chain again (or frozen
                    // the head, which abandoned this run): measure again.
                    Ok(_) if still_deep(&plugin, &id) => failures = 0,
                    Ok(_) => break true,
                }
            };
            plugin.end_flatten(&id);
            // A snapshot between the last measure and the end above found this run still
            // going and started none: measure once more (not after failures, which the
            // next snapshot or load retries).
            if ended_ok {
                check(&plugin, &id);
            }
        });
    if let Err(e) = spawned {
        // Not left marked as flattening: the next snapshot or load tries again.
        plugin.end_flatten(id);
        tracing::warn!(volume = %id, error = %e, "could not start a flatten thread");
    }
}

/// Flattens the chain under volume `id`'s head; `Ok(false)` when the head changed during
/// the copy (a snapshot froze it), which leaves everything as it was.
pub fn flatten(plugin: &Plugin, id: &str) -> Result<bool> {
    let rec = plugin.volume_record(id)?;
    let params = Params::from_canonical(&rec.parameters)?;
    let (layers, head_path, backing) = {
        let st = plugin.state()?;
        let Some(backing) = st.backing_of(&rec.head)? else {
            return Ok(true); // nothing under the head
        };
        (st.layers_dir(), st.layer_path(&rec.head), backing)
    };
    // An encrypted chain is copied into a layer with the head's key.
    let passphrase = match params.encrypted {
        false => None,
        true => Some(staged_passphrase(plugin, id).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {id} is encrypted and not staged here: it is flattened when staged"
            ))
        })?),
    };
    let copy = plugin.pending_layer();
    let copy_path = layers.join(&copy.name);
    convert(
        &layers.join(&backing),
        &copy_path,
        &ConvertOptions {
            input_format: BackingFormat::Qcow2,
            output_format: BackingFormat::Qcow2,
            create: CreateOptions {
                cluster_size: params.cluster_size,
                extended_l2: params.subclusters,
                encryption: passphrase
                    .as_ref()
                    .map(|_| NewEncryption::SameKeyAs(head_path.clone())),
                ..CreateOptions::default()
            },
            l2_cache_bytes: None,
            compress: false,
            input_passphrase: passphrase.clone(),
            output_passphrase: passphrase.clone(),
        },
        |_, _| {},
    )
    .map_err(|e| Error::engine(format!("copying the chain under {}", rec.head), e))?;
    failpoint("flatten-after-copy");

    let deadline = Instant::now() + LOCK_WAIT;
    let _held = loop {
        match plugin.locks.try_lock(id.to_string()) {
            Ok(g) => break g,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            // The copy is left to collection (nothing reaches it).
            Err(e) => return Err(e),
        }
    };
    let now = plugin.volume_record(id)?;
    if now.head != rec.head || plugin.state()?.backing_of(&now.head)? != Some(backing.clone()) {
        super::state::remove_durably(&copy_path)?;
        return Ok(false);
    }
    let rebase = || -> Result<()> {
        let img = Image::open(
            &head_path,
            &OpenOptions {
                writable: true,
                backing: BackingPolicy::ConfineTo(layers.clone()),
                passphrase: passphrase.clone(),
                ..OpenOptions::default()
            },
        )
        .and_then(|img| {
            img.set_backing_file_unsafe(&copy.name, "qcow2")?;
            img.close()
        });
        img.map_err(|e| Error::engine(format!("pointing {} at the copy", rec.head), e))
    };
    let staged = plugin.node.get(id);
    // On an error the copy is left to collection, which reads the head's header to decide
    // whether anything reaches it.
    match staged
        .as_ref()
        .and_then(|s| s.image.as_ref().map(|live| (s, live)))
    {
        Some((s, live)) => {
            let opts = super::staged::head_options(layers.clone(), &s.cap, s.passphrase.clone());
            live.reopen(&head_path, &head_path, &opts, rebase)?;
        }
        None => rebase()?,
    }
    failpoint("flatten-after-rebase");
    drop(copy);
    let collected = plugin.collect_garbage()?;
    tracing::info!(volume = %id, layers = collected, "the old chain's unreached layers collected");
    Ok(true)
}
