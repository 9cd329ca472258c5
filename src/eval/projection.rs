//! A 2-D map of span embeddings: exact t-SNE (the `bhtsne` crate) over
//! cosine distances, like the paper's Figure 2.
//!
//! t-SNE starts from a layout the crate would otherwise draw from a random
//! generator; here it starts from a ChaCha8 stream seeded by the caller,
//! and runs on a one-thread pool, so the same points and seed give the same
//! map. The map is for looking at: distances in it are not the embeddings'
//! distances, which is why the separation score is computed on the
//! embeddings themselves (see [`super::embed`]).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::embed::{SpanEmbedding, cosine_distance};

/// Fewer points than this are not projected.
pub const MIN_POINTS: usize = 8;

/// The 2-D position of every point, in order; `Err` when there are too few
/// points or t-SNE fails.
pub fn tsne(points: &[SpanEmbedding], seed: u64, epochs: usize) -> Result<Vec<[f64; 2]>, String> {
    if points.len() < MIN_POINTS {
        return Err(format!("{} points are too few to project", points.len()));
    }
    let vectors: Vec<&[f32]> = points.iter().map(|p| p.vector.as_slice()).collect();
    // The crate requires 3 * perplexity < n - 1.
    let perplexity = (20.0f64).min((points.len() as f64 - 2.0) / 3.0);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let init: Vec<f64> = (0..points.len() * 2).map(|_| rng.random::<f64>() * 1e-4).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| format!("starting the t-SNE thread: {e}"))?;
    let run = || {
        std::panic::catch_unwind(|| {
            let mut fit = bhtsne::tSNE::<f64, &[f32], 2>::new(&vectors);
            fit.perplexity(perplexity)
                .epochs(epochs)
                .initial_embedding(init.clone())
                .exact(|a, b| cosine_distance(a, b));
            fit.embedding()
        })
    };
    let flat = pool.install(run).map_err(|_| "t-SNE failed".to_string())?;
    Ok(flat.chunks(2).map(|xy| [xy[0], xy[1]]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EntityRole;

    fn cloud(n: usize) -> Vec<SpanEmbedding> {
        (0..n)
            .map(|i| {
                let key = i % 2 == 0;
                let jitter = (i as f32 * 0.37).sin() * 0.05;
                SpanEmbedding {
                    source_id: format!("r{i}"),
                    kind: "t".into(),
                    role: if key { EntityRole::Key } else { EntityRole::Peripheral },
                    value: "v".into(),
                    vector: if key { vec![1.0, jitter, 0.1] } else { vec![jitter, 1.0, 0.1] },
                }
            })
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_map_and_clusters_stay_apart() {
        let points = cloud(24);
        let a = tsne(&points, 5, 300).unwrap();
        assert_eq!(a, tsne(&points, 5, 300).unwrap());
        let centre = |key: bool| {
            let sel: Vec<&[f64; 2]> =
                a.iter().enumerate().filter(|(i, _)| (i % 2 == 0) == key).map(|(_, p)| p).collect();
            let n = sel.len() as f64;
            [sel.iter().map(|p| p[0]).sum::<f64>() / n, sel.iter().map(|p| p[1]).sum::<f64>() / n]
        };
        let (k, p) = (centre(true), centre(false));
        let spread =
            a.iter().map(|q| (q[0] - k[0]).abs().max((q[1] - k[1]).abs())).fold(0.0, f64::max);
        let gap = ((k[0] - p[0]).powi(2) + (k[1] - p[1]).powi(2)).sqrt();
        assert!(gap > 0.2 * spread, "gap {gap} spread {spread}");
        assert!(tsne(&points[..4], 5, 300).is_err());
    }
}
