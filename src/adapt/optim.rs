//! AdamW, the learning-rate schedule and gradient clipping.
//!
//! The optimizer is written here rather than taken from `candle_nn` because a
//! resumable run must save and restore its moments: [`AdamW::state`] and
//! [`AdamW::load_state`] round-trip them through a safetensors checkpoint, so
//! a resumed run continues bit for bit where it stopped.
//!
//! Update (decoupled weight decay, Loshchilov and Hutter):
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
//! `w -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + lr wd w`.
//! Moments are kept in f32 whatever the variables' dtype.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor, Var};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// AdamW's constants.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// AdamW over a fixed list of named variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let zeros = |var: &Var| var.zeros_like()?.to_dtype(DType::F32);
        let m = vars.iter().map(|(_, var)| zeros(var)).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, var)| zeros(var)).collect::<Result<Vec<_>>>()?;
        Ok(Self { params, vars, m, v, step: 0 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn step_count(&self) -> usize {
        self.step
    }

    /// Bytes the two moments take.
    pub fn state_bytes(&self) -> usize {
        self.m.iter().chain(&self.v).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Applies one update; `grads[i]` belongs to `vars()[i]` (f32).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!("{} gradients for {} variables", grads.len(), self.vars.len());
        }
        self.step += 1;
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        let t = self.step as i32;
        let (bias1, bias2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m / bias1)?;
            let v_hat = (&v / bias2)?;
            let update = m_hat.div(&(v_hat.sqrt()? + eps)?)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let w = ((&w * (1.0 - lr * weight_decay))? - (update * lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments under `m.NAME` and `v.NAME`, for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments written by [`AdamW::state`] and the update count.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let get = |key: String| {
                state
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::msg(format!("`{key}` is missing")))
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then a cosine decay
/// to `peak * min_ratio` at `total`. `step` counts from 0.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (when
/// `max_norm > 0`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| learning_rate(s, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!(lr(50) < 1.0 && lr(50) > 0.1);
        assert!((lr(100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut grads = vec![
            Tensor::new(&[3f32, 0.0], &Device::Cpu).unwrap(),
            Tensor::new(&[0f32, 4.0], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let after = clip_grad_norm(&mut grads, 0.0).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_resumes_exactly() {
        let target = Tensor::new(&[1f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let run = |steps: usize, resume_at: Option<usize>| {
            let var = Var::new(&[0f32, 0.0, 0.0], &Device::Cpu).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), var.clone())], AdamWParams::default()).unwrap();
            for s in 0..steps {
                if Some(s) == resume_at {
                    let (state, weights) = (opt.state(), var.as_tensor().copy().unwrap());
                    let fresh = Var::from_tensor(&weights).unwrap();
                    let mut again =
                        AdamW::new(vec![("w".into(), fresh.clone())], AdamWParams::default())
                            .unwrap();
                    again.load_state(&state, opt.step_count()).unwrap();
                    return (fresh, again, s);
                }
                let loss = (var.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                let g = grads.get(var.as_tensor()).unwrap().clone();
                opt.step(&[g], 0.1).unwrap();
            }
            (var, opt, steps)
        };
        let (straight, _, _) = run(200, None);
        let w: Vec<f32> = straight.as_tensor().to_vec1().unwrap();
        assert!(w.iter().zip([1.0, -2.0, 3.0]).all(|(a, b)| (a - b).abs() < 0.05), "{w:?}");

        // Stop at 50, rebuild from the saved state, continue to 200.
        let (var, mut opt, from) = run(200, Some(50));
        for _ in from..200 {
            let loss = (var.as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = grads.get(var.as_tensor()).unwrap().clone();
            opt.step(&[g], 0.1).unwrap();
        }
        let resumed: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert_eq!(w, resumed);
    }
}
