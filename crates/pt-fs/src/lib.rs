//! Crash-safe writes, in one place for every crate that publishes files
//! (datasets, checkpoints, results, the plugin store): a reader sees the old
//! file or the new one, never half of one, and a crash after the rename
//! cannot leave it empty.

#![forbid(unsafe_code)]

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
}
