//! The host tools the node service runs (mount, umount, mkfs, blkid, e2fsck, resize2fs,
//! xfs_growfs, fsfreeze), behind one trait held by the plugin like the attacher: the real
//! ones ([`SystemTools`]) on a node, a model of them (`FakeTools`) in unit tests, so the
//! node's idempotency and refusal rules are tested without root. Recovery after a restart
//! (`staged::clear_leftovers`, the thaw of a filesystem left frozen) reads the kernel's own
//! mount table and stays on the real tools; the root tests cover it.

use std::path::Path;
use std::process::Command;

use super::mounts::{self, run};
use super::params::FsType;
use crate::error::{Error, Result};

/// What the node service asks of the host.
pub trait HostTools: Send + Sync + std::fmt::Debug {
    /// The filesystem type on a device, `None` when it is blank.
    fn fs_on(&self, device: &Path) -> Result<Option<String>>;
    /// Makes a filesystem; `options` passed the allowlist already.
    fn mkfs(&self, fs: FsType, options: &[String], device: &Path) -> Result<()>;
    /// Whether the ext4 on `device` is smaller than the device (after an expansion).
    fn ext4_smaller_than_device(&self, device: &Path) -> Result<bool>;
    /// Grows an unmounted ext4 to its device, after a clean check.
    fn grow_ext4_offline(&self, device: &Path) -> Result<()>;
    /// Grows the filesystem mounted at `mountpoint` from `device` to the device's size.
    fn grow_mounted(&self, device: &Path, mountpoint: &Path) -> Result<()>;
    /// Whether this process may grow a mounted ext4 (the kernel checks CAP_SYS_RESOURCE).
    fn can_grow_mounted_ext4(&self) -> bool;
    /// Mounts `device` at `target` as `fs` with `options` (already allowlisted).
    fn mount(&self, device: &Path, target: &Path, fs: &str, options: &[String]) -> Result<()>;
    /// Bind-mounts `source` at `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Whether something is mounted at `path`.
    fn is_mount_point(&self, path: &Path) -> Result<bool>;
    /// Unmounts `path` if something is mounted there.
    fn unmount_if_mounted(&self, path: &Path) -> Result<()>;
    /// Detaches what is mounted at `path` at once (its device may no longer answer).
    fn unmount_lazily(&self, path: &Path) -> Result<()>;
    /// Freezes (or thaws) the filesystem mounted at `mountpoint`; false if it cannot.
    fn freeze(&self, mountpoint: &Path, frozen: bool) -> bool;
}

/// The host's own tools, run as commands.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemTools;

impl HostTools for SystemTools {
    fn fs_on(&self, device: &Path) -> Result<Option<String>> {
        mounts::fs_on(device)
    }

    fn mkfs(&self, fs: FsType, options: &[String], device: &Path) -> Result<()> {
        let mut mkfs = Command::new(format!("mkfs.{}", fs.as_str()));
        run(mkfs.arg("-q").args(options).arg(device)).map(drop)
    }

    fn ext4_smaller_than_device(&self, device: &Path) -> Result<bool> {
        let header = run(Command::new("dumpe2fs").arg("-h").arg(device))?;
        let field = |name: &str| -> Option<u64> {
            header
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(blocks), Some(block)) = (field("Block count:"), field("Block size:")) else {
            return Err(Error::Internal(format!(
                "dumpe2fs {}: no block count or size",
                device.display()
            )));
        };
        let dev_size: u64 = run(Command::new("blockdev").arg("--getsize64").arg(device))?
            .parse()
            .map_err(|e| Error::Internal(format!("blockdev --getsize64: {e}")))?;
        Ok(blocks.saturating_mul(block) + block <= dev_size)
    }

