//! An adapter watchfire trains and exports in PEFT's layout loads in
//! mistralrs, and the two engines decode the same greedy tokens with it.
//!
//! SmolLM2-135M-Instruct (fetched with pip, exported as an f32 Hugging Face
//! folder) gets a selective LoRA on a few heads, trained for a few steps at a
//! high learning rate so that it visibly changes the model. watchfire runs
//! the adapter unmerged, as a projection hook over the frozen weights;
//! mistralrs merges `B A` into the weights when it loads. Both must pick the
//! same tokens, and the adapter must move the log-probs by far more than the
//! two engines differ, or the comparison would prove nothing.
//!
//! mistralrs finds adapters only by repository id in the Hugging Face cache
//! named by `HF_HUB_CACHE`, so this file holds a single test, which points
//! that variable at a temporary folder before anything reads it.

#![cfg(feature = "mistralrs")]

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use watchfire::adapt::batch::{chat_prompt, encode};
use watchfire::adapt::export::{Adapter, write_adapter};
use watchfire::adapt::lora::HeadMask;
use watchfire::adapt::optim::AdamWParams;
use watchfire::adapt::tasks::{Example, Task};
use watchfire::adapt::train::{Method, TrainConfig, Trainer};
use watchfire::model::llama::{ForwardOptions, Llama, Projection, ProjectionHook};
use watchfire::model::load::load;
use watchfire::peer::{Peer, stage_adapter};

const STEPS: usize = 24;
/// The largest |log-prob difference| allowed between the engines on the
/// chosen tokens: the merged and the unmerged LoRA round differently.
const TOLERANCE: f64 = 1e-3;

fn example(id: &str, report: &str, target: &str) -> Example {
    Example {
        id: format!("{id}:alert"),
        task: Task::Alert,
        source_id: id.to_string(),
        template_id: None,
        prompt: format!("Write a one-line alert.\n\nReport:\n{report}"),
        target: target.to_string(),
        key_facts: Vec::new(),
        spans: Vec::new(),
    }
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

/// Greedy decoding, re-running the sequence each step: tokens and the
/// chosen tokens' natural log-probs.
fn greedy(
    model: &Llama,
    hook: Option<&dyn ProjectionHook>,
    prompt: &[u32],
) -> (Vec<u32>, Vec<f64>) {
    let mut ids = prompt.to_vec();
    let (mut tokens, mut logprobs) = (Vec::new(), Vec::new());
    let opts = ForwardOptions { hook, ..ForwardOptions::default() };
    for _ in 0..STEPS {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, &opts).unwrap().logits;
        let last: Vec<f32> = logits.i((0, ids.len() - 1)).unwrap().to_vec1().unwrap();
        let lp = log_softmax(&last);
        let best = (0..lp.len()).max_by(|&a, &b| lp[a].total_cmp(&lp[b])).unwrap();
        tokens.push(best as u32);
        logprobs.push(lp[best]);
        ids.push(best as u32);
    }
    (tokens, logprobs)
}

