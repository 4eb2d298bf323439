//! Encryption of qcow2 images in QEMU's LUKS format (`encrypt.format=luks`): the header and
//! its key slots ([`luks`]), and the cipher of the data clusters ([`Cipher`]).
//!
//! Data is encrypted in 512-byte sectors with AES-XTS; each sector's tweak is its *host*
//! offset / 512 (QEMU sets `crypt_physical_offset` for LUKS in qcow2), so a cluster cannot
//! be moved in the file without re-encrypting it. Keys live in [`Zeroizing`] buffers and
//! are wiped when dropped; the AES key schedules are wiped by the `aes` crate's `zeroize`
//! feature.

pub mod luks;

use aes::cipher::consts::U16;
use aes::cipher::{Array, KeyInit};
use aes::{Aes128, Aes256};
use sha2::Digest;
use xts_mode::{Xts128, get_tweak_default};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

pub use zeroize;

/// How a sector number becomes its tweak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvGen {
    /// The 64-bit sector number, little-endian (QEMU's default).
    Plain64,
    /// The sector number cut to 32 bits (`ivgen-alg=plain`).
    Plain,
}

enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

/// AES-XTS over 512-byte sectors, keyed with a master (or key-slot) key.
pub struct Cipher {
    xts: Xts,
    ivgen: IvGen,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bits = match self.xts {
            Xts::Aes128(_) => 128,
            Xts::Aes256(_) => 256,
        };
        // Never the key.
        write!(f, "Cipher(aes-{bits}-xts, {:?})", self.ivgen)
    }
}

impl Cipher {
    /// The cipher a LUKS header names, keyed with `key` (32 bytes: AES-128-XTS, 64 bytes:
    /// AES-256-XTS).
    pub fn for_header(h: &luks::Header, key: &[u8]) -> Result<Cipher> {
        let ivgen = luks::cipher_kind(h)?;
        if key.len() != h.key_bytes as usize {
            return Err(Error::arg(format!(
                "a {}-byte key for a {}-byte cipher",
                key.len(),
                h.key_bytes
            )));
        }
        Cipher::new(key, ivgen)
    }

    /// AES-XTS with `key` split into its two halves.
    pub fn new(key: &[u8], ivgen: IvGen) -> Result<Cipher> {
        let half = key.len() / 2;
        let (k1, k2) = key.split_at(half);
        let xts = match key.len() {
            32 => Xts::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(k1).expect("16 bytes"),
                Aes128::new_from_slice(k2).expect("16 bytes"),
            ))),
            64 => Xts::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(k1).expect("32 bytes"),
                Aes256::new_from_slice(k2).expect("32 bytes"),
            ))),
            n => {
                return Err(Error::unsupported(format!(
                    "an AES-XTS key of {n} bytes (32 or 64 are supported)"
                )));
            }
        };
        Ok(Cipher { xts, ivgen })
    }

    fn tweak(&self, sector: u128) -> Array<u8, U16> {
        match self.ivgen {
            IvGen::Plain64 => get_tweak_default(sector & u128::from(u64::MAX)),
            IvGen::Plain => get_tweak_default(sector & u128::from(u32::MAX)),
        }
    }

    /// Decrypts `buf` (whole sectors) that lies at byte `offset` (sector-aligned).
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) {
        self.each_sector(offset, buf, false);
    }

    /// Encrypts `buf` (whole sectors) that goes to byte `offset` (sector-aligned).
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) {
        self.each_sector(offset, buf, true);
    }

    fn each_sector(&self, offset: u64, buf: &mut [u8], encrypt: bool) {
        assert!(
            offset.is_multiple_of(luks::SECTOR) && (buf.len() as u64).is_multiple_of(luks::SECTOR),
            "whole sectors only"
        );
        let first = u128::from(offset / luks::SECTOR);
        for (i, sector) in buf.chunks_mut(luks::SECTOR as usize).enumerate() {
            let tweak = self.tweak(first + i as u128);
            match (&self.xts, encrypt) {
                (Xts::Aes128(x), false) => x.decrypt_sector(sector, tweak),
                (Xts::Aes128(x), true) => x.encrypt_sector(sector, tweak),
                (Xts::Aes256(x), false) => x.decrypt_sector(sector, tweak),
                (Xts::Aes256(x), true) => x.encrypt_sector(sector, tweak),
            }
        }
    }
}

/// A key in memory that is wiped when dropped.
pub type Key = Zeroizing<Vec<u8>>;

/// Master keys unlocked while opening one chain, by the SHA-256 of their encryption header
/// region (wiped when the open ends).
#[derive(Default)]
pub struct Keyring(Vec<([u8; 32], Key)>);

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        write!(f, "Keyring({} keys)", self.0.len())
    }
}

