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
//! Sorting is the only super-linear step; it runs on rayon over `(sortable reward bits,
//! outcome index)` pairs, a total order, so the result is the same for any thread count.

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

/// Below this many outcomes, a comparison sort; above, an LSD radix sort.
const RADIX_THRESHOLD: usize = 1 << 16;

const RADIX_BITS: u32 = 11;
const RADIX_BUCKETS: usize = 1 << RADIX_BITS;
const RADIX_PASSES: usize = 64usize.div_ceil(RADIX_BITS as usize);
/// Radix sort when at most this many of its passes are needed (tied or narrow-range
/// rewards); otherwise rayon's parallel comparison sort, which wins on 2 cores.
const RADIX_MAX_PASSES: usize = 3;

/// Sort `(key, index)` pairs by key, then index (the input is in index order).
///
/// Large inputs whose keys differ in few 11-bit digits (ties, narrow ranges) use a stable
/// LSD radix sort that skips every digit on which all keys agree; others use rayon's
/// parallel pdqsort. Both give the same total order, whatever the thread count.
fn sort_keyed(mut keyed: Vec<(u64, u32)>) -> Vec<(u64, u32)> {
    if keyed.len() >= RADIX_THRESHOLD {
        let hist = digit_histograms(&keyed);
        let n = keyed.len();
        let passes = hist.iter().filter(|h| !h.contains(&n)).count();
        if passes <= RADIX_MAX_PASSES {
            return radix_sort(keyed, &hist);
        }
    }
    keyed.par_sort_unstable();
    keyed
}

/// Histogram of every 11-bit digit of the keys, in one read.
fn digit_histograms(keyed: &[(u64, u32)]) -> Vec<[usize; RADIX_BUCKETS]> {
    let mut hist = vec![[0usize; RADIX_BUCKETS]; RADIX_PASSES];
    for &(k, _) in keyed {
        for (p, h) in hist.iter_mut().enumerate() {
            h[((k >> (p as u32 * RADIX_BITS)) as usize) & (RADIX_BUCKETS - 1)] += 1;
        }
    }
    hist
}

fn radix_sort(mut keyed: Vec<(u64, u32)>, hist: &[[usize; RADIX_BUCKETS]]) -> Vec<(u64, u32)> {
    let n = keyed.len();
    let mut buf: Vec<(u64, u32)> = vec![(0, 0); n];
    for (p, h) in hist.iter().enumerate() {
        if h.contains(&n) {
            continue; // every key has the same digit here
        }
        let mut offset = [0usize; RADIX_BUCKETS];
        let mut acc = 0;
        for (o, &c) in offset.iter_mut().zip(h.iter()) {
            *o = acc;
            acc += c;
        }
        let shift = p as u32 * RADIX_BITS;
        for &e in &keyed {
            let d = ((e.0 >> shift) as usize) & (RADIX_BUCKETS - 1);
            buf[offset[d]] = e;
            offset[d] += 1;
        }
        std::mem::swap(&mut keyed, &mut buf);
    }
    keyed
}

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
        let keyed: Vec<(u64, u32)> = rewards
            .par_iter()
            .enumerate()
            .map(|(i, &r)| (sortable_bits(r), i as u32))
            .collect();
        let keyed = sort_keyed(keyed);

        let mut reward = Vec::new();
        let mut mass = Vec::new();
        let mut level_of = vec![0u32; n];
        let mut i = 0;
        while i < n {
            let key = keyed[i].0;
            let level = reward.len() as u32;
            let mut m = NeumaierSum::default();
            let mut j = i;
            while j < n && keyed[j].0 == key {
                let idx = keyed[j].1 as usize;
                m.add(probs[idx]);
                level_of[idx] = level;
                j += 1;
            }
            reward.push(rewards[keyed[i].1 as usize] + 0.0);
            mass.push(m.value());
            i = j;
        }
        drop(keyed);
        let k = reward.len();
        let mut below = vec![0.0; k];
        let mut acc = NeumaierSum::default();
        for l in 0..k {
            below[l] = acc.value();
            acc.add(mass[l]);
        }
        let mut above = vec![0.0; k];
        let mut acc = NeumaierSum::default();
        for l in (0..k).rev() {
            above[l] = acc.value();
            acc.add(mass[l]);
        }
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
        let ratio: Vec<f64> = level_pmf
            .iter()
            .zip(&self.mass)
            .map(|(&q, &m)| if m > 0.0 { q / m } else { 0.0 })
            .collect();
        self.level_of
            .par_iter()
            .zip(probs.par_iter())
            .with_min_len(1 << 14)
            .map(|(&l, &p)| p * ratio[l as usize])
            .collect()
    }
}

/// Deterministic parallel sum of `f(l)` over `0..len`: fixed chunks, each summed
/// sequentially with compensation, merged in chunk order, so the bits of the result do not
/// depend on the number of threads.
pub(crate) fn chunked_sum<const K: usize>(
    len: usize,
    f: impl Fn(usize) -> [f64; K] + Sync,
) -> [f64; K] {
    const CHUNK: usize = 1 << 14;
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
            let hist = digit_histograms(&keyed);
            assert_eq!(radix_sort(keyed.clone(), &hist), expect);
            assert_eq!(sort_keyed(keyed), expect);
        }
        let zeros = [(sortable_bits(-0.0), 0), (sortable_bits(0.0), 1)];
        assert_eq!(zeros[0].0, zeros[1].0);
    }
}
