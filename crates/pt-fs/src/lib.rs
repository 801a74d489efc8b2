//! Crash-safe writes, in one place for every crate that publishes files
//! (datasets, checkpoints, results, the plugin store): a reader sees the old
//! file or the new one, never half of one, and a crash after the rename
//! cannot leave it empty. Also the one memory map of the workspace, for
//! files published that way.

#![deny(unsafe_code)]

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to a temporary sibling, flushes it to disk, and renames it
/// over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("partial");
    let mut file = fs::File::create(&temporary)
        .with_context(|| format!("{}: cannot write", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("{}: cannot write", temporary.display()))?;
    fs::rename(&temporary, path).with_context(|| format!("{}: cannot write", path.display()))
}

/// A new file at `path` (replacing one there), written through a 1 MiB
/// buffer: for files filled as a stream, then published by renaming their
/// directory or the file itself.
pub fn create_buffered(path: &Path) -> Result<std::io::BufWriter<fs::File>> {
    let file =
        fs::File::create(path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(std::io::BufWriter::with_capacity(1 << 20, file))
}

/// [`write_atomically`] with the contents of `from`.
pub fn copy_atomically(from: &Path, to: &Path) -> Result<()> {
    write_atomically(
        to,
        &fs::read(from).with_context(|| format!("{}: cannot read", from.display()))?,
    )
}

/// Flushes every file of `dir`, and `dir` itself, to disk: a rename then
/// publishes files that a crash cannot leave empty or half-written.
pub fn sync_directory(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot sync", path.display()))?;
        }
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync", dir.display()))
}

/// A file's bytes, mapped read-only: the page cache holds them, so a
/// dataset larger than memory is read without being loaded.
pub struct MappedFile(Option<memmap2::Mmap>);

impl MappedFile {
    /// Maps `path`. It must not change while mapped: pt-host only maps files
    /// it published with a rename (the cache's), never rewritten in place.
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let length = file
            .metadata()
            .with_context(|| format!("{}: cannot read", path.display()))?
            .len();
        // An empty file cannot be mapped (and has nothing to read).
        if length == 0 {
            return Ok(Self(None));
        }
        // SAFETY: the map is read-only and the file is never modified in
        // place (see above); a user editing the cache by hand could change
        // what is read, as with any reader, but not memory outside the map.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        Ok(Self(Some(map)))
    }

    pub fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, b"first, longer contents").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        copy_atomically(&path, &dir.path().join("copy.json")).unwrap();
        sync_directory(dir.path()).unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["copy.json", "state.json"]);
        let missing = copy_atomically(&dir.path().join("none"), &path).unwrap_err();
        assert!(format!("{missing:#}").contains("none: cannot read"));
    }

    #[test]
    fn a_mapped_file_reads_its_bytes_and_an_empty_one_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        write_atomically(&path, &[1, 2, 3]).unwrap();
        assert_eq!(MappedFile::open(&path).unwrap().bytes(), [1, 2, 3]);
        write_atomically(&path, &[]).unwrap();
        assert!(MappedFile::open(&path).unwrap().bytes().is_empty());
        assert!(MappedFile::open(&dir.path().join("none")).is_err());
    }
}