/// The passphrase of an encrypted image: wiped when dropped, never printed.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Passphrase {
        Passphrase(Zeroizing::new(bytes.into()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// Largest encryption header region accepted: QEMU's is about 2 MiB (eight slots of 4000
/// stripes of a 64-byte key).
const MAX_REGION: u64 = 64 << 20;

/// A LUKS-encrypted image's encryption: its header, and its data cipher once unlocked.
#[derive(Debug)]
pub struct Encryption {
    pub header: luks::Header,
    /// `None`: opened without the passphrase, for metadata only; data cannot be read.
    pub cipher: Option<Cipher>,
}

/// Where the encryption header region lies (offset, length), from the qcow2 header's
/// full-disk-encryption extension; `None` without one. The extension's shape and the
/// region's start (a cluster after the header) are checked here; whether the region lies
/// inside the file is for the caller.
pub fn region(header: &crate::format::Header) -> Result<Option<(u64, u64)>> {
    let Some(ext) = header
        .unknown_extensions
        .iter()
        .find(|e| e.kind == luks::EXT_CRYPTO_HEADER)
    else {
        return Ok(None);
    };
    if ext.data.len() < 16 {
        return Err(Error::InvalidImage(format!(
            "encryption header: the extension has {} bytes",
            ext.data.len()
        )));
    }
    let offset = u64::from_be_bytes(ext.data[..8].try_into().expect("8 bytes"));
    let length = u64::from_be_bytes(ext.data[8..16].try_into().expect("8 bytes"));
    if offset == 0 || !offset.is_multiple_of(header.geometry().cluster_size()) {
        return Err(Error::InvalidImage(format!(
            "encryption header: region offset {offset} is not a cluster after the header"
        )));
    }
    Ok(Some((offset, length)))
}

/// The encryption header region of the LUKS-encrypted image at `path`, as stored (to give
/// a new image the same key, see [`crate::ops::create::NewEncryption::SameKeyAs`]).
pub fn read_region(path: &std::path::Path) -> Result<Vec<u8>> {
    use crate::error::IoContext;
    let storage = crate::storage::FileStorage::open_unlocked(path)
        .ctx(|| format!("opening {}", path.display()))?;
    let header = crate::image::read_header(&storage)?;
    if header.crypt_method != 2 {
        return Err(Error::arg(format!(
            "{} is not LUKS-encrypted: there is no key to share",
            path.display()
        )));
    }
    // Checks the region's bounds and the header's fields, without a passphrase.
    open_luks(&storage, &header, None, true, &mut Keyring::default())?;
    let (offset, length) = region(&header)?.expect("open_luks found the region");
    let mut bytes = vec![0u8; length as usize];
    crate::storage::Storage::read_at(&storage, &mut bytes, offset)
        .ctx(|| format!("reading the encryption header of {}", path.display()))?;
    Ok(bytes)
}

/// The encryption of a LUKS-encrypted qcow2 image held by `storage` (`header` is its qcow2
/// header), unlocked with `passphrase`; without one, locked if `locked_ok`, else an error.
pub fn open_luks(
    storage: &dyn crate::storage::Storage,
    header: &crate::format::Header,
    passphrase: Option<&Passphrase>,
    locked_ok: bool,
    keys: &mut Keyring,
) -> Result<Encryption> {
    let bad = |why: String| Error::InvalidImage(format!("encryption header: {why}"));
    let (offset, length) = region(header)?
        .ok_or_else(|| bad("the image is LUKS-encrypted but has no header extension".into()))?;
    let file_len = storage
        .len()
        .map_err(|e| Error::InvalidImage(format!("encryption header: {e}")))?;
    if length < luks::HEADER_LEN as u64
        || length > MAX_REGION
        || offset.checked_add(length).is_none_or(|end| end > file_len)
    {
        return Err(bad(format!(
            "region {offset}+{length} is not inside the {file_len}-byte file"
        )));
    }
    let read = |at: u64, buf: &mut [u8]| {
        storage
            .read_at(buf, offset + at)
            .map_err(|e| Error::InvalidImage(format!("reading the encryption header: {e}")))
    };
    let mut first = vec![0u8; luks::HEADER_LEN];
    read(0, &mut first)?;
    let h = luks::Header::parse(&first, length)?;
    let Some(passphrase) = passphrase else {
        if locked_ok {
            return Ok(Encryption {
                header: h,
                cipher: None,
            });
        }
        return Err(Error::arg(
            "the image is encrypted (LUKS): its passphrase is needed to open it",
        ));
    };
    // A layer whose header region is byte for byte one unlocked before in this chain (made
    // with NewEncryption::SameKeyAs) has that master key: no second PBKDF2.
    let mut whole = vec![0u8; length as usize];
    read(0, &mut whole)?;
    let fingerprint: [u8; 32] = sha2::Sha256::digest(&whole).into();
    let key = match keys.0.iter().find(|(f, _)| *f == fingerprint) {
        Some((_, key)) => key.clone(),
        None => {
            let key = h.unlock(passphrase.as_bytes(), &mut |at, buf| {
                let at = at as usize;
                let src = whole.get(at..at + buf.len()).ok_or_else(|| {
                    Error::InvalidImage("encryption header: key material past the region".into())
                })?;
                buf.copy_from_slice(src);
                Ok(())
            })?;
            keys.0.push((fingerprint, key.clone()));
            key
        }
    };
    let cipher = Cipher::for_header(&h, &key)?;
    Ok(Encryption {
        header: h,
        cipher: Some(cipher),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xts_round_trips_and_the_tweak_depends_on_the_offset() {
        for key_len in [32usize, 64] {
            let key: Vec<u8> = (0..key_len as u8).collect();
            let c = Cipher::new(&key, IvGen::Plain64).unwrap();
            let plain: Vec<u8> = (0..2048u32).map(|i| (i % 251) as u8).collect();
            let mut a = plain.clone();
            c.encrypt(4096, &mut a);
            assert_ne!(a, plain);
            let mut b = plain.clone();
            c.encrypt(8192, &mut b);
            assert_ne!(a, b, "the same data at another offset encrypts differently");
            c.decrypt(4096, &mut a);
            assert_eq!(a, plain);
        }
        assert!(Cipher::new(&[0u8; 48], IvGen::Plain64).is_err());
        // plain cuts the sector number to 32 bits: sector 2^32 has sector 0's tweak.
        let c = Cipher::new(&[7u8; 64], IvGen::Plain).unwrap();
        let (mut lo, mut hi) = (vec![1u8; 512], vec![1u8; 512]);
        c.encrypt(0, &mut lo);
        c.encrypt((1u64 << 32) * 512, &mut hi);
        assert_eq!(lo, hi);
    }
}
