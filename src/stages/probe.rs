//! `probe`: ranks attention heads by gradient magnitude during a short
//! preliminary fine-tune, and picks the heads selective LoRA adapts.

use std::io::Write;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::adapt::probe::{MaskRule, ProbeConfig, probe, rank};
use crate::corpus::write_json;
use crate::plot::heat_map;
use crate::stage::{InputSpec, ParamError, Stage, StageContext, StageError, Validate};
use crate::stages::perplexity::Precision;
use crate::stages::train::{encode_all, load_model, read_examples};

pub struct Probe;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeParams {
    /// Steps of the preliminary fine-tune (q, k, v and o of every layer train).
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Learning rate of the preliminary fine-tune (AdamW).
    pub lr: f64,
    /// Examples longer than this many tokens are left out.
    pub max_len: usize,
    /// Use only the first N examples; 0 uses all.
    pub max_examples: usize,
    /// How scores become the mask: `{rule: top_k, k: N}` (best N heads overall),
    /// `{rule: top_k_per_layer, k: N}`, or `{rule: share, share: S}` (fewest heads holding a
    /// share S of the total score).
    pub select: MaskRule,
    /// Precision of the frozen weights; the probed projections are f32.
    pub dtype: Precision,
}

impl Default for ProbeParams {
    fn default() -> Self {
        Self {
            steps: 16,
            batch: 4,
            lr: 1e-4,
            max_len: 256,
            max_examples: 0,
            select: MaskRule::TopK { k: 24 },
            dtype: Precision::F32,
        }
    }
}

impl Validate for ProbeParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.steps == 0 {
            return Err(ParamError::new("steps", "must be at least 1"));
        }
        if self.batch == 0 {
            return Err(ParamError::new("batch", "must be at least 1"));
        }
        if !(self.lr >= 0.0 && self.lr < 1.0) {
            return Err(ParamError::new("lr", "must be in [0, 1)"));
        }
        match self.select {
            MaskRule::TopK { k } | MaskRule::TopKPerLayer { k } if k == 0 => {
                Err(ParamError::new("select", "`k` must be at least 1"))
            }
            MaskRule::Share { share } if !(share > 0.0 && share <= 1.0) => {
                Err(ParamError::new("select", "`share` must be in (0, 1]"))
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Serialize)]
struct Summary {
    select: MaskRule,
    selected_heads: usize,
    total_heads: usize,
    /// Share of the total score the selected heads hold.
    selected_score_share: f64,
    steps: usize,
    tokens: usize,
    losses: Vec<f64>,
    examples: usize,
    examples_too_long: usize,
}

impl Stage for Probe {
    type Params = ProbeParams;

    const KIND: &'static str = "probe";
    const VERSION: u32 = 1;
    const DOC: &'static str = "Head probing: a short fine-tune of the attention projections on \
        `tasks` examples, scoring every query head of every layer by the gradient norm of its \
        slices of q, k, v and o (a key/value head's share split among the query heads that \
        read it). Writes the ranked table (`heads.csv`), a heat map (`heatmap.svg`, layers x \
        heads, selected heads outlined) and the head mask (`mask.json`) chosen by `select`, \
        which `train` with `method: selective` reads.";
    const INPUTS: &'static [InputSpec] = &[
        InputSpec {
            name: "model",
            required: true,
            doc: "The base model: a `model` stage, a GGUF file or a Hugging Face folder.",
        },
        InputSpec {
            name: "examples",
            required: true,
            doc: "A `tasks` stage (its `train.jsonl`), usually over the seed reports.",
        },
    ];
    const OUTPUTS: &'static [&'static str] =
        &["mask.json", "heads.csv", "heatmap.svg", "probe.json"];
    const USES_ALL_CORES: bool = true;

    fn run(params: &ProbeParams, ctx: &StageContext<'_>) -> Result<(), StageError> {
        let base = load_model(ctx, params.dtype.dtype())?;
        let examples = read_examples(ctx, "examples", params.max_examples)?;
        let (sequences, too_long) = encode_all(&base, &examples, params.max_len)?;
        let progress = ctx.progress(Some(params.steps as u64), "steps");
        let config =
            ProbeConfig { steps: params.steps, batch: params.batch, lr: params.lr, seed: ctx.seed };
        let result = probe(&base, &sequences, &config, |_, loss, _| {
            progress.inc(1);
            progress.set_message(format!("loss {loss:.4}"));
        })
        .map_err(|e| StageError::failed(format!("probing: {e}")))?;

        let mask = params.select.select(&result.scores);
        let ranked = rank(&result.scores);
        let total: f64 = ranked.iter().map(|h| h.score).sum();
        let mut csv = String::from("rank,layer,head,score,share,cumulative_share,selected\n");
        let mut cumulative = 0.0;
        let mut selected_score = 0.0;
        for (i, h) in ranked.iter().enumerate() {
            let share = if total > 0.0 { h.score / total } else { 0.0 };
            cumulative += share;
            let selected = mask.is_selected(h.layer, h.head);
            if selected {
                selected_score += share;
            }
            csv.push_str(&format!(
                "{},{},{},{:.6e},{:.6},{:.6},{}\n",
                i + 1,
                h.layer,
                h.head,
                h.score,
                share,
                cumulative,
                selected
            ));
        }
        fs_err::File::create(ctx.output("heads.csv"))?.write_all(csv.as_bytes())?;
        write_json(
            &ctx.output("mask.json"),
            &serde_json::json!({ "select": params.select, "selected_heads": mask.count(), "mask": mask }),
        )?;
        heat_map(
            &ctx.output("heatmap.svg"),
            "Head gradient norms (selected heads outlined)",
            "head",
            "layer",
            &result.scores,
            &mask.layers,
        )
        .map_err(|e| StageError::failed(e.to_string()))?;
        ctx.notice(&format!(
            "selected {} of {} heads, holding {:.1}% of the gradient norm",
            mask.count(),
            ranked.len(),
            100.0 * selected_score
        ));
        write_json(
            &ctx.output("probe.json"),
            &Summary {
                select: params.select,
                selected_heads: mask.count(),
                total_heads: ranked.len(),
                selected_score_share: selected_score,
                steps: params.steps,
                tokens: result.tokens,
                losses: result.losses,
                examples: sequences.len(),
                examples_too_long: too_long,
            },
        )
    }
}
