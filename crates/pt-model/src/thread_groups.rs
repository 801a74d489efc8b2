//! A batch's rows split over groups of the CPU's threads, each group
//! running its rows' whole pass by itself. Every op of a pass is split over
//! all threads otherwise, and each op then ends in a join where the threads
//! wait for one another: on two cores evaluation ran at 1.67 times its
//! one-thread rate, not twice. Rows that need nothing from one another (an
//! evaluation batch's) lose nothing by being computed apart.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// `pass(group_rows, groups)` of each group of `rows` (contiguous, in
/// order) in its own thread pool, the current pool's threads shared out
/// among the groups: as many groups as rows or threads, whichever is fewer
/// (`groups`, which share whatever memory budget `pass` has). With one group
/// (one row or one thread) `pass` runs here on all of them.
pub(crate) fn in_thread_groups<T: Send>(
    rows: usize,
    pass: impl Fn(Range<usize>, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let threads = rayon::current_num_threads();
    let groups = rows.min(threads);
    if groups <= 1 {
        return Ok(vec![pass(0..rows, 1)?]);
    }
    let pools = pools(groups, threads)?;
    let pass = &pass;
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..groups)
            .map(|group| {
                let (pool, rows) = (&pools[group], share(group, groups, rows));
                scope.spawn(move || pool.install(|| pass(rows, groups)))
            })
            .collect();
        running
            .into_iter()
            .map(|group| {
                group
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// Group `group`'s share of `count` items (rows or threads) split over
/// `groups`: contiguous, the first groups taking one more where it does not
/// divide.
fn share(group: usize, groups: usize, count: usize) -> Range<usize> {
    let start = |g: usize| g * count / groups;
    start(group)..start(group + 1)
}

/// Each split made so far, `(groups, threads)`, with its pools.
type Splits = Vec<((usize, usize), Arc<Vec<ThreadPool>>)>;

/// The pools of `groups` groups over `threads` threads, made once for each
/// such split (a pool's threads live as long as the process).
fn pools(groups: usize, threads: usize) -> Result<Arc<Vec<ThreadPool>>> {
    static MADE: Mutex<Splits> = Mutex::new(Vec::new());
    let mut made = MADE.lock().expect("not poisoned");
    if let Some((_, pools)) = made.iter().find(|(split, _)| *split == (groups, threads)) {
        return Ok(pools.clone());
    }
    let pools = (0..groups)
        .map(|group| {
            ThreadPoolBuilder::new()
                .num_threads(share(group, groups, threads).len())
                .thread_name(move |thread| format!("pt-rows-{group}.{thread}"))
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pools = Arc::new(pools);
    made.push(((groups, threads), pools.clone()));
    Ok(pools)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_item_once_in_order() {
        for (groups, count) in [(2, 4), (3, 7), (4, 4), (5, 16)] {
            let shares: Vec<Range<usize>> = (0..groups).map(|g| share(g, groups, count)).collect();
            assert_eq!(shares.first().unwrap().start, 0);
            assert_eq!(shares.last().unwrap().end, count);
            assert!(shares.windows(2).all(|pair| pair[0].end == pair[1].start));
            assert!(shares.iter().all(|share| share.len() >= count / groups));
        }
    }

    #[test]
    fn each_group_runs_its_rows_on_its_own_threads() {
        let pool = ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let groups = pool
            .install(|| in_thread_groups(7, |rows, _| Ok((rows, rayon::current_num_threads()))))
            .unwrap();
        let rows: Vec<Range<usize>> = groups.iter().map(|(rows, _)| rows.clone()).collect();
        assert_eq!(rows, [0..2, 2..4, 4..7]);
        assert!(groups.iter().all(|&(_, threads)| threads == 1));
        // Fewer rows than threads: a group per row, the threads shared out.
        let pool = ThreadPoolBuilder::new().num_threads(5).build().unwrap();
        let threads: Vec<(usize, usize)> = pool
            .install(|| in_thread_groups(2, |_, groups| Ok((groups, rayon::current_num_threads()))))
            .unwrap();
        assert_eq!(threads, [(2, 2), (2, 3)]);
    }
}