    fn grow_ext4_offline(&self, device: &Path) -> Result<()> {
        // Offline resize needs a clean check first (and, unlike an online one, no
        // CAP_SYS_RESOURCE).
        let fsck = Command::new("e2fsck")
            .args(["-f", "-p"])
            .arg(device)
            .output()
            .map_err(|e| Error::io("running e2fsck", e))?;
        // 0: clean, 1: errors corrected; anything else needs a human.
        if !matches!(fsck.status.code(), Some(0 | 1)) {
            return Err(Error::FailedPrecondition(format!(
                "e2fsck {} before growing it: {}",
                device.display(),
                String::from_utf8_lossy(&fsck.stdout).trim()
            )));
        }
        run(Command::new("resize2fs").arg(device)).map(drop)
    }

    fn grow_mounted(&self, device: &Path, mountpoint: &Path) -> Result<()> {
        match mounts::fs_on(device)?.as_deref() {
            Some("ext4") => run(Command::new("resize2fs").arg(device)).map(drop),
            Some("xfs") => run(Command::new("xfs_growfs").arg(mountpoint)).map(drop),
            _ => Ok(()),
        }
    }

    fn can_grow_mounted_ext4(&self) -> bool {
        const CAP_SYS_RESOURCE: u32 = 24;
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            })
            .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
    }

    fn mount(&self, device: &Path, target: &Path, fs: &str, options: &[String]) -> Result<()> {
        let mut mount = Command::new("mount");
        mount.arg("-t").arg(fs);
        if !options.is_empty() {
            mount.arg("-o").arg(options.join(","));
        }
        run(mount.arg(device).arg(target)).map(drop)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        run(Command::new("mount").arg("--bind").arg(source).arg(target))?;
        if read_only {
            run(Command::new("mount")
                .args(["-o", "remount,bind,ro"])
                .arg(target))?;
        }
        Ok(())
    }

    fn is_mount_point(&self, path: &Path) -> Result<bool> {
        mounts::is_mount_point(path)
    }

    fn unmount_if_mounted(&self, path: &Path) -> Result<()> {
        mounts::unmount_if_mounted(path)
    }

    fn unmount_lazily(&self, path: &Path) -> Result<()> {
        mounts::unmount_lazily(path)
    }

    fn freeze(&self, mountpoint: &Path, frozen: bool) -> bool {
        let flag = if frozen { "-f" } else { "-u" };
        match Command::new("fsfreeze").arg(flag).arg(mountpoint).output() {
            Ok(out) if out.status.success() => true,
            Ok(out) => {
                tracing::warn!(
                    mountpoint = %mountpoint.display(),
                    "fsfreeze {flag}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "fsfreeze {flag}");
                false
            }
        }
    }
}

/// A model of the host's tools for tests: filesystems on devices, a mount table, frozen
/// mount points, and the log of every call that changes something.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeTools {
    state: std::sync::Mutex<Fake>,
}

#[cfg(test)]
#[derive(Debug, Default)]
struct Fake {
    fs: std::collections::HashMap<std::path::PathBuf, String>,
    /// Mount point → (source, read-only).
    mounts: std::collections::BTreeMap<std::path::PathBuf, (std::path::PathBuf, bool)>,
    frozen: std::collections::BTreeSet<std::path::PathBuf>,
    calls: Vec<String>,
    /// The next call whose log entry starts with this fails.
    fail: Option<String>,
    cap_sys_resource: bool,
}

#[cfg(test)]
impl FakeTools {
    /// Calls so far that change something (`mkfs`, `mount`, `bind`, `umount`, `grow`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// What is mounted at `path`: the source and whether read-only.
    pub fn mounted(&self, path: &Path) -> Option<(std::path::PathBuf, bool)> {
        self.state.lock().unwrap().mounts.get(path).cloned()
    }

    /// Puts a filesystem on a device, as a previous stage would have.
    pub fn format(&self, device: &Path, fs: &str) {
        let mut st = self.state.lock().unwrap();
        st.fs.insert(device.to_path_buf(), fs.to_string());
    }

