//! The LUKS1 header QEMU stores inside an encrypted qcow2 image (`encrypt.format=luks`), and
//! unlocking its master key with a passphrase.
//!
//! The header sits at the offset the full-disk-encryption header extension (`0x0537be77`)
//! names; key-slot material offsets are in 512-byte sectors from the header's start and must
//! lie inside the region the extension gives. Unlocking a slot: PBKDF2 of the passphrase
//! with the slot's salt and iterations gives the slot key; the slot's material, decrypted
//! with it (sector IVs from 0), is the master key split into `stripes` anti-forensic
//! stripes; merging them gives a candidate master key, which is the master key when its
//! PBKDF2 digest matches the header's. Every number from the file is bounded before use:
//! a hostile header gets a clear error, never a huge allocation or hours of PBKDF2.

use sha1::Sha1;
use sha2::digest::{Digest, FixedOutputReset};
use sha2::{Sha256, Sha512};
use zeroize::Zeroizing;

use super::{Cipher, IvGen};
use crate::error::{Error, Result};

/// Header extension type of the encryption header pointer.
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// LUKS sectors (key material offsets, data IVs) are 512 bytes.
pub const SECTOR: u64 = 512;
/// Size of the LUKS1 header with its eight key slots.
pub const HEADER_LEN: usize = 592;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ACTIVE: u32 = 0x00AC_71F3;
const SLOT_INACTIVE: u32 = 0x0000_DEAD;
const SLOTS: usize = 8;
const DIGEST_LEN: usize = 20;
/// More stripes than any LUKS tool writes (4000), and a bound on the material read.
const MAX_STRIPES: u32 = 16_000;
/// More PBKDF2 iterations than a few seconds of any CPU: a hostile slot must not hang us.
const MAX_ITERATIONS: u32 = 64 << 20;

/// The hash a header names, for PBKDF2 and the anti-forensic merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha1,
    Sha256,
    Sha512,
}

impl Hash {
    fn parse(name: &str) -> Result<Hash> {
        match name {
            "sha1" => Ok(Hash::Sha1),
            "sha256" => Ok(Hash::Sha256),
            "sha512" => Ok(Hash::Sha512),
            other => Err(Error::unsupported(format!(
                "LUKS hash {other:?} (sha1, sha256 and sha512 are supported)"
            ))),
        }
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        match self {
            Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, rounds, out),
            Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, rounds, out),
            Hash::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, rounds, out),
        }
    }

    /// The anti-forensic diffusion of `block` in place: each digest-sized piece `i` becomes
    /// H(be32(i) || piece), the last one cut to its length.
    fn diffuse(self, block: &mut [u8]) {
        match self {
            Hash::Sha1 => diffuse_with::<Sha1>(block),
            Hash::Sha256 => diffuse_with::<Sha256>(block),
            Hash::Sha512 => diffuse_with::<Sha512>(block),
        }
    }
}

fn diffuse_with<D: Digest + FixedOutputReset>(block: &mut [u8]) {
    let size = <D as Digest>::output_size();
    let mut h = D::new();
    for (i, piece) in block.chunks_mut(size).enumerate() {
        Digest::update(&mut h, (i as u32).to_be_bytes());
        Digest::update(&mut h, &*piece);
        let out = h.finalize_reset();
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
}

/// One key slot, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; 32],
    /// Sector of the slot's material, from the header's start.
    pub material_sector: u32,
    pub stripes: u32,
}