#[test]
fn an_exported_lora_adapter_decodes_the_same_in_mistralrs() {
    let Some(gguf) = common::smollm2() else { return };
    let scratch = tempfile::tempdir().unwrap();
    let hub = scratch.path().join("hub");
    // SAFETY: the only test of this binary, and nothing has read the
    // environment or started a thread of ours yet.
    unsafe { std::env::set_var("HF_HUB_CACHE", &hub) };

    let folder = scratch.path().join("smollm2-f32");
    load(&gguf, DType::F32, &Device::Cpu).unwrap().export(&folder).unwrap();
    let base = load(&folder, DType::F32, &Device::Cpu).unwrap();
    let config = base.config().clone();

    // Train: selective LoRA on two heads of every fifth layer, no prefix.
    let examples = [
        example(
            "a",
            "A van hit a cyclist on Mill Road at 08:10.",
            "TRAFFIC COLLISION | Mill Road | 08:10 | medium | vehicle",
        ),
        example(
            "b",
            "Smoke seen at 14 Oak Lane at 22:40.",
            "STRUCTURE FIRE | 14 Oak Lane | 22:40 | high | fire",
        ),
        example(
            "c",
            "Two cars collided on the A40 at 17:05.",
            "TRAFFIC COLLISION | A40 | 17:05 | medium | vehicle",
        ),
        example(
            "d",
            "A shed burned on Elm Street at 03:15.",
            "STRUCTURE FIRE | Elm Street | 03:15 | low | fire",
        ),
    ];
    let sequences: Vec<_> =
        examples.iter().filter_map(|e| encode(&base.tokenizer, e, 256).unwrap()).collect();
    assert_eq!(sequences.len(), examples.len());
    let heads: Vec<(usize, usize)> =
        (0..config.num_hidden_layers).step_by(5).flat_map(|l| [(l, 0), (l, 4)]).collect();
    let mask = HeadMask::from_heads(config.num_hidden_layers, config.num_attention_heads, &heads);
    let train = TrainConfig {
        method: Method::Selective,
        rank: 4,
        alpha: 8.0,
        targets: Projection::ALL.to_vec(),
        prefix: false,
        prefix_len: 0,
        prefix_mlp: 0,
        contrastive_lambda: 0.0,
        temperature: 0.1,
        contrastive_layer: config.num_hidden_layers / 2,
        steps: 4,
        batch: 2,
        grad_accum: 1,
        lr: 2e-2,
        warmup: 1,
        min_lr_ratio: 1.0,
        adamw: AdamWParams::default(),
        clip: 1.0,
        seed: 3,
    };
    let instruction =
        base.tokenizer.encode(chat_prompt("Write a one-line alert.").as_str(), false).unwrap();
    let mut trainer = Trainer::new(
        &base,
        train,
        Some(mask),
        sequences,
        vec![Task::Alert],
        &[instruction.get_ids().to_vec()],
    )
    .unwrap();
    for _ in 0..4 {
        trainer.step().unwrap();
    }
    let adapter_dir = scratch.path().join("adapter");
    let instructions = BTreeMap::from([(Task::Alert, "Write a one-line alert.".to_string())]);
    write_adapter(&trainer, &base, "smollm2-f32", &instructions, &adapter_dir).unwrap();
    drop(trainer);

    // Ours: the adapter as read back from its files, unmerged.
    let adapter = Adapter::load(&adapter_dir, &config, DType::F32, &Device::Cpu).unwrap();
    let lora = adapter.lora.as_ref().expect("a LoRA adapter");

    // Theirs: mistralrs with the PEFT files merged at load.
    let id = stage_adapter(&hub, &adapter_dir).unwrap();
    let peer = Peer::load_with_lora(&folder, &[id]).unwrap();

    let prompts = [
        chat_prompt(
            &adapter.prompt(Task::Alert, "A lorry overturned on the M5 at 06:20.").unwrap(),
        ),
        chat_prompt(
            &adapter.prompt(Task::Alert, "Fire in a kitchen at 9 Park Row, 19:45.").unwrap(),
        ),
        "Incident report: at 14:32 a caller reported".to_string(),
    ];
    eprintln!("{:<8} {:>6} {:>10} {:>22}", "prompt", "agree", "max|Δlp|", "base model agrees for");
    for (at, prompt) in prompts.iter().enumerate() {
        let ids = base.tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
        let (mine, mine_lp) = greedy(&base.model, Some(lora), &ids);
        let (plain, plain_lp) = greedy(&base.model, None, &ids);
        let theirs = peer.greedy_ids(&ids, STEPS, 1).unwrap();
        let agree = mine.iter().zip(&theirs.tokens).take_while(|(a, b)| a == b).count();
        let engines = mine_lp
            .iter()
            .zip(&theirs.logprobs)
            .take(agree)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // How far the adapter moved our own model, on the steps before the
        // adapted and the plain model part ways.
        let same = mine.iter().zip(&plain).take_while(|(a, b)| a == b).count();
        let moved = if same < STEPS {
            f64::INFINITY
        } else {
            mine_lp.iter().zip(&plain_lp).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
        };
        eprintln!("{at:<8} {agree:>6} {engines:>10.2e} {:>16} steps", same);
        assert_eq!(
            mine,
            theirs.tokens,
            "prompt {at}: greedy tokens differ from step {agree}:\nours:  {:?}\npeer:  {:?}",
            base.tokenizer.decode(&mine, false).unwrap(),
            peer.detokenize(&theirs.tokens).unwrap()
        );
        assert!(engines < TOLERANCE, "prompt {at}: log-probs differ by {engines:e}");
        assert!(moved > 10.0 * TOLERANCE, "prompt {at}: the adapter barely changes the model");
    }
}
