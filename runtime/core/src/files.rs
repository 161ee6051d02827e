//! Files in the data directory: durable atomic writes, content digests, and the sweep of
//! temporaries that a crash left behind.
//!
//! Every file wasp keeps follows the same rules, the ones a database keeps for its own:
//! a write goes to a temporary file in the same directory, is synced, renamed over the
//! target and the directory is synced, so a reader (or a restart after `kill -9` or a
//! power cut) sees the old file or the whole new one, never a part. A failed write removes
//! its temporary; [`sweep_temporaries`] removes those of writes a crash interrupted, and
//! runs at every start. Temporaries are hidden files named with [`TEMP_PREFIX`].

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Name prefix of every temporary file wasp writes; nothing else in the data directory
/// starts with it, so a start-up sweep may remove all of them.
pub const TEMP_PREFIX: &str = ".wasp-tmp-";

/// Writes `bytes` to `path` atomically and durably (see the module docs). On error, the
/// file at `path` is unchanged and no temporary is left.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |file| file.write_all(bytes))
}

/// Like [`write_atomic`], with the content written by `fill` into the temporary file.
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = parent(path);
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = File::options().write(true).create_new(true).open(&tmp)?;
        fill(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // The rename may have happened before the directory sync failed; then there is
        // nothing to remove and the new file is in place (perhaps not yet durable).
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A fresh temporary path beside `path`: same directory (so the rename is atomic), hidden,
/// and unique across threads and processes.
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(path).join(format!("{TEMP_PREFIX}{}-{n}-{name}", std::process::id()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs a directory, so that a rename or a removal in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes the temporaries that interrupted writes left in `dir` (not recursive); returns
/// how many. A missing directory has none.
pub fn sweep_temporaries(dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
            && entry.file_type()?.is_file()
        {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Whether an I/O error means the disk (or the user's quota) is full, so that retrying
/// after space is freed would succeed.
pub fn is_storage_full(e: &io::Error) -> bool {
    // ENOSPC, EDQUOT and EFBIG on Linux.
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    const EFBIG: i32 = 27;
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    ) || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT | EFBIG))
}

/// Describes an I/O error for a client: its kind and the OS's message, never a path.
pub fn describe_io(e: &io::Error) -> String {
    if is_storage_full(e) {
        "the data directory is full (no space left on the device)".to_owned()
    } else {
        // `io::Error`'s display is the OS message and code; paths are only ever added by
        // callers, which is why the caller's path is kept out of this text.
        e.to_string()
    }
}

/// The SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 of `bytes`, raw.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(names(dir.path()), ["a.bin"]);
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_removes_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |f| {
            f.write_all(b"half")?;
            Err(io::Error::from_raw_os_error(28))
        })
        .unwrap_err();
        assert!(is_storage_full(&err));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["a.bin"]);
    }

    #[test]
    fn sweep_removes_only_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.wasm"), b"x").unwrap();
        std::fs::write(temp_path(&dir.path().join("keep.wasm")), b"partial").unwrap();
        std::fs::write(temp_path(&dir.path().join("other")), b"partial").unwrap();
        assert_eq!(sweep_temporaries(dir.path()).unwrap(), 2);
        assert_eq!(names(dir.path()), ["keep.wasm"]);
        assert_eq!(sweep_temporaries(&dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn digests_and_messages() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let full = io::Error::from_raw_os_error(28);
        assert!(describe_io(&full).contains("full"));
        assert!(!is_storage_full(&io::Error::from_raw_os_error(5)));
    }
}
