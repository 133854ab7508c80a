//! Outcomes grouped into reward levels, with the cumulative masses every order-statistic
//! formula needs.
//!
//! Best-of-n, worst-of-n, win rates and the tilt depend on an outcome only through its
//! reward level (the set of outcomes tied with it) and the reference mass above and below
//! that level. [`Levels`] sorts the outcomes once and keeps, per level:
//!
//! ```text
//! mass(L)  = p(T)            T = outcomes with reward r_L
//! below(L) = P_p(r < r_L)    summed from the lowest level up
//! above(L) = P_p(r > r_L)    summed from the highest level down
//! ```
//!
//! Both tails are summed *directly*, each from its own end, with compensated sums: the
//! upper tail of the best level is often 1e-12 or smaller, and `1 − F` computed from a CDF
//! near 1 would keep none of its digits, which ruins `F^n` for n = 10^15. So does every
//! later formula that needs `F = P(r ≤ r_L)`: it takes `below + mass` (accurate when F is
//! small) or `1 − above` through `log1p` (accurate when F is near 1), never a difference
//! of two numbers near 1.
//!
//! Sorting is the only super-linear step. Large inputs use a parallel stable LSD radix sort
//! of `(sortable reward bits, outcome index)` pairs (13-bit digits, digits on which all keys
//! agree skipped); the order is a total order, so the result is the same for any thread
//! count. Grouping then runs in parallel over fixed spans of sorted positions, each span
//! owning the levels that *start* in it, so every level mass is still one compensated sum
//! in index order, exactly as a sequential pass gives. The two tails run side by side.
//! At 10^7 outcomes these steps are dominated by memory: the large buffers are advised to
//! transparent huge pages (fewer page faults and TLB misses), and the random reads and
//! writes of the grouping pass are prefetched.

use crate::distribution::RewardDistribution;
use crate::error::{Result, TiltError};
use crate::numerics::NeumaierSum;
use rayon::prelude::*;

/// Outcomes of a [`RewardDistribution`] grouped by equal reward, in increasing reward order.
#[derive(Debug, Clone, PartialEq)]
pub struct Levels {
    reward: Vec<f64>,
    mass: Vec<f64>,
    below: Vec<f64>,
    above: Vec<f64>,
    level_of: Vec<u32>,
}

/// Map an `f64` to a `u64` whose unsigned order is the numeric order (−0.0 is first
/// folded into +0.0 so that the two zeros form one level).
#[inline]
fn sortable_bits(x: f64) -> u64 {
    let bits = (x + 0.0).to_bits();
    if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    }
}

/// Inverse of [`sortable_bits`] (on its image): the reward whose key is `k`.
#[inline]
fn from_sortable_bits(k: u64) -> f64 {
    if k >> 63 == 1 {
        f64::from_bits(k & !(1 << 63))
    } else {
        f64::from_bits(!k)
    }
}

/// A vector with room for `len` elements, whose pages the kernel is asked to back with
/// transparent huge pages (Linux; elsewhere a plain allocation). Large buffers here are
/// written once in random order (radix scatter, `level_of`): with 4 KiB pages, page faults
/// and TLB misses cost about as much as the work itself.
pub(crate) fn huge_capacity<T>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    advise_huge_pages(&mut v);
    v
}

/// `vec![0.0; len]` (fresh zero pages, untouched), advised like [`huge_capacity`].
pub(crate) fn huge_zeros(len: usize) -> Vec<f64> {
    let mut v = vec![0.0; len];
    advise_huge_pages(&mut v);
    v
}

#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(v: &mut Vec<T>) {
    const MIN_BYTES: usize = 4 << 20;
    const PAGE: usize = 4096;
    const MADV_HUGEPAGE: std::ffi::c_int = 14;
    extern "C" {
        fn madvise(
            addr: *mut std::ffi::c_void,
            len: usize,
            advice: std::ffi::c_int,
        ) -> std::ffi::c_int;
    }
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < MIN_BYTES {
        return;
    }
    let start = (v.as_mut_ptr() as usize).next_multiple_of(PAGE);
    let end = (v.as_mut_ptr() as usize + bytes) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside this vector's own allocation and MADV_HUGEPAGE
        // only changes how the kernel backs it (contents are kept). It is advice: a
        // failure (no THP support) leaves ordinary pages, so the result is ignored.
        unsafe {
            madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_v: &mut Vec<T>) {}

