//! Passphrases of staged encrypted volumes, kept where a restarted plugin finds them.
//!
//! NodeStageVolume is the only call that carries a volume's passphrase (its node-stage
//! secret). A later process must still reopen the head: a handover or a reattach after a
//! crash ([`super::staged::NodeState::recover`]), the healer, a snapshot's pivot or a flatten.
//! So a staged encrypted volume's passphrase is kept in `--key-dir`, one root-only file per
//! volume, written when it is staged and removed when it is unstaged. The directory must be
//! memory-backed (tmpfs or ramfs, such as a host path under `/run`): a key store that
//! outlives the node's boot would outlive the stage records (which a reboot drops), and a
//! passphrase on the disk beside the layers it opens would protect nothing. Anything else is
//! refused.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use qcow2_engine::crypto::Passphrase;

use super::state::{self, PRIVATE_FILE};
use crate::error::{Error, Result};

/// The secret key NodeStageVolume and CreateVolume read the passphrase from.
pub const SECRET_KEY: &str = "passphrase";

/// Longest passphrase accepted (LUKS has no limit; a secret is input).
pub const MAX_PASSPHRASE: usize = 4096;

/// Default `--key-dir`.
pub const DEFAULT_DIR: &str = "/run/qcow2-csi/keys";

/// `statfs` magic numbers of memory-backed filesystems (`linux/magic.h`).
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The passphrase in `secrets` (a request's), or why there is none. `what` names the
/// secret for the error (`"provisioner"`, `"node-stage"`).
pub fn from_secrets(
    secrets: &std::collections::HashMap<String, String>,
    what: &str,
) -> Result<Passphrase> {
    let value = secrets.get(SECRET_KEY).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "the volume is encrypted: its {what} secret (csi.storage.k8s.io/{what}-secret-name \
             and -namespace in the StorageClass) must hold the key {SECRET_KEY:?}"
        ))
    })?;
    if value.is_empty() || value.len() > MAX_PASSPHRASE {
        return Err(Error::InvalidArgument(format!(
            "the {what} secret's {SECRET_KEY:?} must be 1 to {MAX_PASSPHRASE} bytes"
        )));
    }
    Ok(Passphrase::new(value.as_bytes().to_vec()))
}

/// The key store: `DIR/<volume-id>`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    pub fn new(dir: PathBuf) -> KeyStore {
        KeyStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> Result<PathBuf> {
        if !state::is_volume_id(id) {
            return Err(Error::InvalidArgument(format!("{id:?} is not a volume id")));
        }
        Ok(self.dir.join(id))
    }

    /// Keeps volume `id`'s passphrase (replacing one kept before).
    pub fn put(&self, id: &str, passphrase: &Passphrase) -> Result<()> {
        let path = self.path(id)?;
        state::private_dir(&self.dir)?;
        self.check_memory_backed()?;
        let tmp = self.dir.join(format!(".{id}.tmp"));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE)
            .open(&tmp)
            .and_then(|mut f| f.write_all(passphrase.as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        written.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("keeping the passphrase in {}", path.display()), e)
        })
    }

    /// Keeps volume `id`'s passphrase for a stage in progress: forgotten again if the
    /// returned guard is dropped before [`Kept::commit`].
    pub fn keep<'a>(&'a self, id: &str, passphrase: &Passphrase) -> Result<Kept<'a>> {
        self.put(id, passphrase)?;
        Ok(Kept {
            store: self,
            id: id.to_string(),
            committed: false,
        })
    }

    /// Volume `id`'s passphrase, if one is kept.
    pub fn get(&self, id: &str) -> Result<Option<Passphrase>> {
        let path = self.path(id)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(Passphrase::new(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
        }
    }

    /// Forgets volume `id`'s passphrase (none kept is fine).
    pub fn remove(&self, id: &str) -> Result<()> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Refuses a directory that keeps its files across a reboot.
    fn check_memory_backed(&self) -> Result<()> {
        let fs = rustix::fs::statfs(&self.dir)
            .map_err(|e| Error::io(format!("statfs {}", self.dir.display()), e.into()))?;
        let magic = fs.f_type as i64;
        if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
            return Ok(());
        }
        tracing::error!(dir = %self.dir.display(), magic = format!("{magic:#x}"), "refused to keep a passphrase on a disk");
        Err(Error::FailedPrecondition(format!(
            "--key-dir {} is not on tmpfs or ramfs: passphrases are kept only in memory \
             (mount a host path under /run, or a memory emptyDir)",
            self.dir.display()
        )))
    }
}

