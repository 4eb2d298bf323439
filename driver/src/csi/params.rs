//! StorageClass parameters, typed. Unknown keys are refused (a typo must not silently give a
//! default volume), except the `csi.storage.k8s.io/` keys the external provisioner adds.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::nbd::qos::{self, Limits};

/// A filesystem the node can make and mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// `""` is "not said"; anything but ext4 and xfs is refused.
    pub fn parse(s: &str) -> Result<Option<FsType>> {
        match s {
            "" => Ok(None),
            "ext4" => Ok(Some(FsType::Ext4)),
            "xfs" => Ok(Some(FsType::Xfs)),
            other => Err(Error::InvalidArgument(format!(
                "filesystem {other:?} is not supported (ext4 or xfs)"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// Parameters of a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// qcow2 cluster size in bytes (a power of two, 512 B – 2 MiB).
    pub cluster_size: u64,
    /// Extended L2 entries (subclusters): less copy-on-write for small writes over snapshots.
    pub subclusters: bool,
    /// Filesystem for mount volumes whose capability names none.
    pub fs_type: Option<FsType>,
    /// Extra mkfs arguments (whitespace-separated; passed as arguments, never to a shell).
    pub mkfs_options: Vec<String>,
    /// GetCapacity reports free space times this (thin volumes rarely fill up).
    pub overcommit_ratio: f64,
    /// QoS limits the volume starts with (a VolumeAttributesClass may change them later).
    pub qos: Limits,
    /// LUKS-encrypted layers (QEMU's `encrypt.format=luks`), unlocked by the passphrase in
    /// the provisioner and node-stage secrets ([`super::keys`]).
    pub encrypted: bool,
    /// Milliseconds of PBKDF2 a new volume's key slot costs on this node's CPU (QEMU's
    /// `encrypt.iter-time`); every stage pays it once.
    pub encryption_iter_time_ms: u32,
}

/// QEMU's default `encrypt.iter-time`.
pub const DEFAULT_ITER_TIME_MS: u32 = 2000;

impl Default for Params {
    fn default() -> Self {
        Self {
            cluster_size: 64 << 10,
            subclusters: false,
            fs_type: None,
            mkfs_options: Vec::new(),
            overcommit_ratio: 1.0,
            qos: Limits::default(),
            encrypted: false,
            encryption_iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }
}

/// Keys added by the Kubernetes external-provisioner (`--extra-create-metadata`) and the
/// `csi.storage.k8s.io/*` secret and fstype conventions.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

fn parse_size(key: &str, v: &str) -> Result<u64> {
    const SUFFIXES: &[(&str, u64)] = &[
        ("K", 1 << 10),
        ("k", 1 << 10),
        ("Ki", 1 << 10),
        ("M", 1 << 20),
        ("m", 1 << 20),
        ("Mi", 1 << 20),
    ];
    number_with_suffix(v, SUFFIXES)
        .ok_or_else(|| Error::InvalidArgument(format!("{key}: {v:?} is not a size (e.g. 64K, 1M)")))
}

/// Digits, then optionally one of `suffixes` (each with its multiplier); `None` for anything
/// else, or on overflow. Each caller names its own suffixes and words its own error.
pub(crate) fn number_with_suffix(v: &str, suffixes: &[(&str, u64)]) -> Option<u64> {
    let (num, mult) = match v.find(|c: char| !c.is_ascii_digit()) {
        None => (v, 1),
        Some(i) => {
            let &(_, mult) = suffixes.iter().find(|(s, _)| *s == &v[i..])?;
            (&v[..i], mult)
        }
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(Error::InvalidArgument(format!(
            "{key}: {v:?} is not true or false"
        ))),
    }
}

impl Params {
    /// Parses and validates CreateVolume / GetCapacity parameters.
    pub fn parse(raw: &HashMap<String, String>) -> Result<Params> {
        let mut p = Params::default();
        let mut subclusters = None;
        let mut keys: Vec<&String> = raw.keys().collect();
        keys.sort();
        for key in keys {
            let v = raw[key].trim();
            match key.as_str() {
                "clusterSize" => {
                    let n = parse_size(key, v)?;
                    if !n.is_power_of_two() || !(512..=2 << 20).contains(&n) {
                        return Err(Error::InvalidArgument(format!(
                            "clusterSize: {v:?} is not a power of two from 512 to 2M"
                        )));
                    }
                    p.cluster_size = n;
                }
                "subclusters" => subclusters = Some(parse_bool(key, v)?),
                "encrypted" => p.encrypted = parse_bool(key, v)?,
                "encryptionIterTime" => {
                    p.encryption_iter_time_ms = v
                        .parse::<u32>()
                        .ok()
                        .filter(|ms| (10..=60_000).contains(ms))
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "encryptionIterTime: {v:?} is not a number of milliseconds \
                                 from 10 to 60000"
                            ))
                        })?;
                }
                "fsType" => p.fs_type = FsType::parse(v)?,
                "mkfsOptions" => p.mkfs_options = v.split_whitespace().map(String::from).collect(),
                "overcommitRatio" => {
                    p.overcommit_ratio = v
                        .parse::<f64>()
                        .ok()
                        .filter(|r| r.is_finite() && (1.0..=100.0).contains(r))
                        .ok_or_else(|| {
                            Error::InvalidArgument(format!(
                                "overcommitRatio: {v:?} is not a number from 1 to 100"
                            ))
                        })?;
                }
                k if k.starts_with(PROVISIONER_PREFIX) => {}
                k if qos::KEYS.contains(&k) => {}
                k => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {k:?} (known: clusterSize, subclusters, fsType, \
                         mkfsOptions, overcommitRatio, encrypted, encryptionIterTime, {})",
                        qos::KEYS.join(", ")
                    )));
                }
            }
        }
        p.qos = Limits::parse(raw)?;
        // An encrypted cluster's first write also writes the rest of its unit as encrypted
        // zeros: subclusters make that unit 32 times smaller (docs/engine.md measures it).
        p.subclusters = subclusters.unwrap_or(p.encrypted && p.cluster_size >= 16 << 10);
        if raw.contains_key("encryptionIterTime") && !p.encrypted {
            return Err(Error::InvalidArgument(
                "encryptionIterTime is for encrypted volumes (encrypted: \"true\")".into(),
            ));
        }
        if p.subclusters && p.cluster_size < 16 << 10 {
            return Err(Error::InvalidArgument(
                "subclusters need a clusterSize of at least 16K".into(),
            ));
        }
        Ok(p)
    }

    /// The canonical form stored in the volume record and compared on a repeated create.
    pub fn canonical(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("clusterSize".into(), self.cluster_size.to_string());
        m.insert("subclusters".into(), self.subclusters.to_string());
        if let Some(fs) = self.fs_type {
            m.insert("fsType".into(), fs.as_str().into());
        }
        if !self.mkfs_options.is_empty() {
            m.insert("mkfsOptions".into(), self.mkfs_options.join(" "));
        }
        m.extend(self.qos.canonical());
        if self.encrypted {
            m.insert("encrypted".into(), "true".into());
            m.insert(
                "encryptionIterTime".into(),
                self.encryption_iter_time_ms.to_string(),
            );
        }
        m
    }

    /// Back from the canonical form (records written by this plugin).
    pub fn from_canonical(m: &BTreeMap<String, String>) -> Result<Params> {
        let raw: HashMap<String, String> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Params::parse(&raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn known_keys_are_typed_and_round_trip() {
        let p = Params::parse(&map(&[
            ("clusterSize", "128K"),
            ("subclusters", "true"),
            ("fsType", "xfs"),
            ("mkfsOptions", " -m  reflink=0 "),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("writeIOPS", "500"),
            ("burstSeconds", "3"),
        ]))
        .unwrap();
        assert_eq!(p.qos.write_iops, Some(500));
        assert_eq!(p.qos.burst_seconds, 3);
        assert_eq!(p.cluster_size, 128 << 10);
        assert!(p.subclusters);
        assert_eq!(p.fs_type, Some(FsType::Xfs));
        assert_eq!(p.mkfs_options, ["-m", "reflink=0"]);
        assert_eq!(Params::from_canonical(&p.canonical()).unwrap(), p);
        assert_eq!(Params::parse(&HashMap::new()).unwrap(), Params::default());
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_by_name() {
        for (k, v, says) in [
            ("clusterSize", "100K", "power of two"),
            ("clusterSize", "4M", "power of two"),
            ("clusterSize", "12Q", "not a size"),
            ("subclusters", "yes", "true or false"),
            ("fsType", "btrfs", "not supported"),
            ("overcommitRatio", "0.5", "from 1 to 100"),
            ("readIOPS", "fast", "whole number"),
            ("clustersize", "64K", "unknown parameter"),
            ("encrypted", "1", "true or false"),
            ("encryptionIterTime", "5", "from 10 to 60000"),
        ] {
            let e = Params::parse(&map(&[(k, v)])).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{k}={v}: {e}");
            assert!(e.to_string().contains(says), "{k}={v}: {e}");
        }
        let e = Params::parse(&map(&[("subclusters", "true"), ("clusterSize", "4K")]));
        assert!(e.unwrap_err().to_string().contains("at least 16K"));
        let e = Params::parse(&map(&[("encryptionIterTime", "100")]));
        assert!(e.unwrap_err().to_string().contains("for encrypted volumes"));
    }

    #[test]
    fn encrypted_volumes_default_to_subclusters_and_round_trip() {
        let p = Params::parse(&map(&[("encrypted", "true")])).unwrap();
        assert!(p.encrypted && p.subclusters);
        assert_eq!(p.encryption_iter_time_ms, DEFAULT_ITER_TIME_MS);
        assert_eq!(Params::from_canonical(&p.canonical()).unwrap(), p);
        // Said explicitly, or too small a cluster for them: none.
        let p = Params::parse(&map(&[("encrypted", "true"), ("subclusters", "false")])).unwrap();
        assert!(p.encrypted && !p.subclusters);
        assert_eq!(Params::from_canonical(&p.canonical()).unwrap(), p);
        let p = Params::parse(&map(&[("encrypted", "true"), ("clusterSize", "4K")])).unwrap();
        assert!(p.encrypted && !p.subclusters);
        let p = Params::parse(&map(&[("encrypted", "true"), ("encryptionIterTime", "50")]));
        let p = p.unwrap();
        assert_eq!(p.encryption_iter_time_ms, 50);
        assert_eq!(Params::from_canonical(&p.canonical()).unwrap(), p);
        // Records of unencrypted volumes read as before.
        assert!(!Params::default().canonical().contains_key("encrypted"));
    }
}
