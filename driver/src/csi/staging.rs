//! Stage records: what NodeStage set up for a volume on this node, persisted so that a
//! restarted plugin knows its staged volumes and takes back those whose device outlived it.
//!
//! ```text
//! STATE/staged/<volume id>.json   one record per staged volume, written atomically
//! ```
//!
//! Write order, so that a record always covers at least what exists on the host:
//! - NodeStage writes the record once the device is attached and mounted (a crash before
//!   that leaves no record, and the retried NodeStage clears what the attempt left);
//! - NodePublish adds the target before the bind mount, NodeUnpublish drops it after the
//!   unmount;
//! - NodeUnstage removes the record after the device is detached.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::capability::Checked;
use super::state::{Cleanup, RecordKind, is_volume_id, read_records, remove_durably, write_atomic};
use crate::error::Result;

/// How the staged volume's block device is provided, which decides whether a restarted
/// plugin can take it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Attachment {
    /// A kernel nbd device set up through netlink: it waits (up to its dead-connection
    /// timeout) for a new server to RECONFIGURE it.
    Nbd { index: u32 },
    /// A kernel nbd device set up through the ioctls: it ends with the process.
    NbdIoctl,
    /// nbdfuse and a loop device: nbdfuse cannot reconnect, so it ends with the process.
    Nbdfuse,
}

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub volume_id: String,
    /// The staging target path (the filesystem's mount point for mount volumes).
    pub staging: PathBuf,
    pub capability: Checked,
    /// The block device (`/dev/nbdN` or `/dev/loopN`).
    pub device: PathBuf,
    pub attachment: Attachment,
    /// Publish targets (bind mounts of the staging path or of the device).
    pub published: BTreeSet<PathBuf>,
    /// The kernel's boot id when staged: a record from an earlier boot describes devices
    /// and mounts that no longer exist (kubelet stages again after a reboot).
    #[serde(default)]
    pub boot_id: String,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), or `""` where it cannot be read.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The `staged/` directory.
#[derive(Debug, Clone)]
pub struct StageRecords {
    dir: PathBuf,
}

impl StageRecords {
    pub fn new(state_dir: &Path) -> StageRecords {
        StageRecords {
            dir: state_dir.join("staged"),
        }
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Persists `rec` (replacing the volume's previous record).
    pub fn save(&self, rec: &StageRecord) -> Result<()> {
        super::state::private_dir(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(rec).expect("records serialise");
        write_atomic(&self.path(&rec.volume_id), &bytes)
    }

    /// Forgets volume `id` (nothing to do when it has no record).
    pub fn remove(&self, id: &str) -> Result<()> {
        remove_durably(&self.path(id))
    }

    /// Every record, in volume id order; half-written ones (`.tmp`) are deleted. A record
    /// that does not parse stops the load: guessing would lose track of a mounted volume.
    pub fn load(&self) -> Result<Vec<StageRecord>> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let kind = RecordKind {
            name: "stage record",
            names: "volume",
            is_id: is_volume_id,
            id_of: |r: &StageRecord| &r.volume_id,
        };
        let records = read_records(&self.dir, &kind, &mut Cleanup::default())?;
        Ok(records.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::params::FsType;
    use crate::csi::state::{AccessType, new_id};

    fn record(id: &str, attachment: Attachment) -> StageRecord {
        StageRecord {
            volume_id: id.into(),
            staging: "/var/lib/kubelet/staging/x".into(),
            capability: Checked {
                access: AccessType::Mount,
                fs_type: Some(FsType::Xfs),
                mount_flags: vec!["noatime".into()],
                read_only_mode: false,
                single_writer: true,
            },
            device: "/dev/nbd3".into(),
            attachment,
            published: ["/pods/a".into()].into(),
            boot_id: boot_id(),
        }
    }

    #[test]
    fn records_round_trip_and_half_written_ones_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let recs = StageRecords::new(dir.path());
        assert_eq!(
            recs.load().unwrap(),
            vec![],
            "no directory yet: nothing staged"
        );
        let (a, b) = (new_id("vol-"), new_id("vol-"));
        let ra = record(&a, Attachment::Nbd { index: 3 });
        let rb = record(&b, Attachment::Nbdfuse);
        recs.save(&ra).unwrap();
        recs.save(&rb).unwrap();
        std::fs::write(dir.path().join("staged/.vol-x.json.tmp"), b"{").unwrap();
        let mut want = vec![ra.clone(), rb];
        want.sort_by(|x, y| x.volume_id.cmp(&y.volume_id));
        assert_eq!(recs.load().unwrap(), want);
        assert!(!dir.path().join("staged/.vol-x.json.tmp").exists());
        // The attachment is spelled out for a human reading the file.
        let text = std::fs::read_to_string(dir.path().join(format!("staged/{a}.json"))).unwrap();
        assert!(text.contains(r#""kind": "nbd""#), "{text}");
        assert!(text.contains(r#""index": 3"#), "{text}");

        recs.remove(&a).unwrap();
        recs.remove(&a).unwrap(); // idempotent
        assert_eq!(recs.load().unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_or_misnamed_record_stops_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let recs = StageRecords::new(dir.path());
        let id = new_id("vol-");
        recs.save(&record(&id, Attachment::NbdIoctl)).unwrap();
        let misnamed = dir.path().join(format!("staged/{}.json", new_id("vol-")));
        std::fs::rename(dir.path().join(format!("staged/{id}.json")), &misnamed).unwrap();
        assert!(
            recs.load()
                .unwrap_err()
                .to_string()
                .contains("names volume")
        );
        std::fs::remove_file(&misnamed).unwrap();
        std::fs::write(dir.path().join(format!("staged/{id}.json")), b"[").unwrap();
        assert!(
            recs.load()
                .unwrap_err()
                .to_string()
                .contains("not a stage record")
        );
    }
}
