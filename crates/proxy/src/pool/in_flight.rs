//! In-flight counts of every backend in the process, stored as columns: one column per
//! worker shard, a row ([`Row`]) per backend, held by the backend for its life.
//!
//! Why columns: least connections and its kin read every backend's count on every pick.
//! With the counts inside each [`Backend`](super::Backend) (one cache line per shard per
//! backend, each backend its own heap block) a pick at 1,000 backends touched ~4,000
//! scattered lines, measured at ~3.5 µs per request (`bench/many_backends.py`). Here the
//! same read is [`SHARDS`] sequential runs of 4 bytes per backend, ~250 lines the
//! prefetcher sees coming; a worker still writes only its own shard's column.
//!
//! Rows are handed out lowest-first and reused when a backend is dropped (its last
//! in-flight guard gone, so every shard's count is back to zero), which keeps a pool's
//! rows dense. Segments are allocated as needed and never freed: their number is bounded
//! by the most backends ever alive at once (16 KiB per 1,024).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Copies of a backend's per-request figures: more than the workers of a typical box, few
/// enough that readers summing them stay cheap. One copy written by every worker moves its
/// cache line between cores on every request: five atomic writes per request, measured at
/// 0.2–0.3 µs of user time per request with two workers.
pub(super) const SHARDS: usize = 4;