/// A LUKS1 header, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cipher_name: String,
    pub cipher_mode: String,
    pub hash: Hash,
    /// Sector of the payload (unused inside qcow2, reported by `info`).
    pub payload_sector: u32,
    pub key_bytes: u32,
    pub digest: [u8; DIGEST_LEN],
    pub digest_salt: [u8; 32],
    pub digest_iterations: u32,
    pub uuid: String,
    pub slots: Vec<KeySlot>,
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Header {
    /// Parses and checks the header at the start of `b`, whose region is `region_len` bytes
    /// long: every active slot's material must lie inside it.
    pub fn parse(b: &[u8], region_len: u64) -> Result<Header> {
        let bad = |why: String| Error::InvalidImage(format!("LUKS header: {why}"));
        if b.len() < HEADER_LEN {
            return Err(bad(format!("{} bytes, shorter than {HEADER_LEN}", b.len())));
        }
        if &b[..6] != MAGIC {
            return Err(bad("no LUKS magic".into()));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(Error::unsupported(format!("LUKS version {version} (1 is)")));
        }
        let hash = Hash::parse(&text(&b[72..104]))?;
        let key_bytes = be32(b, 108);
        let digest_iterations = be32(b, 164);
        if digest_iterations == 0 || digest_iterations > MAX_ITERATIONS {
            return Err(bad(format!("{digest_iterations} digest iterations")));
        }
        let header = Header {
            cipher_name: text(&b[8..40]),
            cipher_mode: text(&b[40..72]),
            hash,
            payload_sector: be32(b, 104),
            key_bytes,
            digest: b[112..132].try_into().expect("20 bytes"),
            digest_salt: b[132..164].try_into().expect("32 bytes"),
            digest_iterations,
            uuid: text(&b[168..208]),
            slots: (0..SLOTS)
                .map(|i| {
                    let s = &b[208 + i * 48..208 + (i + 1) * 48];
                    (be32(s, 0), s)
                })
                .map(|(state, s)| {
                    let active = match state {
                        SLOT_ACTIVE => true,
                        SLOT_INACTIVE => false,
                        other => return Err(bad(format!("key slot state {other:#x}"))),
                    };
                    Ok(KeySlot {
                        active,
                        iterations: be32(s, 4),
                        salt: s[8..40].try_into().expect("32 bytes"),
                        material_sector: be32(s, 40),
                        stripes: be32(s, 44),
                    })
                })
                .collect::<Result<Vec<_>>>()?,
        };
        // The cipher is checked here so that an image we cannot decrypt says so at open.
        Cipher::for_header(&header, &[0u8; 64][..header.key_bytes.min(64) as usize])?;
        for (i, s) in header.slots.iter().enumerate().filter(|(_, s)| s.active) {
            if s.iterations == 0 || s.iterations > MAX_ITERATIONS {
                return Err(bad(format!("key slot {i}: {} iterations", s.iterations)));
            }
            if s.stripes == 0 || s.stripes > MAX_STRIPES {
                return Err(bad(format!("key slot {i}: {} stripes", s.stripes)));
            }
            let start = u64::from(s.material_sector) * SECTOR;
            let end = start + header.material_len(s);
            if start < HEADER_LEN as u64 || end > region_len {
                return Err(bad(format!(
                    "key slot {i}: material at {start}..{end}, outside the {region_len}-byte \
                     encryption header region"
                )));
            }
        }
        if !header.slots.iter().any(|s| s.active) {
            return Err(bad("no active key slot".into()));
        }
        Ok(header)
    }

    /// Bytes of a slot's material: the split key, rounded up to whole sectors.
    pub fn material_len(&self, slot: &KeySlot) -> u64 {
        let split = u64::from(self.key_bytes) * u64::from(slot.stripes);
        split.div_ceil(SECTOR) * SECTOR
    }

    /// The master key, from the first active slot `passphrase` opens. `read` reads bytes of
    /// the encryption header region at an offset from its start.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let key_len = self.key_bytes as usize;
        for slot in self.slots.iter().filter(|s| s.active) {
            let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
            self.hash
                .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut slot_key);
            let mut material = Zeroizing::new(vec![0u8; self.material_len(slot) as usize]);
            read(u64::from(slot.material_sector) * SECTOR, &mut material)?;
            Cipher::for_header(self, &slot_key)?.decrypt(0, &mut material);
            let master = self.merge(&material[..key_len * slot.stripes as usize], slot.stripes);
            let mut digest = [0u8; DIGEST_LEN];
            self.hash.pbkdf2(
                &master,
                &self.digest_salt,
                self.digest_iterations,
                &mut digest,
            );
            if digest == self.digest {
                return Ok(master);
            }
        }
        Err(Error::arg(
            "the passphrase opens none of the image's LUKS key slots",
        ))
    }

    /// The anti-forensic merge of `stripes` stripes of `key_bytes` each.
    fn merge(&self, split: &[u8], stripes: u32) -> Zeroizing<Vec<u8>> {
        let n = self.key_bytes as usize;
        let mut block = Zeroizing::new(vec![0u8; n]);
        let pieces: Vec<&[u8]> = split.chunks(n).collect();
        for piece in &pieces[..stripes as usize - 1] {
            for (b, p) in block.iter_mut().zip(piece.iter()) {
                *b ^= p;
            }
            self.hash.diffuse(&mut block);
        }
        for (b, p) in block.iter_mut().zip(pieces[stripes as usize - 1]) {
            *b ^= p;
        }
        block
    }
}

