//! An external sort of fixed-size records within a memory budget: records
//! fill a buffer; a full buffer is sorted and written as a run to disk; the
//! sorted result merges the runs. Nothing touches the disk while everything
//! fits. (The `extsort` crate, 0.5, returns nothing at all when the record
//! count is an exact multiple of its run size, so this is written here.)

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A record written in `BYTES` bytes.
pub(crate) trait Record: Ord + Sized {
    const BYTES: usize;
    fn encode(&self, bytes: &mut [u8]);
    fn decode(bytes: &[u8]) -> Self;
}

/// Runs merged at once; past this many, the runs so far are merged into one
/// first, so a small budget never runs out of file handles.
const MAX_RUNS: usize = 128;

/// Buffered bytes per run file, written or read.
const IO_BUFFER: usize = 64 << 10;

pub(crate) struct Sorter<T: Record> {
    buffer: Vec<T>,
    /// Where runs go (created with the first one).
    dir: PathBuf,
    /// Each run's file and record count.
    runs: Vec<(PathBuf, u64)>,
    /// Run files made so far, which names the next.
    files: usize,
    written: u64,
}

impl<T: Record> Sorter<T> {
    /// A sort holding at most `memory` bytes of records.
    pub(crate) fn new(memory: usize, dir: PathBuf) -> Self {
        let capacity = (memory / std::mem::size_of::<T>()).max(2);
        Self {
            buffer: Vec::with_capacity(capacity),
            dir,
            runs: Vec::new(),
            files: 0,
            written: 0,
        }
    }

    pub(crate) fn push(&mut self, record: T) -> Result<()> {
        if self.buffer.len() == self.buffer.capacity() {
            self.spill()?;
        }
        self.buffer.push(record);
        Ok(())
    }

    /// Bytes written to disk, once sorted: every record once they do not
    /// all fit, and again for each merge on the way.
    pub(crate) fn spilled_bytes(&self) -> u64 {
        match self.runs.is_empty() {
            true => 0,
            false => self.written + (self.buffer.len() * T::BYTES) as u64,
        }
    }

    /// Everything pushed, in order.
    pub(crate) fn sorted(mut self) -> Result<Sorted<T>> {
        if self.runs.is_empty() {
            self.buffer.sort_unstable();
            return Ok(Sorted::Memory(self.buffer.into_iter()));
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        Ok(Sorted::Merged(Merge::new(&self.runs)?))
    }

    /// Writes the buffer, sorted, as a run.
    fn spill(&mut self) -> Result<()> {
        self.buffer.sort_unstable();
        let path = self.next_run()?;
        let count = write_run(&path, self.buffer.drain(..).map(Ok))?;
        self.written += count * T::BYTES as u64;
        self.runs.push((path, count));
        if self.runs.len() == MAX_RUNS {
            let runs = std::mem::take(&mut self.runs);
            let path = self.next_run()?;
            let count = write_run(&path, Merge::<T>::new(&runs)?)?;
            self.written += count * T::BYTES as u64;
            self.runs.push((path, count));
            for (path, _) in runs {
                fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// A new run file's name.
    fn next_run(&mut self) -> Result<PathBuf> {
        if self.files == 0 {
            fs::create_dir_all(&self.dir)
                .with_context(|| format!("{}: cannot create", self.dir.display()))?;
        }
        self.files += 1;
        Ok(self.dir.join(self.files.to_string()))
    }
}

/// Writes `records` to a new file at `path`: how many.
fn write_run<T: Record>(path: &Path, records: impl Iterator<Item = io::Result<T>>) -> Result<u64> {
    let context = || format!("{}: cannot write sorted keys", path.display());
    let mut out = BufWriter::with_capacity(IO_BUFFER, File::create(path).with_context(context)?);
    let mut bytes = vec![0; T::BYTES];
    let mut count = 0;
    for record in records {
        record.with_context(context)?.encode(&mut bytes);
        out.write_all(&bytes).with_context(context)?;
        count += 1;
    }
    out.flush().with_context(context)?;
    Ok(count)
}

/// A sort's result: the buffer, or its runs merged.
pub(crate) enum Sorted<T: Record> {
    Memory(std::vec::IntoIter<T>),
    Merged(Merge<T>),
}

impl<T: Record> Iterator for Sorted<T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Sorted::Memory(records) => records.next().map(Ok),
            Sorted::Merged(merge) => merge.next(),
        }
    }
}

/// The runs merged: the smallest of their next records, again and again.
pub(crate) struct Merge<T: Record> {
    readers: Vec<(BufReader<File>, u64)>,
    next: BinaryHeap<Reverse<(T, usize)>>,
    bytes: Vec<u8>,
}

impl<T: Record> Merge<T> {
    fn new(runs: &[(PathBuf, u64)]) -> io::Result<Self> {
        let mut merge = Self {
            readers: Vec::with_capacity(runs.len()),
            next: BinaryHeap::with_capacity(runs.len()),
            bytes: vec![0; T::BYTES],
        };
        for (run, (path, count)) in runs.iter().enumerate() {
            let reader = BufReader::with_capacity(IO_BUFFER, File::open(path)?);
            merge.readers.push((reader, *count));
            merge.advance(run)?;
        }
        Ok(merge)
    }

    /// Reads run `run`'s next record, if it has one left.
    fn advance(&mut self, run: usize) -> io::Result<()> {
        let (reader, left) = &mut self.readers[run];
        if *left > 0 {
            *left -= 1;
            reader.read_exact(&mut self.bytes)?;
            self.next.push(Reverse((T::decode(&self.bytes), run)));
        }
        Ok(())
    }
}

impl<T: Record> Iterator for Merge<T> {
    type Item = io::Result<T>;

    fn next(&mut self) -> Option<Self::Item> {
        let Reverse((record, run)) = self.next.pop()?;
        Some(self.advance(run).map(|()| record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    struct Pair(u32, u8);

    impl Record for Pair {
        const BYTES: usize = 5;

        fn encode(&self, bytes: &mut [u8]) {
            bytes[..4].copy_from_slice(&self.0.to_le_bytes());
            bytes[4] = self.1;
        }

        fn decode(bytes: &[u8]) -> Self {
            Pair(u32::from_le_bytes(bytes[..4].try_into().unwrap()), bytes[4])
        }
    }

    /// Every record comes back, in order, with duplicates, whether the count
    /// fits the buffer, fills exactly a whole number of runs, or makes so
    /// many runs that they are merged on the way.
    #[test]
    fn sorts_in_memory_in_runs_and_in_merged_runs() {
        let dir = tempfile::tempdir().unwrap();
        let buffer = 8 * std::mem::size_of::<Pair>();
        for (case, count) in [0, 5, 8, 64, 67, 8 * MAX_RUNS as u32 * 3 + 3]
            .into_iter()
            .enumerate()
        {
            let records: Vec<Pair> = (0..count)
                .map(|i| Pair((i.wrapping_mul(2_654_435_761)) % 97, (i % 3) as u8))
                .collect();
            let mut sorter = Sorter::new(buffer, dir.path().join(case.to_string()));
            for &record in &records {
                sorter.push(record).unwrap();
            }
            let spilled = sorter.spilled_bytes();
            let sorted: Vec<Pair> = sorter.sorted().unwrap().map(Result::unwrap).collect();
            let mut expected = records.clone();
            expected.sort();
            assert_eq!(sorted, expected, "{count} records");
            match count > 8 {
                true => assert!(spilled >= count as u64 * 5, "{count}: {spilled}"),
                false => assert_eq!(spilled, 0, "{count}"),
            }
        }
    }
}
