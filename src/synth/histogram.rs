//! Count histograms taken from the seed, optionally released through the
//! Laplace mechanism, and sampled by the detail generator.
//!
//! Differential privacy: every count is of *reports*, with a value counted at
//! most once per report, so adding or removing one report changes any single
//! count by at most 1 (sensitivity 1 per bin). Each count gets Laplace noise
//! of scale `1 / epsilon`, and noisy counts below a threshold are dropped. A
//! value seen in one report survives with probability `exp(-(t - 1) * epsilon)
//! / 2` for threshold `t` (about 0.18 at epsilon 1 and the default t = 2),
//! so rare values are thinned out, not removed. Only the keys seen
//! in the seed are released (a thresholded histogram over an open domain),
//! which is (epsilon, delta)-private per bin with delta shrinking as the
//! threshold grows. A report that contributes k distinct values to one
//! histogram spends k * epsilon there, and the histograms compose: one report
//! appears in the scene histogram and in each attribute and value histogram
//! (per scene and pooled), so the budget a whole report spends is many times
//! epsilon. Template text is copied from seed sentences and is not covered
//! at all; `filter`'s `max_copied_ngram` limits that copying but is no
//! privacy guarantee. The noise
//! is drawn from a generator seeded by the stage seed, so runs reproduce;
//! whoever knows the seed can recompute the noise, so keep it private when
//! the guarantee matters.

use std::collections::BTreeMap;

use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// How counts are released: as they are, or with Laplace noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Privacy {
    pub epsilon: f64,
    /// Noisy counts below this are dropped.
    pub threshold: f64,
}

/// Draws Laplace noise for the counts it releases.
pub struct Releaser {
    privacy: Option<Privacy>,
    rng: ChaCha8Rng,
}

impl Releaser {
    pub fn new(privacy: Option<Privacy>, rng: ChaCha8Rng) -> Self {
        Self { privacy, rng }
    }

    /// Turns exact counts into a histogram, adding noise when private.
    pub fn release(&mut self, counts: &BTreeMap<String, u64>) -> Histogram {
        let mut keys = Vec::with_capacity(counts.len());
        let mut weights = Vec::with_capacity(counts.len());
        for (key, &count) in counts {
            let weight = match self.privacy {
                None => count as f64,
                Some(privacy) => {
                    let noisy = count as f64 + laplace(&mut self.rng, 1.0 / privacy.epsilon);
                    if noisy < privacy.threshold {
                        continue;
                    }
                    noisy
                }
            };
            if weight > 0.0 {
                keys.push(key.clone());
                weights.push(weight);
            }
        }
        Histogram::new(keys, &weights)
    }
}

/// One draw from Laplace(0, scale) by inverting its CDF.
fn laplace(rng: &mut ChaCha8Rng, scale: f64) -> f64 {
    let u: f64 = rng.random::<f64>() - 0.5;
    let tail = (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE);
    -scale * u.signum() * tail.ln()
}

/// Keys with weights, sampled in proportion to weight.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    keys: Vec<String>,
    cumulative: Vec<f64>,
}

impl Histogram {
    fn new(keys: Vec<String>, weights: &[f64]) -> Self {
        let mut total = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                total += w;
                total
            })
            .collect();
        Self { keys, cumulative }
    }

    /// Exact counts, no noise.
    pub fn exact(counts: &BTreeMap<String, u64>) -> Self {
        let weights: Vec<f64> = counts.values().map(|&c| c as f64).collect();
        Self::new(counts.keys().cloned().collect(), &weights)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Weight of each key, in key order.
    pub fn weights(&self) -> impl Iterator<Item = (&str, f64)> {
        let mut previous = 0.0;
        self.keys.iter().zip(&self.cumulative).map(move |(key, &c)| {
            let weight = c - previous;
            previous = c;
            (key.as_str(), weight)
        })
    }

    /// A key drawn in proportion to its weight; `None` when empty.
    pub fn sample<R: RngExt + ?Sized>(&self, rng: &mut R) -> Option<&str> {
        self.sample_index(rng).map(|at| self.keys[at].as_str())
    }

    /// Index of a key drawn in proportion to its weight.
    pub fn sample_index<R: RngExt + ?Sized>(&self, rng: &mut R) -> Option<usize> {
        let total = *self.cumulative.last()?;
        let at = rng.random::<f64>() * total;
        Some(self.cumulative.partition_point(|&c| c <= at).min(self.keys.len() - 1))
    }
}

/// Adds each distinct value of `values` once to `counts`.
pub fn count_once<'a>(counts: &mut BTreeMap<String, u64>, values: impl Iterator<Item = &'a str>) {
    let distinct: std::collections::BTreeSet<&str> = values.collect();
    for value in distinct {
        *counts.entry(value.to_string()).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, c)| (k.to_string(), *c)).collect()
    }

    #[test]
    fn samples_follow_weights() {
        let histogram = Histogram::exact(&counts(&[("a", 1), ("b", 3)]));
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let b = (0..4000).filter(|_| histogram.sample(&mut rng) == Some("b")).count();
        assert!((2800..3200).contains(&b), "{b}");
    }

    #[test]
    fn laplace_release_drops_rare_keys_and_moves_counts() {
        let exact = counts(&[("common", 500), ("rare", 1)]);
        let privacy = Privacy { epsilon: 1.0, threshold: 5.0 };
        let mut releaser = Releaser::new(Some(privacy), ChaCha8Rng::seed_from_u64(7));
        let released = releaser.release(&exact);
        assert_eq!(released.keys(), ["common".to_string()]);
        let weight = released.weights().next().unwrap().1;
        assert!(weight != 500.0 && (weight - 500.0).abs() < 30.0, "{weight}");
    }

    #[test]
    fn laplace_noise_has_the_right_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<f64> = (0..20000).map(|_| laplace(&mut rng, 2.0)).collect();
        let mean_abs = draws.iter().map(|d| d.abs()).sum::<f64>() / draws.len() as f64;
        assert!((mean_abs - 2.0).abs() < 0.1, "{mean_abs}");
    }
}
