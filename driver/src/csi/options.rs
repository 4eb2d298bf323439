//! Allowlists for what callers may pass to the host's mkfs and mount: StorageClass
//! `mkfsOptions` and a capability's `mount_flags`. Both reach root-run tools on the host,
//! and several of their options name host paths (mke2fs `-d DIR` copies a host directory
//! into the volume, mkfs.xfs `-l logdev=` writes a log onto a host disk, `-p` reads a
//! prototype file) or change the host's behaviour (`errors=panic`). Only what is listed
//! here passes; anything else is INVALID_ARGUMENT naming it. `docs/operations.md` lists
//! the same.

use super::params::FsType;
use crate::error::{Error, Result};

/// What an option's value may be.
#[derive(Clone, Copy)]
enum Value {
    /// A number, with an optional k/m/g/t suffix (sizes).
    Number,
    /// A short label or name: letters, digits, `._-`.
    Name,
    /// Comma-separated `key` or `key=value` items, keys from the list, values numbers or
    /// names.
    Keys(&'static [&'static str]),
    /// Comma-separated feature names (`^name` turns one off).
    Features,
}

/// mke2fs options for ext4: flag, and its value if it takes one.
const EXT4: &[(&str, Option<Value>)] = &[
    ("-b", Some(Value::Number)),
    ("-C", Some(Value::Number)),
    ("-g", Some(Value::Number)),
    ("-G", Some(Value::Number)),
    ("-i", Some(Value::Number)),
    ("-I", Some(Value::Number)),
    ("-m", Some(Value::Number)),
    ("-N", Some(Value::Number)),
    ("-L", Some(Value::Name)),
    ("-T", Some(Value::Name)),
    ("-U", Some(Value::Name)),
    ("-O", Some(Value::Features)),
    ("-j", None),
    ("-J", Some(Value::Keys(&["size"]))),
    (
        "-E",
        Some(Value::Keys(&[
            "stride",
            "stripe_width",
            "stripe-width",
            "lazy_itable_init",
            "lazy_journal_init",
            "discard",
            "nodiscard",
            "num_backup_sb",
            "packed_meta_blocks",
            "quotatype",
            "root_owner",
            "encoding",
        ])),
    ),
    ("-e", Some(Value::Keys(&["continue", "remount-ro"]))),
];

/// mkfs.xfs options: flag, and its value if it takes one.
const XFS: &[(&str, Option<Value>)] = &[
    ("-f", None),
    ("-K", None),
    ("-L", Some(Value::Name)),
    ("-b", Some(Value::Keys(&["size"]))),
    ("-s", Some(Value::Keys(&["size"]))),
    (
        "-m",
        Some(Value::Keys(&[
            "crc",
            "finobt",
            "uuid",
            "rmapbt",
            "reflink",
            "bigtime",
            "inobtcount",
        ])),
    ),
    (
        "-d",
        Some(Value::Keys(&[
            "agcount", "agsize", "su", "sw", "sunit", "swidth", "noalign",
        ])),
    ),
    (
        "-i",
        Some(Value::Keys(&[
            "size", "maxpct", "align", "sparse", "nrext64",
        ])),
    ),
    (
        "-l",
        Some(Value::Keys(&[
            "size",
            "version",
            "sunit",
            "su",
            "lazy-count",
        ])),
    ),
    ("-n", Some(Value::Keys(&["size", "version", "ftype"]))),
];

/// Mount options for ext4 and xfs volumes, as `key` or `key=` prefixes.
const MOUNT: &[&str] = &[
    "ro",
    "rw",
    "sync",
    "async",
    "dirsync",
    "atime",
    "noatime",
    "diratime",
    "nodiratime",
    "relatime",
    "norelatime",
    "strictatime",
    "lazytime",
    "nolazytime",
    "nosuid",
    "nodev",
    "noexec",
    "discard",
    "nodiscard",
    "acl",
    "noacl",
    "user_xattr",
    "nouser_xattr",
    "barrier",
    "nobarrier",
    "quota",
    "usrquota",
    "grpquota",
    "prjquota",
    "uquota",
    "gquota",
    "pquota",
    "noquota",
    "inode64",
    "inode32",
    "largeio",
    "nolargeio",
    "nouuid",
    "grpid",
    "nogrpid",
    "data=ordered",
    "data=writeback",
    "data=journal",
    "errors=remount-ro",
    "errors=continue",
    "commit=",
    "allocsize=",
    "logbsize=",
    "logbufs=",
    "stripe=",
    "sunit=",
    "swidth=",
    "context=",
];

fn refused(what: &str, item: &str, why: &str) -> Error {
    tracing::warn!(what, item, why, "refused an option");
    Error::InvalidArgument(format!("{what}: {item:?} {why}"))
}

fn is_number(v: &str) -> bool {
    let digits = v.trim_end_matches(['k', 'K', 'm', 'M', 'g', 'G', 't', 'T']);
    !digits.is_empty() && digits.len() + 1 >= v.len() && digits.bytes().all(|b| b.is_ascii_digit())
}