    /// The next call whose log entry starts with `prefix` fails.
    pub fn fail_next(&self, prefix: &str) {
        self.state.lock().unwrap().fail = Some(prefix.to_string());
    }

    pub fn set_cap_sys_resource(&self, has: bool) {
        self.state.lock().unwrap().cap_sys_resource = has;
    }

    /// Removes the mount at `path`, if any, logged as `command path`.
    fn unmount(&self, path: &Path, command: &str) -> Result<()> {
        if self.is_mount_point(path)? {
            self.call(format!("{command} {}", path.display()))?
                .mounts
                .remove(path);
        }
        Ok(())
    }

    fn call(&self, entry: String) -> Result<std::sync::MutexGuard<'_, Fake>> {
        let mut st = self.state.lock().unwrap();
        if st.fail.as_deref().is_some_and(|p| entry.starts_with(p)) {
            st.fail = None;
            return Err(Error::Internal(format!("{entry}: injected failure")));
        }
        st.calls.push(entry);
        Ok(st)
    }
}

#[cfg(test)]
impl HostTools for FakeTools {
    fn fs_on(&self, device: &Path) -> Result<Option<String>> {
        Ok(self.state.lock().unwrap().fs.get(device).cloned())
    }

    fn mkfs(&self, fs: FsType, options: &[String], device: &Path) -> Result<()> {
        let entry = format!("mkfs.{} {:?} {}", fs.as_str(), options, device.display());
        self.call(entry)?
            .fs
            .insert(device.to_path_buf(), fs.as_str().to_string());
        Ok(())
    }

    fn ext4_smaller_than_device(&self, _device: &Path) -> Result<bool> {
        Ok(false)
    }

    fn grow_ext4_offline(&self, device: &Path) -> Result<()> {
        self.call(format!("grow-offline {}", device.display()))
            .map(drop)
    }

    fn grow_mounted(&self, device: &Path, mountpoint: &Path) -> Result<()> {
        let entry = format!("grow {} {}", device.display(), mountpoint.display());
        self.call(entry).map(drop)
    }

    fn can_grow_mounted_ext4(&self) -> bool {
        self.state.lock().unwrap().cap_sys_resource
    }

    fn mount(&self, device: &Path, target: &Path, fs: &str, options: &[String]) -> Result<()> {
        let entry = format!(
            "mount -t {fs} {options:?} {} {}",
            device.display(),
            target.display()
        );
        let mut st = self.call(entry)?;
        if st.fs.get(device).map(String::as_str) != Some(fs) {
            return Err(Error::Internal(format!(
                "mount: {} holds no {fs}",
                device.display()
            )));
        }
        let ro = options.iter().any(|o| o == "ro");
        st.mounts
            .insert(target.to_path_buf(), (device.to_path_buf(), ro));
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let entry = format!(
            "bind{} {} {}",
            if read_only { " ro" } else { "" },
            source.display(),
            target.display()
        );
        self.call(entry)?
            .mounts
            .insert(target.to_path_buf(), (source.to_path_buf(), read_only));
        Ok(())
    }

    fn is_mount_point(&self, path: &Path) -> Result<bool> {
        Ok(self.state.lock().unwrap().mounts.contains_key(path))
    }

    fn unmount_if_mounted(&self, path: &Path) -> Result<()> {
        self.unmount(path, "umount")
    }

    fn unmount_lazily(&self, path: &Path) -> Result<()> {
        self.unmount(path, "umount -l")
    }

    fn freeze(&self, mountpoint: &Path, frozen: bool) -> bool {
        let entry = format!(
            "fsfreeze {} {}",
            if frozen { "-f" } else { "-u" },
            mountpoint.display()
        );
        let Ok(mut st) = self.call(entry) else {
            return false;
        };
        if frozen {
            st.frozen.insert(mountpoint.to_path_buf())
        } else {
            st.frozen.remove(mountpoint)
        }
    }
}
