//! Mounts: what is mounted where (`/proc/self/mountinfo`), and mount/umount/mkfs through the
//! system tools (mount(8) parses option strings exactly as users expect).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};

/// Decodes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of one mountinfo line (its fifth field), unescaped.
fn mount_point_of(line: &str) -> Option<PathBuf> {
    line.split(' ').nth(4).map(|p| PathBuf::from(unescape(p)))
}

/// Mount points listed in a mountinfo text.
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo.lines().filter_map(mount_point_of).collect()
}

/// The source (a device path, for the mounts the plugin makes) of the topmost mount at
/// `mount_point` in a mountinfo text, if any: the field after the `-` separator and type.
pub fn source_in(mountinfo: &str, mount_point: &Path) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter(|l| mount_point_of(l).as_deref() == Some(mount_point))
        .filter_map(|l| {
            let (_, tail) = l.split_once(" - ")?;
            tail.split(' ').nth(1).map(|s| PathBuf::from(unescape(s)))
        })
        .next_back()
}

fn mountinfo() -> Result<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading /proc/self/mountinfo", e))
}

/// `path` as mountinfo lists it (symlinks resolved), or as given if it cannot be resolved.
fn as_listed(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// What is mounted at `path` (topmost), if anything.
pub fn mounted_source(path: &Path) -> Result<Option<PathBuf>> {
    Ok(source_in(&mountinfo()?, &as_listed(path)))
}

/// Whether something is mounted at `path`.
pub fn is_mount_point(path: &Path) -> Result<bool> {
    Ok(mount_points(&mountinfo()?).contains(&as_listed(path)))
}

/// Runs a system tool; its stderr becomes the error.
pub fn run(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::io(shown.clone(), e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{shown}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The filesystem type on a device, or `None` when blkid finds nothing (a blank device).
pub fn fs_on(device: &Path) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .map_err(|e| Error::io("running blkid", e))?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        // 2: nothing recognised.
        Some(2) => Ok(None),
        _ => Err(Error::Internal(format!(
            "blkid {}: {}",
            device.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Unmounts `path` if something is mounted there.
pub fn unmount_if_mounted(path: &Path) -> Result<()> {
    if is_mount_point(path)? {
        run(Command::new("umount").arg(path))?;
    }
    Ok(())
}

/// Detaches whatever is mounted at `path` at once (`umount -l`): the filesystem finishes
/// its last writes, or fails them, in the background; for a device that no longer answers.
/// Mounts stacked on `path` are all removed (bounded, should a mount refuse to go).
pub fn unmount_lazily(path: &Path) -> Result<()> {
    unmount_lazily_checked(path, |_| Ok(()))
}

/// [`unmount_lazily`], asking `check` about each mount's source first: an error from it
/// stops there and leaves that mount alone.
pub fn unmount_lazily_checked(path: &Path, check: impl Fn(&Path) -> Result<()>) -> Result<()> {
    for _ in 0..8 {
        let Some(source) = mounted_source(path)? else {
            return Ok(());
        };
        check(&source)?;
        run(Command::new("umount").arg("-l").arg(path))?;
    }
    Err(Error::Internal(format!(
        "{} is still a mount point after 8 unmounts",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_give_their_mount_points_unescaped() {
        let text = "22 1 8:1 / / rw,relatime - ext4 /dev/vda rw\n\
                    40 22 0:35 / /var/lib/kubelet/pods/a\\040b/vol rw - ext4 /dev/nbd0 rw\n";
        assert_eq!(
            mount_points(text),
            [
                PathBuf::from("/"),
                PathBuf::from("/var/lib/kubelet/pods/a b/vol")
            ]
        );
        assert_eq!(unescape("a\\134b"), "a\\b");
        let stacked =
            format!("{text}41 40 7:3 / /var/lib/kubelet/pods/a\\040b/vol rw - xfs /dev/loop3 rw\n");
        let vol = Path::new("/var/lib/kubelet/pods/a b/vol");
        assert_eq!(source_in(text, vol), Some(PathBuf::from("/dev/nbd0")));
        assert_eq!(source_in(&stacked, vol), Some(PathBuf::from("/dev/loop3")));
        assert_eq!(source_in(text, Path::new("/var")), None);
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()).unwrap());
    }
}