/// Threads given a shard so far: while fewer than [`SHARDS`] (one or two workers), readers
/// sum only the columns that can hold a count.
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// The shard of the calling thread: threads are numbered in the order they first record,
/// so the workers of a server get different shards.
pub(super) fn shard() -> usize {
    thread_local! {
        static SHARD: usize = THREADS.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// Columns that may hold counts: a thread takes its shard before it counts anything. A
/// reader may see a new thread's count before its shard (relaxed): the pick then misses
/// that thread's few requests once, which a load figure can afford; a drain cannot, and
/// reads every shard ([`Cell::sum`]).
#[inline]
fn shards_in_use() -> usize {
    THREADS.load(Ordering::Relaxed).min(SHARDS)
}

/// Rows per segment.
const SEGMENT: usize = 1024;

/// One shard's counts for a segment's rows, on cache lines of its own.
#[repr(align(64))]
struct Column([AtomicU32; SEGMENT]);

/// [`SEGMENT`] rows, a column per shard.
struct Segment([Column; SHARDS]);

impl Segment {
    fn new() -> Self {
        Segment(std::array::from_fn(|_| {
            Column(std::array::from_fn(|_| AtomicU32::new(0)))
        }))
    }
}

/// Which rows are taken: every segment so far, the free rows below `next`, lowest first.
struct Rows {
    segments: Vec<&'static Segment>,
    free: BinaryHeap<Reverse<u32>>,
    next: u32,
}

/// The process's rows (tests make their own, so that they see only their own reuse).
static ROWS: Mutex<Rows> = Rows::new();

impl Rows {
    const fn new() -> Mutex<Rows> {
        Mutex::new(Rows {
            segments: Vec::new(),
            free: BinaryHeap::new(),
            next: 0,
        })
    }
}

fn lock(rows: &Mutex<Rows>) -> std::sync::MutexGuard<'_, Rows> {
    rows.lock().unwrap_or_else(|e| e.into_inner())
}

/// A backend's in-flight counts, one per shard; its row goes back to the free list on drop.
#[derive(Clone, Copy)]
pub(super) struct Cell {
    segment: &'static Segment,
    index: u16,
}

impl Cell {
    /// This row's count, summed over every shard: what a drain waits on to reach zero, so
    /// it never relies on [`shards_in_use`] being fresh (four loads, one backend).
    #[inline]
    pub(super) fn sum(self) -> u32 {
        self.sum_of(SHARDS)
    }

    /// The count in the first `shards` shards (see [`shards_in_use`]), for readers of many
    /// rows that look the number up once.
    #[inline]
    pub(super) fn sum_of(self, shards: usize) -> u32 {
        let i = usize::from(self.index);
        self.segment.0[..shards]
            .iter()
            .map(|column| column.0[i].load(Ordering::Relaxed))
            .fold(0u32, u32::wrapping_add)
    }

    #[inline]
    fn counter(self, shard: usize) -> &'static AtomicU32 {
        &self.segment.0[shard].0[usize::from(self.index)]
    }

    /// One more in flight, counted in `shard`.
    #[inline]
    pub(super) fn increment(self, shard: usize) {
        self.counter(shard).fetch_add(1, Ordering::Relaxed);
    }

    /// One fewer, in the shard [`Cell::increment`] counted it in.
    #[inline]
    pub(super) fn decrement(self, shard: usize) {
        self.counter(shard).fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pool's rows in pool order, kept as runs of consecutive rows of one segment, found once
/// per snapshot. Rows are handed out lowest first, so a pool built at once is one run per
/// segment, and reading its column is a sequential copy per shard: at 1,000 backends that
/// measured ~1 µs per pick as a walk cell by cell (an indirection and a shard loop each).
pub(super) struct PoolRows {
    runs: Vec<Run>,
    len: usize,
}

/// Rows `first..first + len` of one segment.
struct Run {
    segment: &'static Segment,
    first: u16,
    len: u16,
}

impl PoolRows {
    /// The rows of `cells`, in that order.
    pub(super) fn new(cells: impl IntoIterator<Item = Cell>) -> Self {
        let mut runs: Vec<Run> = Vec::new();
        let mut len = 0;
        for cell in cells {
            len += 1;
            if let Some(run) = runs.last_mut()
                && std::ptr::eq(run.segment, cell.segment)
                && u32::from(run.first) + u32::from(run.len) == u32::from(cell.index)
            {
                run.len += 1;
            } else {
                runs.push(Run {
                    segment: cell.segment,
                    first: cell.index,
                    len: 1,
                });
            }
        }
        PoolRows { runs, len }
    }

    /// Every row's count, in order, appended to `out`.
    pub(super) fn column(&self, out: &mut Vec<u32>) {
        let start = out.len();
        out.resize(start + self.len, 0);
        self.column_prefix(&mut out[start..]);
    }

    /// As [`PoolRows::column`], into the first `out.len()` slots (the rest untouched).
    pub(super) fn column_prefix(&self, out: &mut [u32]) {
        let shards = shards_in_use();
        let mut out = out;
        for run in &self.runs {
            if out.is_empty() {
                break;
            }
            let n = usize::from(run.len).min(out.len());
            let (slots, rest) = std::mem::take(&mut out).split_at_mut(n);
            let rows = usize::from(run.first)..usize::from(run.first) + slots.len();
            slots.fill(0);
            for column in &run.segment.0[..shards] {
                for (slot, count) in slots.iter_mut().zip(&column.0[rows.clone()]) {
                    *slot = slot.wrapping_add(count.load(Ordering::Relaxed));
                }
            }
            out = rest;
        }
    }
}

/// A row held for one backend's life.
pub(super) struct Row {
    cell: Cell,
    number: u32,
    from: &'static Mutex<Rows>,
}

impl Row {
    /// The lowest free row (zero in every shard).
    pub(super) fn take() -> Self {
        Self::take_from(&ROWS)
    }

    fn take_from(from: &'static Mutex<Rows>) -> Self {
        let mut rows = lock(from);
        let number = match rows.free.pop() {
            Some(Reverse(n)) => n,
            None => {
                let n = rows.next;
                rows.next += 1;
                n
            }
        };
        let segment = number as usize / SEGMENT;
        while rows.segments.len() <= segment {
            // Leaked on purpose: cells are `'static` so the hot path holds no lock and
            // no reference count; the rows are reused, so this is bounded.
            rows.segments.push(Box::leak(Box::new(Segment::new())));
        }
        Row {
            cell: Cell {
                segment: rows.segments[segment],
                index: (number as usize % SEGMENT) as u16,
            },
            number,
            from,
        }
    }

    /// The counts.
    pub(super) fn cell(&self) -> Cell {
        self.cell
    }
}

impl Drop for Row {
    fn drop(&mut self) {
        // Every guard that counted here held the backend, so all shards are back at zero;
        // reset anyway so a miscount can never leak into the next backend.
        for shard in 0..SHARDS {
            self.cell.counter(shard).store(0, Ordering::Relaxed);
        }
        lock(self.from).free.push(Reverse(self.number));
    }
}

impl std::fmt::Debug for Row {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Row({}, in flight {})", self.number, self.cell.sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The tests count in shards of their choosing, not their thread's: they sum all four.

    fn own_rows() -> &'static Mutex<Rows> {
        Box::leak(Box::new(Rows::new()))
    }

    #[test]
    fn rows_count_per_shard_and_are_reused_lowest_first_and_clean() {
        let rows = own_rows();
        let a = Row::take_from(rows);
        let b = Row::take_from(rows);
        let c = Row::take_from(rows);
        assert_eq!((a.number, b.number, c.number), (0, 1, 2));
        a.cell().increment(0);
        a.cell().increment(3);
        b.cell().increment(1);
        assert_eq!((a.cell().sum_of(SHARDS), b.cell().sum_of(SHARDS)), (2, 1));
        a.cell().decrement(3);
        assert_eq!(a.cell().sum_of(SHARDS), 1);
        // A miscount left behind (a count never decremented) must not reach the next owner.
        drop(c);
        drop(a);
        let again = Row::take_from(rows);
        assert_eq!(again.number, 0, "the lowest free row first");
        assert_eq!(
            again.cell().sum_of(SHARDS),
            0,
            "a reused row starts at zero"
        );
        let (next, after) = (Row::take_from(rows), Row::take_from(rows));
        assert_eq!((next.number, after.number), (2, 3));
        assert_eq!(b.cell().sum_of(SHARDS), 1);
    }

    #[test]
    fn readers_sum_the_shards_of_threads_that_count() {
        let row = Row::take_from(own_rows());
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let cell = row.cell();
                std::thread::spawn(move || cell.increment(shard()))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(shards_in_use(), SHARDS, "six threads take every shard");
        assert_eq!(row.cell().sum(), 6);
        let mut column = Vec::new();
        PoolRows::new([row.cell(), row.cell()]).column(&mut column);
        assert_eq!(column, [6, 6]);
    }

    #[test]
    fn pool_columns_follow_the_pool_order_across_runs_and_segments() {
        // Every shard in use, so the readers sum all four (the count only ever grows).
        for t in (0..SHARDS)
            .map(|_| std::thread::spawn(shard))
            .collect::<Vec<_>>()
        {
            t.join().unwrap();
        }
        let from = own_rows();
        let rows: Vec<Row> = (0..SEGMENT + 10).map(|_| Row::take_from(from)).collect();
        for (i, r) in rows.iter().enumerate() {
            for k in 0..i % 5 {
                r.cell().increment((i + k) % SHARDS);
            }
        }
        // A pool in an order of its own: a stretch across the segment boundary, one row
        // twice, a reversed stretch, a gap.
        let order: Vec<usize> = (SEGMENT - 3..SEGMENT + 4)
            .chain([7, 7])
            .chain((0..5).rev())
            .chain(10..20)
            .collect();
        let pool = PoolRows::new(order.iter().map(|&i| rows[i].cell()));
        let want: Vec<u32> = order.iter().map(|&i| (i % 5) as u32).collect();
        let mut column = vec![99];
        pool.column(&mut column);
        assert_eq!((column[0], &column[1..]), (99, &want[..]));
        let mut prefix = vec![0; 9];
        pool.column_prefix(&mut prefix);
        assert_eq!(prefix, want[..9]);
        let mut longer = vec![77; want.len() + 2];
        pool.column_prefix(&mut longer);
        assert_eq!(
            (&longer[..want.len()], &longer[want.len()..]),
            (&want[..], &[77, 77][..])
        );
    }

    #[test]
    fn rows_beyond_one_segment_get_their_own_counters() {
        let from = own_rows();
        let rows: Vec<Row> = (0..SEGMENT + 10).map(|_| Row::take_from(from)).collect();
        assert_eq!(lock(from).segments.len(), 2);
        for (i, r) in rows.iter().enumerate() {
            for _ in 0..i % 3 {
                r.cell().increment(i % SHARDS);
            }
        }
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.cell().sum_of(SHARDS), (i % 3) as u32, "row {}", r.number);
        }
    }
}
