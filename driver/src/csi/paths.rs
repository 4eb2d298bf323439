//! Confinement of the paths node requests name. Staging and target paths come from whoever
//! can reach the CSI socket; the plugin mounts, unmounts and removes there as root. So every
//! such path must lie under the kubelet directory once symlinks are resolved, and the
//! resolved path is the one acted on (a symlink swapped in later is not followed again by
//! the comparisons against records).

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Resolves `raw` (a request's `what`) and checks it lies strictly under `root`: absolute,
/// no `..` past what exists, symlinks in the existing part followed. Returns the resolved
/// path. The part that does not exist yet (a target the plugin will create) must be plain
/// names.
pub fn confine(raw: &str, what: &str, root: &Path) -> Result<PathBuf> {
    if raw.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{what} {raw:?} must be absolute"
        )));
    }
    let root = std::fs::canonicalize(root).map_err(|e| {
        Error::FailedPrecondition(format!(
            "the kubelet directory {} cannot be resolved: {e}",
            root.display()
        ))
    })?;
    let resolved = resolve(path).map_err(|why| {
        tracing::warn!(what, path = raw, why, "refused a path");
        Error::InvalidArgument(format!("{what} {raw:?}: {why}"))
    })?;
    if resolved == root || !resolved.starts_with(&root) {
        tracing::warn!(
            what,
            path = raw,
            resolved = %resolved.display(),
            root = %root.display(),
            "refused a path outside the kubelet directory"
        );
        return Err(Error::InvalidArgument(format!(
            "{what} {raw:?} resolves to {}, outside the kubelet directory {}",
            resolved.display(),
            root.display()
        )));
    }
    Ok(resolved)
}

/// The canonical form of the longest existing prefix of `path`, followed by the rest,
/// which must be plain names.
fn resolve(path: &Path) -> std::result::Result<PathBuf, String> {
    let mut existing = path.to_path_buf();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(mut base) => {
                for name in rest.iter().rev() {
                    base.push(name);
                }
                return Ok(base);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A dangling symlink is not "missing": it would be followed on creation.
                if existing.symlink_metadata().is_ok() {
                    return Err(format!("{} is a symlink to nothing", existing.display()));
                }
                match existing.components().next_back() {
                    Some(Component::Normal(name)) => rest.push(name.to_os_string()),
                    _ => return Err("names a path through \"..\" that does not exist".into()),
                }
                if !existing.pop() {
                    return Err("has no existing ancestor".into());
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let kubelet = d.path().join("kubelet");
        std::fs::create_dir_all(kubelet.join("pods/a")).unwrap();
        std::fs::create_dir_all(d.path().join("outside")).unwrap();
        (d, kubelet)
    }

    fn s(p: &Path) -> String {
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn paths_under_the_kubelet_directory_resolve_and_others_are_refused() {
        let (d, kubelet) = root();
        let real = std::fs::canonicalize(&kubelet).unwrap();
        let ok = confine(
            &s(&kubelet.join("pods/a/new/target")),
            "target_path",
            &kubelet,
        );
        assert_eq!(ok.unwrap(), real.join("pods/a/new/target"));
        assert_eq!(
            confine(&s(&kubelet.join("pods/./a")), "t", &kubelet).unwrap(),
            real.join("pods/a")
        );
        for bad in [
            s(&d.path().join("outside/x")),
            s(&kubelet.join("../outside/x")),
            s(&kubelet.join("pods/../../outside")),
            s(&kubelet.join("pods/missing/../../../outside")),
            s(&kubelet),
            "relative/path".to_string(),
            "/etc/passwd".to_string(),
            String::new(),
        ] {
            let e = confine(&bad, "target_path", &kubelet).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
        }
    }

    #[test]
    fn symlinks_that_lead_out_of_the_kubelet_directory_are_refused() {
        let (d, kubelet) = root();
        symlink(d.path().join("outside"), kubelet.join("pods/escape")).unwrap();
        symlink("/nonexistent/dir", kubelet.join("pods/dangling")).unwrap();
        symlink(kubelet.join("pods/a"), kubelet.join("pods/inside")).unwrap();
        for bad in [
            "pods/escape",
            "pods/escape/x/y",
            "pods/dangling",
            "pods/dangling/x",
        ] {
            let e = confine(&s(&kubelet.join(bad)), "staging_target_path", &kubelet);
            assert!(matches!(e, Err(Error::InvalidArgument(_))), "{bad}: {e:?}");
        }
        let inside = confine(&s(&kubelet.join("pods/inside/t")), "t", &kubelet).unwrap();
        assert_eq!(
            inside,
            std::fs::canonicalize(&kubelet).unwrap().join("pods/a/t")
        );
    }
}
