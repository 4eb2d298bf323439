//! NBD wire format: magics, option and command numbers, flags, and the encoders and decoders
//! for every message the server reads or writes. Numbers are from the NBD protocol
//! specification (`doc/proto.md` of the NetworkBlockDevice project). Everything is big-endian.

/// Handshake: `NBDMAGIC`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Handshake: `IHAVEOPT`, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub mod handshake {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// No 124 zero bytes after `EXPORT_NAME`'s reply.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR | 1;
    pub const ERR_POLICY: u32 = ERR | 2;
    pub const ERR_INVALID: u32 = ERR | 3;
    pub const ERR_PLATFORM: u32 = ERR | 4;
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types in `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
pub mod flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`) and the chunk flag.
pub mod reply {
    pub const FLAG_DONE: u16 = 1;
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) | 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Error values carried in replies (the spec's numbering, not the host's errno).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Metadata contexts this server offers, with the ids it gives them.
pub mod context {
    pub const BASE_ALLOCATION: &str = "base:allocation";
    pub const ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
    pub const BASE_ALLOCATION_ID: u32 = 1;
    pub const ALLOCATION_DEPTH_ID: u32 = 2;
    /// `base:allocation` flags.
    pub const STATE_HOLE: u32 = 1;
    pub const STATE_ZERO: u32 = 2;
}

/// The data of `LIST_META_CONTEXT`/`SET_META_CONTEXT`: export name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Decodes option data; `None` when lengths disagree or strings are not UTF-8.
    pub fn decode(data: &[u8]) -> Option<MetaContextRequest> {
        let mut rest = data;
        let mut take = |n: usize| -> Option<&[u8]> {
            let (a, b) = (rest.get(..n)?, rest.get(n..)?);
            rest = b;
            Some(a)
        };
        let name_len = be32(take(4)?) as usize;
        let name = String::from_utf8(take(name_len)?.to_vec()).ok()?;
        let count = be32(take(4)?) as usize;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = be32(take(4)?) as usize;
            queries.push(String::from_utf8(take(len)?.to_vec()).ok()?);
        }
        if !rest.is_empty() {
            return None;
        }
        Some(MetaContextRequest { name, queries })
    }
}

/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a request header; `None` if the magic is wrong (the stream is then lost).
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            length: be32(&b[24..28]),
        })
    }

    /// Encodes a request header (for tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A simple reply header (payload, if any, follows).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Bytes of a structured reply chunk's header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// A structured reply chunk header for `len` bytes of chunk payload.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A structured error chunk (always the last: `FLAG_DONE`), with a message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut b = chunk_header(cookie, reply::FLAG_DONE, reply::ERROR, 6 + msg.len() as u32).to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// An option reply header for `len` bytes of reply data.
pub fn option_reply(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The data of an `OPT_INFO`/`OPT_GO` request: export name and requested information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes option data; `None` when lengths disagree or the name is not UTF-8.
    pub fn decode(data: &[u8]) -> Option<InfoRequest> {
        let name_len = be32(data.get(0..4)?) as usize;
        let name = data.get(4..4usize.checked_add(name_len)?)?;
        let rest = &data[4 + name_len..];
        let count = be16(rest.get(0..2)?) as usize;
        let ids = rest.get(2..)?;
        if ids.len() != count * 2 {
            return None;
        }
        Some(InfoRequest {
            name: String::from_utf8(name.to_vec()).ok()?,
            requests: ids.chunks_exact(2).map(be16).collect(),
        })
    }
}

/// Big-endian u16 from 2 bytes.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().expect("2 bytes"))
}

/// Big-endian u32 from 4 bytes.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

/// Big-endian u64 from 8 bytes.
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_matches_the_spec_layout() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 0x1000,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(Request::decode(&b), Some(r));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), None);
    }

    #[test]
    fn replies_have_the_spec_layout() {
        assert_eq!(
            simple_reply(7, errno::EINVAL),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        assert_eq!(
            chunk_header(7, reply::FLAG_DONE, reply::NONE, 0),
            [
                0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0
            ]
        );
        let e = error_chunk(9, errno::EIO, "bad");
        assert_eq!(&e[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&e[16..20], &[0, 0, 0, 9]);
        assert_eq!(&e[20..], &[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
        assert_eq!(
            option_reply(opt::GO, rep::ERR_UNKNOWN, 0),
            [
                0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn meta_context_requests_decode_and_refuse_bad_lengths() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:"] {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        assert_eq!(
            MetaContextRequest::decode(&d),
            Some(MetaContextRequest {
                name: String::new(),
                queries: vec!["base:allocation".into(), "qemu:".into()]
            })
        );
        assert_eq!(MetaContextRequest::decode(&d[..d.len() - 1]), None);
        let mut extra = d.clone();
        extra.push(0);
        assert_eq!(MetaContextRequest::decode(&extra), None);
        let mut many = 0u32.to_be_bytes().to_vec();
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(MetaContextRequest::decode(&many), None);
    }

    #[test]
    fn info_requests_decode_and_refuse_bad_lengths() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(
            InfoRequest::decode(&d),
            Some(InfoRequest {
                name: "vol".into(),
                requests: vec![info::BLOCK_SIZE, info::NAME]
            })
        );
        assert_eq!(InfoRequest::decode(&d[..d.len() - 1]), None);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"x");
        assert_eq!(InfoRequest::decode(&huge), None);
        assert_eq!(InfoRequest::decode(&[0, 0]), None);
    }
}