/// Below this many outcomes, a comparison sort; above, a parallel LSD radix sort.
const RADIX_THRESHOLD: usize = 1 << 16;

const RADIX_BITS: u32 = 13;
const RADIX_BUCKETS: usize = 1 << RADIX_BITS;
const RADIX_PASSES: usize = 64usize.div_ceil(RADIX_BITS as usize);

/// A raw pointer that parallel tasks write through at disjoint positions.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every user writes through it at positions no other task touches, and the
// owner of the buffer waits for all tasks (rayon scopes) before reading it.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}
impl<T> SharedMut<T> {
    /// # Safety
    /// `i` is in bounds and written by no other task.
    #[inline]
    unsafe fn write(self, i: usize, v: T) {
        unsafe { self.0.add(i).write(v) }
    }
}

/// Sort `(key, index)` pairs by key, then index (the input is in index order).
///
/// Large inputs use a parallel stable LSD radix sort on `RADIX_BITS`-bit (13-bit) digits
/// that skips every digit on which all keys agree (tied or narrow-range rewards need few
/// passes). A stable sort has exactly one result, so neither the thread count nor the
/// chunking changes it.
fn sort_keyed(mut keyed: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    if keyed.len() < RADIX_THRESHOLD {
        keyed.par_sort_unstable();
        return keyed;
    }
    radix_sort(keyed)
}

/// Per-chunk histograms of the digits `digits` of the keys.
fn chunk_histograms(
    keyed: &[(u64, u32)],
    chunk: usize,
    digits: &[usize],
) -> Vec<Vec<[usize; RADIX_BUCKETS]>> {
    keyed
        .par_chunks(chunk)
        .map(|c| {
            let mut hist = vec![[0usize; RADIX_BUCKETS]; digits.len()];
            for &(k, _) in c {
                for (h, &p) in hist.iter_mut().zip(digits) {
                    h[((k >> (p as u32 * RADIX_BITS)) as usize) & (RADIX_BUCKETS - 1)] += 1;
                }
            }
            hist
        })
        .collect()
}

fn radix_sort(mut keyed: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    let n = keyed.len();
    // Chunks only split the work: a stable sort's output does not depend on them.
    let chunk = n.div_ceil(rayon::current_num_threads().max(1)).max(1 << 12);
    let all: Vec<usize> = (0..RADIX_PASSES).collect();
    let first = chunk_histograms(&keyed, chunk, &all);
    let mut total = vec![[0usize; RADIX_BUCKETS]; RADIX_PASSES];
    for h in &first {
        for (t, c) in total.iter_mut().zip(h) {
            for (a, b) in t.iter_mut().zip(c) {
                *a += b;
            }
        }
    }
    // Digits on which all keys agree need no pass.
    let passes: Vec<usize> = (0..RADIX_PASSES)
        .filter(|&p| !total[p].contains(&n))
        .collect();
    let mut buf: Vec<(u64, u32)> = huge_capacity(n);
    for (i, &p) in passes.iter().enumerate() {
        let hist: Vec<[usize; RADIX_BUCKETS]> = if i == 0 {
            first.iter().map(|h| h[p]).collect()
        } else {
            chunk_histograms(&keyed, chunk, &[p])
                .into_iter()
                .map(|h| h[0])
                .collect()
        };
        // Chunk c writes bucket b from offset[c][b]: buckets in order, chunks in order
        // within a bucket (stability).
        let mut offset = vec![[0usize; RADIX_BUCKETS]; hist.len()];
        let mut acc = 0;
        for b in 0..RADIX_BUCKETS {
            for (o, h) in offset.iter_mut().zip(&hist) {
                o[b] = acc;
                acc += h[b];
            }
        }
        let shift = p as u32 * RADIX_BITS;
        let dst = SharedMut(buf.as_mut_ptr());
        keyed
            .par_chunks(chunk)
            .zip(offset.par_iter_mut())
            .for_each(|(c, off)| {
                for &e in c {
                    let d = ((e.0 >> shift) as usize) & (RADIX_BUCKETS - 1);
                    // SAFETY: offsets partition 0..n, each slot is written once.
                    unsafe { dst.write(off[d], e) };
                    off[d] += 1;
                }
            });
        // SAFETY: the scatter above wrote all n slots.
        unsafe { buf.set_len(n) };
        std::mem::swap(&mut keyed, &mut buf);
        buf.clear();
    }
    keyed
}