/// `cipher_name` and `cipher_mode` of a header, as a [`Cipher`] kind.
pub(super) fn cipher_kind(h: &Header) -> Result<IvGen> {
    let (mode, ivgen) = h
        .cipher_mode
        .split_once('-')
        .unwrap_or((h.cipher_mode.as_str(), ""));
    if h.cipher_name != "aes" || mode != "xts" {
        return Err(Error::unsupported(format!(
            "LUKS cipher {}-{} (aes-xts-plain64 and aes-xts-plain are supported)",
            h.cipher_name, h.cipher_mode
        )));
    }
    match ivgen {
        "plain64" => Ok(IvGen::Plain64),
        "plain" => Ok(IvGen::Plain),
        other => Err(Error::unsupported(format!(
            "LUKS IV generator {other:?} (plain64 and plain are supported)"
        ))),
    }
}

/// Stripes of the anti-forensic split, as every LUKS1 tool writes.
const STRIPES: u32 = 4000;
/// Key material starts after the header's first 4 KiB, each slot 4 KiB-aligned (as QEMU and
/// cryptsetup lay it out).
const MATERIAL_ALIGN_SECTORS: u32 = 8;
/// The fewest PBKDF2 iterations LUKS1 allows for a slot and for the digest.
pub const MIN_ITERATIONS: u32 = 1000;

/// What a new LUKS header is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewHeader {
    /// 16 (AES-128-XTS, 32-byte key) or 32 (AES-256-XTS, 64-byte key).
    pub aes_key_bytes: u32,
    pub ivgen: IvGen,
    pub hash: Hash,
    /// PBKDF2 iterations of the key slot: what this CPU does in this many milliseconds
    /// (QEMU's `iter-time`, default 2000), at least [`MIN_ITERATIONS`].
    pub iter_time_ms: u32,
}

impl Default for NewHeader {
    /// QEMU's defaults: aes-256-xts-plain64, sha256, 2 s.
    fn default() -> Self {
        NewHeader {
            aes_key_bytes: 32,
            ivgen: IvGen::Plain64,
            hash: Hash::Sha256,
            iter_time_ms: 2000,
        }
    }
}

impl Hash {
    /// The name LUKS stores.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha512 => "sha512",
        }
    }
}

impl std::str::FromStr for Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Hash> {
        Hash::parse(s)
    }
}

/// Random bytes from the operating system.
fn random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "reading random bytes for a new key",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// PBKDF2 iterations of `hash` this CPU runs in `ms` milliseconds (timed, like QEMU).
fn iterations_for(hash: Hash, ms: u32) -> u32 {
    let mut out = [0u8; 32];
    let mut n = 1u32 << 12;
    loop {
        let start = std::time::Instant::now();
        hash.pbkdf2(b"timing", &[0u8; 32], n, &mut out);
        let took = start.elapsed();
        if took >= std::time::Duration::from_millis(40) || n >= 1 << 26 {
            let per_ms = f64::from(n) / took.as_secs_f64().max(1e-6) / 1000.0;
            let want = per_ms * f64::from(ms);
            return (want as u32).clamp(MIN_ITERATIONS, MAX_ITERATIONS);
        }
        n *= 2;
    }
}