/// A passphrase kept by a stage still in progress ([`KeyStore::keep`]).
#[derive(Debug)]
pub struct Kept<'a> {
    store: &'a KeyStore,
    id: String,
    committed: bool,
}

impl Kept<'_> {
    /// The stage is done: the passphrase stays until the volume is unstaged.
    pub fn commit(mut self) {
        self.committed = true;
    }
}

impl Drop for Kept<'_> {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = self.store.remove(&self.id)
        {
            tracing::error!(volume = %self.id, error = %e, "forgetting the passphrase of a failed stage");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shm_dir() -> Option<tempfile::TempDir> {
        let shm = Path::new("/dev/shm");
        let fs = rustix::fs::statfs(shm).ok()?;
        (fs.f_type as i64 == TMPFS_MAGIC)
            .then(|| tempfile::tempdir_in(shm).ok())
            .flatten()
    }

    #[test]
    fn passphrases_are_kept_private_and_forgotten() {
        let Some(dir) = shm_dir() else {
            eprintln!("skipped: /dev/shm is not a tmpfs here");
            return;
        };
        let store = KeyStore::new(dir.path().join("keys"));
        let id = state::new_id("vol-");
        assert!(store.get(&id).unwrap().is_none());
        store.put(&id, &Passphrase::new(b"one".to_vec())).unwrap();
        store.put(&id, &Passphrase::new(b"two".to_vec())).unwrap();
        assert_eq!(store.get(&id).unwrap().unwrap().as_bytes(), b"two");
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.dir.join(&id)), 0o600);
        assert_eq!(mode(&store.dir), 0o700);
        // A stage that fails forgets the passphrase it kept; one that ends keeps it.
        let other = state::new_id("vol-");
        drop(store.keep(&other, &Passphrase::new(b"p".to_vec())).unwrap());
        assert!(store.get(&other).unwrap().is_none());
        store
            .keep(&other, &Passphrase::new(b"p".to_vec()))
            .unwrap()
            .commit();
        assert!(store.get(&other).unwrap().is_some());
        store.remove(&id).unwrap();
        store.remove(&id).unwrap();
        assert!(store.get(&id).unwrap().is_none());
        assert!(store.put("../x", &Passphrase::new(b"p".to_vec())).is_err());
    }

    #[test]
    fn a_directory_on_a_disk_is_refused() {
        // The temporary directory is on a disk on most hosts.
        let dir = tempfile::tempdir().unwrap();
        let fs = rustix::fs::statfs(dir.path()).unwrap();
        if [TMPFS_MAGIC, RAMFS_MAGIC].contains(&(fs.f_type as i64)) {
            eprintln!("skipped: the temporary directory is memory-backed here");
            return;
        }
        let store = KeyStore::new(dir.path().join("keys"));
        let id = state::new_id("vol-");
        let err = store.put(&id, &Passphrase::new(b"p".to_vec())).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert!(store.get(&id).unwrap().is_none(), "nothing was written");
    }

    #[test]
    fn the_secret_must_hold_a_passphrase() {
        let mut s = std::collections::HashMap::new();
        assert!(from_secrets(&s, "node-stage").is_err());
        s.insert(SECRET_KEY.to_string(), String::new());
        assert!(from_secrets(&s, "node-stage").is_err());
        s.insert(SECRET_KEY.to_string(), "x".repeat(MAX_PASSPHRASE + 1));
        assert!(from_secrets(&s, "node-stage").is_err());
        s.insert(SECRET_KEY.to_string(), "secret".into());
        assert_eq!(
            from_secrets(&s, "node-stage").unwrap().as_bytes(),
            b"secret"
        );
    }
}