/// How far ahead of the grouping loop the outcome reads and writes are prefetched (they
/// land in random order when rewards are distinct).
const PREFETCH_AHEAD: usize = 32;

/// Hint the CPU to fetch the cache line of `p` (no effect on results; a no-op off x86-64).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Positions per grouping task (each task handles the levels that *start* in its span).
const GROUP_CHUNK: usize = 1 << 16;

impl Levels {
    /// Group the outcomes of `dist` into reward levels.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] when there are more than `u32::MAX` outcomes.
    ///
    /// ```
    /// use tilt_core::{levels::Levels, RewardDistribution};
    /// let d = RewardDistribution::new(vec![0.2, 0.3, 0.1, 0.4], vec![0.0, 1.0, 1.0, 2.0]).unwrap();
    /// let lv = Levels::new(&d).unwrap();
    /// assert_eq!(lv.rewards(), &[0.0, 1.0, 2.0]);
    /// assert!((lv.masses()[1] - 0.4).abs() < 1e-15);
    /// assert!((lv.above()[0] - 0.8).abs() < 1e-15);
    /// assert_eq!(lv.level_of(), &[0, 1, 1, 2]);
    /// ```
    pub fn new(dist: &RewardDistribution) -> Result<Self> {
        Self::from_slices(dist.probs(), dist.rewards())
    }

    /// Like [`Levels::new`] on already validated slices (finite rewards, pmf `probs`).
    pub(crate) fn from_slices(probs: &[f64], rewards: &[f64]) -> Result<Self> {
        let n = rewards.len();
        if n > u32::MAX as usize {
            return Err(TiltError::invalid(
                "rewards",
                format!("{n} outcomes; at most {} are supported", u32::MAX),
            ));
        }
        let mut keyed: Vec<(u64, u32)> = huge_capacity(n);
        keyed.par_extend(
            rewards
                .par_iter()
                .enumerate()
                .with_min_len(1 << 14)
                .map(|(i, &r)| (sortable_bits(r), i as u32)),
        );
        let keyed = sort_keyed(keyed);

        // Levels start where the key changes. Each fixed span of positions counts its
        // starts; the prefix sums give every span its first level index.
        let is_start = |i: usize| i == 0 || keyed[i].0 != keyed[i - 1].0;
        let spans = n.div_ceil(GROUP_CHUNK);
        let starts_per_span: Vec<usize> = (0..spans)
            .into_par_iter()
            .map(|s| {
                (s * GROUP_CHUNK..((s + 1) * GROUP_CHUNK).min(n))
                    .filter(|&i| is_start(i))
                    .count()
            })
            .collect();
        let k: usize = starts_per_span.iter().sum();
        let mut reward = huge_zeros(k);
        let mut mass = huge_zeros(k);
        let mut level_of: Vec<u32> = huge_capacity(n);
        {
            // Each span owns the levels that start in it: split the outputs accordingly.
            let mut tasks = Vec::with_capacity(spans);
            let (mut rw, mut ms) = (&mut reward[..], &mut mass[..]);
            let mut first_level = 0;
            for (s, &count) in starts_per_span.iter().enumerate() {
                let (r_here, r_rest) = rw.split_at_mut(count);
                let (m_here, m_rest) = ms.split_at_mut(count);
                tasks.push((s, first_level, r_here, m_here));
                rw = r_rest;
                ms = m_rest;
                first_level += count;
            }
            let level_dst = SharedMut(level_of.as_mut_ptr());
            let keyed = &keyed;
            tasks
                .into_par_iter()
                .for_each(|(s, first_level, r_out, m_out)| {
                    let end_span = ((s + 1) * GROUP_CHUNK).min(n);
                    let mut i = s * GROUP_CHUNK;
                    while i < end_span && !is_start(i) {
                        i += 1; // these positions belong to a level started earlier
                    }
                    for (l, (r_slot, m_slot)) in r_out.iter_mut().zip(m_out.iter_mut()).enumerate()
                    {
                        let key = keyed[i].0;
                        let level = (first_level + l) as u32;
                        let mut m = NeumaierSum::default();
                        while i < n && keyed[i].0 == key {
                            if let Some(&(_, ahead)) = keyed.get(i + PREFETCH_AHEAD) {
                                prefetch(probs.as_ptr().wrapping_add(ahead as usize));
                                prefetch(level_dst.0.wrapping_add(ahead as usize));
                            }
                            let idx = keyed[i].1 as usize;
                            m.add(probs[idx]);
                            // SAFETY: indices are a permutation of 0..n and each position
                            // of `keyed` is visited by exactly one task.
                            unsafe { level_dst.write(idx, level) };
                            i += 1;
                        }
                        *r_slot = from_sortable_bits(key);
                        *m_slot = m.value();
                    }
                });
            // SAFETY: every outcome index was written once above.
            unsafe { level_of.set_len(n) };
        }
        drop(keyed);
        // Both tails sequentially (compensated), each from its own end, side by side.
        let (below, above) = rayon::join(
            || {
                let mut below = huge_zeros(k);
                let mut acc = NeumaierSum::default();
                for (b, &m) in below.iter_mut().zip(&mass) {
                    *b = acc.value();
                    acc.add(m);
                }
                below
            },
            || {
                let mut above = huge_zeros(k);
                let mut acc = NeumaierSum::default();
                for (a, &m) in above.iter_mut().zip(&mass).rev() {
                    *a = acc.value();
                    acc.add(m);
                }
                above
            },
        );
        Ok(Self {
            reward,
            mass,
            below,
            above,
            level_of,
        })
    }