fn is_name(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn value_ok(value: Value, v: &str) -> bool {
    match value {
        Value::Number => is_number(v),
        Value::Name => is_name(v),
        Value::Features => v.split(',').all(|f| is_name(f.trim_start_matches('^'))),
        Value::Keys(keys) => v.split(',').all(|item| {
            let (k, val) = item.split_once('=').unwrap_or((item, ""));
            keys.contains(&k)
                && (val.is_empty()
                    || is_name(val)
                    || val.contains(':') && val.split(':').all(is_name))
        }),
    }
}

/// Checks StorageClass `mkfsOptions` (already split on whitespace) for filesystem `fs`.
pub fn check_mkfs(fs: FsType, options: &[String]) -> Result<()> {
    let what = format!("mkfsOptions for {}", fs.as_str());
    let table = match fs {
        FsType::Ext4 => EXT4,
        FsType::Xfs => XFS,
    };
    let mut it = options.iter();
    while let Some(flag) = it.next() {
        let Some((_, value)) = table.iter().find(|(f, _)| f == flag) else {
            return Err(refused(
                &what,
                flag,
                "is not an allowed option (docs/operations.md)",
            ));
        };
        if let Some(value) = value {
            let Some(v) = it.next() else {
                return Err(refused(&what, flag, "needs a value"));
            };
            if !value_ok(*value, v) {
                return Err(refused(
                    &what,
                    &format!("{flag} {v}"),
                    "has a value that is not allowed",
                ));
            }
        }
    }
    Ok(())
}

/// Checks a capability's mount flags (each may hold several, comma-separated).
pub fn check_mount_flags(flags: &[String]) -> Result<()> {
    for flag in flags {
        // An SELinux context (kubelet adds it) is one quoted value that may hold commas.
        if let Some(ctx) = flag.strip_prefix("context=") {
            let ctx = ctx.trim_matches('"');
            if ctx.is_empty() || !ctx.split([':', ',']).all(is_name) {
                return Err(refused("mount_flags", flag, "is not an SELinux context"));
            }
            continue;
        }
        for item in flag.split(',') {
            let allowed = MOUNT.iter().any(|m| match m.strip_suffix('=') {
                Some(key) => item
                    .strip_prefix(key)
                    .and_then(|r| r.strip_prefix('='))
                    .is_some_and(is_number),
                None => item == *m,
            });
            if !allowed {
                return Err(refused(
                    "mount_flags",
                    item,
                    "is not an allowed mount option (docs/operations.md)",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn mkfs_options_that_name_host_paths_or_devices_are_refused() {
        for (fs, bad) in [
            (FsType::Ext4, "-d /var/lib/kubelet"),
            (FsType::Ext4, "-J device=/dev/sdb"),
            (FsType::Ext4, "-l /etc/badblocks"),
            (FsType::Ext4, "-E root_owner=0:0,offset=4096"),
            (FsType::Ext4, "-e panic"),
            (FsType::Ext4, "-b4096"),
            (FsType::Ext4, "-L"),
            (FsType::Ext4, "-L ../../x"),
            (FsType::Xfs, "-f -l logdev=/dev/sdb"),
            (FsType::Xfs, "-d name=/etc/x"),
            (FsType::Xfs, "-p /etc/protofile"),
            (FsType::Xfs, "-r rtdev=/dev/sdc"),
            (FsType::Xfs, "-m crc=1 -N"),
        ] {
            let e = check_mkfs(fs, &v(bad)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e:?}");
        }
        let e = check_mkfs(FsType::Ext4, &v("-m 1 -d /etc")).unwrap_err();
        assert!(e.to_string().contains("\"-d\""), "names the option: {e}");
    }

    #[test]
    fn usual_mkfs_tuning_passes() {
        for (fs, ok) in [
            (FsType::Ext4, ""),
            (
                FsType::Ext4,
                "-m 0 -b 4096 -i 16384 -L data -O ^has_journal,metadata_csum",
            ),
            (
                FsType::Ext4,
                "-E lazy_itable_init=0,lazy_journal_init=0,root_owner=1000:1000",
            ),
            (FsType::Ext4, "-J size=64 -T largefile -e remount-ro"),
            (
                FsType::Xfs,
                "-f -K -m crc=1,reflink=1 -i size=512 -d agcount=4",
            ),
            (FsType::Xfs, "-l size=64m,lazy-count=1 -n ftype=1 -L vol"),
        ] {
            check_mkfs(fs, &v(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn mount_flags_pass_only_from_the_allowlist() {
        let f =
            |s: &[&str]| check_mount_flags(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        f(&["noatime", "nodiscard,nosuid", "commit=30", "data=ordered"]).unwrap();
        f(&["context=\"system_u:object_r:container_file_t:s0:c1,c2\""]).unwrap();
        for bad in [
            &["errors=panic"][..],
            &["noatime,logdev=/dev/sdb"],
            &["journal_path=/dev/sdb"],
            &["commit=/x"],
            &["x-mount.mkdir"],
            &["remount"],
            &["bind"],
            &["context=\"a\",logdev=/dev/sdb"],
            &["loop=/dev/loop0"],
        ] {
            let e = f(bad).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad:?}: {e:?}");
        }
    }
}
