//! Volume capabilities: what the plugin accepts (single-node access modes, block or mount with
//! ext4 or xfs) and the spec's argument rules.

use csi_proto::v1::VolumeCapability;
use csi_proto::v1::volume_capability::access_mode::Mode;
use csi_proto::v1::volume_capability::{AccessType as ProtoAccess, MountVolume};

use super::params::FsType;
use super::state::AccessType;
use crate::error::{Error, Result};

/// A capability, checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checked {
    pub access: AccessType,
    pub fs_type: Option<FsType>,
    pub mount_flags: Vec<String>,
    pub read_only_mode: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one workload (one publish target) at a time.
    pub single_writer: bool,
}

/// Why a capability is not supported, or `Ok` with its parts. Missing parts are
/// INVALID_ARGUMENT; unsupported modes or filesystems too (the spec's code for both).
pub fn check(cap: &VolumeCapability) -> Result<Checked> {
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume capability without an access mode".into()))?
        .mode();
    let read_only_mode = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            false
        }
        Mode::SingleNodeReaderOnly => true,
        Mode::Unknown => {
            return Err(Error::InvalidArgument("access mode is not set".into()));
        }
        other => {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: volumes live on one node",
                other.as_str_name()
            )));
        }
    };
    let single_writer = mode == Mode::SingleNodeSingleWriter;
    match &cap.access_type {
        Some(ProtoAccess::Block(_)) => Ok(Checked {
            access: AccessType::Block,
            fs_type: None,
            mount_flags: Vec::new(),
            read_only_mode,
            single_writer,
        }),
        Some(ProtoAccess::Mount(MountVolume {
            fs_type,
            mount_flags,
            volume_mount_group,
        })) => {
            if !volume_mount_group.is_empty() {
                return Err(Error::InvalidArgument(
                    "volume_mount_group is not supported (no VOLUME_MOUNT_GROUP capability)".into(),
                ));
            }
            super::options::check_mount_flags(mount_flags)?;
            Ok(Checked {
                access: AccessType::Mount,
                fs_type: FsType::parse(fs_type)?,
                mount_flags: mount_flags.clone(),
                read_only_mode,
                single_writer,
            })
        }
        None => Err(Error::InvalidArgument(
            "volume capability without an access type (block or mount)".into(),
        )),
    }
}

/// Checks a non-empty list of capabilities.
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Checked>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(
            "volume_capabilities is required".into(),
        ));
    }
    caps.iter().map(check).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi_proto::v1::volume_capability::{AccessMode, BlockVolume};

    fn cap(mode: Mode, access: Option<ProtoAccess>) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str) -> Option<ProtoAccess> {
        Some(ProtoAccess::Mount(MountVolume {
            fs_type: fs.into(),
            ..MountVolume::default()
        }))
    }

    #[test]
    fn single_node_modes_with_block_or_ext4_xfs_are_accepted() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let b = check(&cap(mode, Some(ProtoAccess::Block(BlockVolume {})))).unwrap();
            assert_eq!(b.access, AccessType::Block);
            assert_eq!(b.read_only_mode, mode == Mode::SingleNodeReaderOnly);
            for fs in ["", "ext4", "xfs"] {
                check(&cap(mode, mount(fs))).unwrap();
            }
        }
    }

    #[test]
    fn other_modes_filesystems_and_missing_parts_are_invalid_arguments() {
        for bad in [
            cap(Mode::MultiNodeMultiWriter, mount("")),
            cap(Mode::MultiNodeReaderOnly, mount("")),
            cap(Mode::Unknown, mount("")),
            cap(Mode::SingleNodeWriter, mount("btrfs")),
            cap(Mode::SingleNodeWriter, None),
            VolumeCapability {
                access_type: mount(""),
                access_mode: None,
            },
        ] {
            assert!(
                matches!(check(&bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(check_all(&[]), Err(Error::InvalidArgument(_))));
    }
}