    /// Number of distinct reward levels.
    pub fn len(&self) -> usize {
        self.reward.len()
    }

    /// Always false: there is at least one level.
    pub fn is_empty(&self) -> bool {
        self.reward.is_empty()
    }

    /// Number of outcomes grouped.
    pub fn num_outcomes(&self) -> usize {
        self.level_of.len()
    }

    /// The distinct rewards, increasing.
    pub fn rewards(&self) -> &[f64] {
        &self.reward
    }

    /// Reference mass of each level.
    pub fn masses(&self) -> &[f64] {
        &self.mass
    }

    /// `P_p(r < r_L)` per level, summed from below.
    pub fn below(&self) -> &[f64] {
        &self.below
    }

    /// `P_p(r > r_L)` per level, summed from above (never as `1 − F`).
    pub fn above(&self) -> &[f64] {
        &self.above
    }

    /// The level of each outcome, in input order.
    pub fn level_of(&self) -> &[u32] {
        &self.level_of
    }

    /// Index of the highest level with positive reference mass (the argmax set on the
    /// support of p).
    pub fn top_level(&self) -> usize {
        (0..self.len())
            .rev()
            .find(|&l| self.mass[l] > 0.0)
            .unwrap_or(self.len() - 1)
    }

    /// Index of the lowest level with positive reference mass.
    pub fn bottom_level(&self) -> usize {
        (0..self.len()).find(|&l| self.mass[l] > 0.0).unwrap_or(0)
    }

    /// Sum a per-outcome pmf into per-level masses.
    ///
    /// # Errors
    /// [`TiltError::InvalidInput`] naming `input` if the length differs from the number of
    /// outcomes.
    pub fn level_masses_of(&self, input: &str, pmf: &[f64]) -> Result<Vec<f64>> {
        if pmf.len() != self.num_outcomes() {
            return Err(TiltError::invalid(
                input,
                format!("{} entries for {} outcomes", pmf.len(), self.num_outcomes()),
            ));
        }
        let mut sums = vec![NeumaierSum::default(); self.len()];
        for (&l, &q) in self.level_of.iter().zip(pmf) {
            sums[l as usize].add(q);
        }
        Ok(sums.iter().map(NeumaierSum::value).collect())
    }

    /// Spread per-level masses back onto outcomes in input order, in proportion to the
    /// reference probabilities within each level (the uniform-among-tied-draws rule):
    /// `π(y) = p(y)/p(T(y)) · Π(T(y))`.
    pub fn spread_to_outcomes(&self, probs: &[f64], level_pmf: &[f64]) -> Vec<f64> {
        // Plain pages here: measured, huge pages made this phase slower.
        let ratio: Vec<f64> = level_pmf
            .par_iter()
            .zip(self.mass.par_iter())
            .with_min_len(1 << 14)
            .map(|(&q, &m)| if m > 0.0 { q / m } else { 0.0 })
            .collect();
        let mut pmf = vec![0.0; probs.len()];
        let level_of = &self.level_of;
        pmf.par_chunks_mut(1 << 14)
            .zip(probs.par_chunks(1 << 14))
            .enumerate()
            .for_each(|(c, (out, p))| {
                let base = c << 14;
                for (j, (o, &p)) in out.iter_mut().zip(p).enumerate() {
                    if let Some(&ahead) = level_of.get(base + j + PREFETCH_AHEAD) {
                        prefetch(ratio.as_ptr().wrapping_add(ahead as usize));
                    }
                    *o = p * ratio[level_of[base + j] as usize];
                }
            });
        pmf
    }
}