impl Header {
    /// A new LUKS1 header region with one active key slot opened by `passphrase`: the
    /// region's bytes (header, then every slot's material 4 KiB-aligned; its length is the
    /// payload offset) and the new random master key.
    pub fn create(params: &NewHeader, passphrase: &[u8]) -> Result<(Vec<u8>, Zeroizing<Vec<u8>>)> {
        let aes = params.aes_key_bytes;
        if aes != 16 && aes != 32 {
            return Err(Error::arg(format!(
                "an AES key of {aes} bytes (16 or 32 are supported)"
            )));
        }
        let key_bytes = aes * 2;
        let material_sectors = (u64::from(key_bytes) * u64::from(STRIPES))
            .div_ceil(SECTOR)
            .next_multiple_of(u64::from(MATERIAL_ALIGN_SECTORS))
            as u32;
        let payload_sector = MATERIAL_ALIGN_SECTORS + SLOTS as u32 * material_sectors;
        let mut region = vec![0u8; payload_sector as usize * SECTOR as usize];

        let mut master = Zeroizing::new(vec![0u8; key_bytes as usize]);
        random(&mut master)?;
        let mut digest_salt = [0u8; 32];
        random(&mut digest_salt)?;
        let mut slot_salt = [0u8; 32];
        random(&mut slot_salt)?;
        let mut uuid = [0u8; 16];
        random(&mut uuid)?;
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        );
        let slot_iterations = iterations_for(params.hash, params.iter_time_ms);
        let digest_iterations = (slot_iterations / 8).max(MIN_ITERATIONS);

        let mode = match params.ivgen {
            IvGen::Plain64 => "xts-plain64",
            IvGen::Plain => "xts-plain",
        };
        let h = &mut region[..HEADER_LEN];
        h[..6].copy_from_slice(MAGIC);
        h[6..8].copy_from_slice(&1u16.to_be_bytes());
        h[8..11].copy_from_slice(b"aes");
        h[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        let hash_name = params.hash.name();
        h[72..72 + hash_name.len()].copy_from_slice(hash_name.as_bytes());
        h[104..108].copy_from_slice(&payload_sector.to_be_bytes());
        h[108..112].copy_from_slice(&key_bytes.to_be_bytes());
        let mut digest = [0u8; DIGEST_LEN];
        params
            .hash
            .pbkdf2(&master, &digest_salt, digest_iterations, &mut digest);
        h[112..132].copy_from_slice(&digest);
        h[132..164].copy_from_slice(&digest_salt);
        h[164..168].copy_from_slice(&digest_iterations.to_be_bytes());
        h[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        for i in 0..SLOTS {
            let s = &mut h[208 + i * 48..208 + (i + 1) * 48];
            let active = i == 0;
            let state = if active { SLOT_ACTIVE } else { SLOT_INACTIVE };
            s[..4].copy_from_slice(&state.to_be_bytes());
            if active {
                s[4..8].copy_from_slice(&slot_iterations.to_be_bytes());
                s[8..40].copy_from_slice(&slot_salt);
            }
            let sector = MATERIAL_ALIGN_SECTORS + i as u32 * material_sectors;
            s[40..44].copy_from_slice(&sector.to_be_bytes());
            s[44..48].copy_from_slice(&STRIPES.to_be_bytes());
        }
        let header = Header::parse(&region[..HEADER_LEN], region.len() as u64)?;

        // Slot 0: the master key split into stripes, encrypted with the passphrase's key.
        let mut slot_key = Zeroizing::new(vec![0u8; key_bytes as usize]);
        params
            .hash
            .pbkdf2(passphrase, &slot_salt, slot_iterations, &mut slot_key);
        let mut material =
            Zeroizing::new(vec![0u8; header.material_len(&header.slots[0]) as usize]);
        header.split(&master, &mut material[..(key_bytes * STRIPES) as usize])?;
        Cipher::for_header(&header, &slot_key)?.encrypt(0, &mut material);
        let at = MATERIAL_ALIGN_SECTORS as usize * SECTOR as usize;
        region[at..at + material.len()].copy_from_slice(&material);
        Ok((region, master))
    }

    /// The anti-forensic split of `key` into `split.len() / key.len()` stripes: random
    /// stripes, the last one chosen so that [`Header::merge`] gives `key` back.
    fn split(&self, key: &[u8], split: &mut [u8]) -> Result<()> {
        let n = key.len();
        let stripes = split.len() / n;
        random(&mut split[..(stripes - 1) * n])?;
        let mut block = Zeroizing::new(vec![0u8; n]);
        for piece in split[..(stripes - 1) * n].chunks(n) {
            for (b, p) in block.iter_mut().zip(piece) {
                *b ^= p;
            }
            self.hash.diffuse(&mut block);
        }
        for ((out, b), k) in split[(stripes - 1) * n..]
            .iter_mut()
            .zip(block.iter())
            .zip(key)
        {
            *out = b ^ k;
        }
        Ok(())
    }
}
