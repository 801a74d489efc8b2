//! Packing and padding of any token documents into any block size: every
//! token is in a block or counted as dropped, and rows have the block size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pt_data::packing::{pack, pad_each};

fuzz_target!(|input: (u8, Vec<Vec<u16>>)| {
    let (size, documents) = input;
    let block_size = usize::from(size % 64) + 1;
    let documents: Vec<Vec<u32>> = documents
        .into_iter()
        .map(|d| d.into_iter().map(u32::from).collect())
        .collect();
    let total: u64 = documents.iter().map(|d| d.len() as u64).sum();

    let (blocks, dropped) = pack(&documents, block_size);
    assert_eq!((blocks.len() * block_size) as u64 + dropped, total);
    let flat: Vec<u32> = documents.concat();
    for i in 0..blocks.len() {
        assert_eq!(*blocks.row(i), flat[i * block_size..(i + 1) * block_size]);
    }

    let (padded, truncated) = pad_each(&documents, block_size, 3);
    let kept: u64 = (0..padded.len())
        .map(|i| padded.labels(i).iter().filter(|&&l| l >= 0).count() as u64)
        .sum();
    assert!(kept + truncated <= total);
    for i in 0..padded.len() {
        assert_eq!(padded.row(i).len(), block_size);
    }
});