/// Terms per chunk of the deterministic parallel sums ([`chunked_sum`] and the fused
/// best-of-n pass, which must chunk alike to give the same bits).
pub(crate) const SUM_CHUNK: usize = 1 << 14;

/// Deterministic parallel sum of `f(l)` over `0..len`: fixed chunks, each summed
/// sequentially with compensation, merged in chunk order, so the bits of the result do not
/// depend on the number of threads.
pub(crate) fn chunked_sum<const K: usize>(
    len: usize,
    f: impl Fn(usize) -> [f64; K] + Sync,
) -> [f64; K] {
    const CHUNK: usize = SUM_CHUNK;
    let chunks = len.div_ceil(CHUNK);
    let partial: Vec<[NeumaierSum; K]> = (0..chunks)
        .into_par_iter()
        .map(|c| {
            let mut s = [NeumaierSum::default(); K];
            for l in c * CHUNK..((c + 1) * CHUNK).min(len) {
                let v = f(l);
                for k in 0..K {
                    s[k].add(v[k]);
                }
            }
            s
        })
        .collect();
    let mut total = [NeumaierSum::default(); K];
    for s in partial {
        for k in 0..K {
            total[k].merge(s[k]);
        }
    }
    total.map(|s| s.value())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel grouping (spans of `GROUP_CHUNK` positions, levels crossing spans)
    /// against a direct construction: a sorted map from reward to outcomes in index order.
    #[test]
    fn parallel_grouping_matches_a_sorted_map() {
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = 3 * GROUP_CHUNK + 123;
        for distinct in [1.0, 7.0, 5000.0, 0.0] {
            let rewards: Vec<f64> = (0..n)
                .map(|i| match distinct {
                    0.0 => next() - 0.5, // all distinct
                    1.0 if i % 2 == 0 => -0.0,
                    d => (next() * d).floor() - d / 2.0,
                })
                .collect();
            let raw: Vec<f64> = (0..n).map(|_| next() + 1e-3).collect();
            let total: f64 = raw.iter().sum();
            let probs: Vec<f64> = raw.iter().map(|p| p / total).collect();
            let lv = Levels::from_slices(&probs, &rewards).unwrap();
            let mut by_key = std::collections::BTreeMap::<u64, Vec<usize>>::new();
            for (i, &r) in rewards.iter().enumerate() {
                by_key.entry(sortable_bits(r)).or_default().push(i);
            }
            assert_eq!(lv.len(), by_key.len());
            for (l, (&key, members)) in by_key.iter().enumerate() {
                assert_eq!(lv.rewards()[l].to_bits(), from_sortable_bits(key).to_bits());
                let mut m = NeumaierSum::default();
                for &i in members {
                    m.add(probs[i]);
                    assert_eq!(lv.level_of()[i] as usize, l);
                }
                assert_eq!(lv.masses()[l].to_bits(), m.value().to_bits());
            }
        }
    }

    #[test]
    fn radix_sort_equals_comparison_sort_with_ties_and_signs() {
        let mut state = 3u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 11
        };
        for distinct in [3u64, 1000, u64::MAX] {
            let keyed: Vec<(u64, u32)> = (0..200_000u32)
                .map(|i| {
                    let v = next() % distinct;
                    let r = (v as f64 - (distinct.min(1 << 40) as f64) / 2.0) * 0.37;
                    (sortable_bits(r), i)
                })
                .collect();
            let mut expect = keyed.clone();
            expect.sort_unstable();
            assert_eq!(radix_sort(keyed.clone()), expect);
            assert_eq!(sort_keyed(keyed), expect);
        }
        let zeros = [(sortable_bits(-0.0), 0), (sortable_bits(0.0), 1)];
        assert_eq!(zeros[0].0, zeros[1].0);
        for x in [-3.5f64, -0.0, 0.0, 1e-300, -f64::MAX, f64::MAX, 7.25] {
            assert_eq!(
                from_sortable_bits(sortable_bits(x)).to_bits(),
                (x + 0.0).to_bits()
            );
        }
    }
}
