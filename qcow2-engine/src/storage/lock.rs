//! Image locking compatible with QEMU's (`block/file-posix.c`).
//!
//! QEMU takes shared open-file-description (OFD) locks on single bytes of the image file:
//! byte `100 + p` while it holds permission `p`, byte `200 + p` while it refuses to share
//! permission `p` with others. An opener conflicts with the file's other users when it wants
//! a permission someone refuses to share (a lock on `200 + p` by another open file), or
//! refuses one that someone holds (`100 + p`). Permissions: 0 consistent read, 1 write,
//! 2 write-unchanged, 3 resize.
//!
//! We take the same bytes as `qemu-io`: a writer holds read, write and resize and refuses to
//! share write and resize; a reader holds read and also refuses write and resize (nobody may
//! change an image under its reader, e.g. a backing file). So qemu refuses to write an image we
//! have open, we refuse one qemu writes, two writers never share a file, readers share.
//! Locks are advisory and vanish with the file descriptor (also on a crash).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use nix::fcntl::{FcntlArg, fcntl};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;
const RESIZE: i64 = 3;

fn perm_name(p: i64) -> &'static str {
    match p {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

fn set(file: &File, kind: i32, byte: i64) -> io::Result<()> {
    fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&flock(kind, byte)))
        .map(drop)
        .map_err(io::Error::from)
}

/// Whether another open file holds a lock on `byte`.
fn taken_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut probe = flock(libc::F_WRLCK, byte);
    fcntl(file.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe)).map_err(io::Error::from)?;
    Ok(i32::from(probe.l_type) != libc::F_UNLCK)
}

/// Takes QEMU-compatible locks for a reader or a writer; fails with `WouldBlock` (naming the
/// permission in conflict) when another user of the file is incompatible.
pub fn lock(file: &File, writable: bool) -> io::Result<()> {
    let held: &[i64] = if writable {
        &[CONSISTENT_READ, WRITE, RESIZE]
    } else {
        &[CONSISTENT_READ]
    };
    let refused: &[i64] = &[WRITE, RESIZE];
    let bytes = held
        .iter()
        .map(|p| PERM_BASE + p)
        .chain(refused.iter().map(|p| SHARED_BASE + p));
    for byte in bytes {
        if let Err(e) = set(file, libc::F_RDLCK, byte) {
            unlock(file);
            return Err(e);
        }
    }
    let conflict = |what: String| {
        unlock(file);
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("failed to get {what} lock: is another process using the image?"),
        ))
    };
    for &p in held {
        if taken_by_others(file, SHARED_BASE + p)? {
            return conflict(format!("\"{}\"", perm_name(p)));
        }
    }
    for &p in refused {
        if taken_by_others(file, PERM_BASE + p)? {
            return conflict(format!("shared \"{}\"", perm_name(p)));
        }
    }
    Ok(())
}

/// Drops every lock this open file holds.
pub fn unlock(file: &File) {
    let all = libc::flock {
        l_type: libc::F_UNLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let _ = fcntl(file.as_fd(), FcntlArg::F_OFD_SETLK(&all));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let (a, b, c) = (open(&p), open(&p), open(&p));
        lock(&a, false).unwrap();
        lock(&b, false).unwrap();
        let e = lock(&c, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        unlock(&b);
        lock(&c, true).unwrap();
        assert!(lock(&b, true).is_err());
        assert!(lock(&b, false).is_err(), "a reader must not join a writer");
        unlock(&c);
        lock(&b, true).unwrap();
    }

    #[test]
    fn the_lock_bytes_are_qemus() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let a = open(&p);
        lock(&a, true).unwrap();
        let b = open(&p);
        let locked: Vec<i64> = (0..300)
            .filter(|&i| taken_by_others(&b, i).unwrap())
            .collect();
        assert_eq!(locked, vec![100, 101, 103, 201, 203]);
    }
}
