//! Parity of watchfire's Llama with mistralrs on the real SmolLM2-135M.
//!
//! The GGUF (Q4_1) is loaded with watchfire's loader, exported as an f32
//! Hugging Face folder, and that folder is loaded by mistralrs ([`Peer`]) and
//! by watchfire again. On the exported folder both engines compute the same
//! function in f32, so greedy decoding must pick the same tokens and the
//! log-probabilities must agree to rounding. Against mistralrs on the
//! original GGUF (quantized matmuls, activations quantized to 8 bits) they
//! only roughly agree: the figures are printed, and only a loose check is
//! made. Run with `cargo test --test parity -- --nocapture` to see them.

#![cfg(feature = "mistralrs")]

mod common;

use common::smollm2;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde_json::json;
use watchfire::model::llama::{ForwardOptions, Llama};
use watchfire::model::load::{LoadedModel, load};
use watchfire::model::tokenizer::{ChatMessage, chatml};
use watchfire::peer::{Peer, PeerError, PeerGreedy, PeerSampling};

const STEPS: usize = 32;
const TOP_K: usize = 5;
/// The largest |log-prob difference| allowed between the two f32 engines,
/// for the chosen tokens and for the tokens in both top-k lists. Measured on
/// a 2-core x86-64 CPU: 1.3e-5 for the chosen tokens, 3.1e-5 over the top-5
/// (the test prints them); the margin leaves room for other CPUs' rounding.
const F32_TOLERANCE: f64 = 2e-4;

/// Plain prompts and ChatML conversations, with digits, code and prose.
fn prompts() -> Vec<(&'static str, String)> {
    let chat = |messages: &[(&str, &str)]| {
        let messages: Vec<ChatMessage> =
            messages.iter().map(|(role, content)| ChatMessage::new(*role, *content)).collect();
        chatml(&messages, true)
    };
    vec![
        ("plain: capital", "The capital of France is".to_string()),
        (
            "plain: incident",
            "Incident report: at 14:32 a caller reported smoke coming from the second floor of a"
                .to_string(),
        ),
        (
            "plain: code",
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".into(),
        ),
        (
            "chatml: system+user",
            chat(&[
                ("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
                ("user", "Summarize in one sentence: a kitchen fire spread to the garage."),
            ]),
        ),
        ("chatml: user", chat(&[("user", "What does a 911 dispatcher ask a caller first?")])),
        (
            "chatml: multi-turn",
            chat(&[
                ("user", "Hi! What is 12 + 30?"),
                ("assistant", "12 + 30 = 42."),
                ("user", "And 42 times 2?"),
            ]),
        ),
    ]
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&v| f64::from(v) - log_sum).collect()
}

fn top_k(log_probs: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    order.sort_by(|&a, &b| log_probs[b].total_cmp(&log_probs[a]).then(a.cmp(&b)));
    order.into_iter().take(k).map(|i| (i as u32, log_probs[i])).collect()
}

/// The log-softmax of every position's logits, for one sequence.
fn position_log_probs(model: &Llama, ids: &[u32]) -> Vec<Vec<f64>> {
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = model.forward(&input, &ForwardOptions::default()).unwrap().logits;
    let rows: Vec<Vec<f32>> = logits.i(0).unwrap().to_vec2().unwrap();
    rows.iter().map(|row| log_softmax(row)).collect()
}

/// Greedy decoding with watchfire's model, re-running the whole sequence at
/// every step; shaped like the peer's answer.
fn our_greedy(model: &Llama, prompt: &[u32], steps: usize) -> PeerGreedy {
    let mut ids = prompt.to_vec();
    let mut out = PeerGreedy {
        prompt_ids: prompt.to_vec(),
        tokens: Vec::new(),
        logprobs: Vec::new(),
        top: Vec::new(),
    };
    for _ in 0..steps {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, &ForwardOptions::default()).unwrap().logits;
        let last: Vec<f32> = logits.i((0, ids.len() - 1)).unwrap().to_vec1().unwrap();
        let log_probs = log_softmax(&last);
        let top = top_k(&log_probs, TOP_K);
        let chosen = top[0].0;
        out.tokens.push(chosen);
        out.logprobs.push(log_probs[chosen as usize]);
        out.top.push(top);
        ids.push(chosen);
    }
    out
}

/// Our model along a given path (teacher forcing): per step, our argmax,
/// its log-prob, our top-k and our whole log-softmax, from one forward pass
/// over the prompt and the path.
struct Forced {
    tokens: Vec<u32>,
    log_probs: Vec<Vec<f64>>,
}

fn forced_greedy(model: &Llama, prompt: &[u32], path: &[u32]) -> Forced {
    let mut ids = prompt.to_vec();
    ids.extend(path);
    let rows = position_log_probs(model, &ids);
    let log_probs: Vec<Vec<f64>> = rows[prompt.len() - 1..prompt.len() - 1 + path.len()].to_vec();
    let tokens = log_probs.iter().map(|row| top_k(row, 1)[0].0).collect();
    Forced { tokens, log_probs }
}

impl Forced {
    /// In the peer's shape.
    fn greedy(&self, prompt: &[u32]) -> PeerGreedy {
        PeerGreedy {
            prompt_ids: prompt.to_vec(),
            tokens: self.tokens.clone(),
            logprobs: self
                .tokens
                .iter()
                .zip(&self.log_probs)
                .map(|(t, row)| row[*t as usize])
                .collect(),
            top: self.log_probs.iter().map(|row| top_k(row, TOP_K)).collect(),
        }
    }
}

/// Largest |difference| of the chosen tokens' log-probs, and of the log-probs
/// of the tokens in both top-k lists, over the steps where the tokens agree.
fn logprob_diffs(a: &PeerGreedy, b: &PeerGreedy) -> (f64, f64) {
    let mut chosen: f64 = 0.0;
    let mut shared: f64 = 0.0;
    for step in 0..a.tokens.len().min(b.tokens.len()) {
        if a.tokens[step] != b.tokens[step] {
            break;
        }
        chosen = chosen.max((a.logprobs[step] - b.logprobs[step]).abs());
        for (id, lp) in &a.top[step] {
            if let Some((_, other)) = b.top[step].iter().find(|(other, _)| other == id) {
                shared = shared.max((lp - other).abs());
            }
        }
    }
    (chosen, shared)
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Models {
    _dir: tempfile::TempDir,
    gguf: PathBuf,
    exported: PathBuf,
    ours: LoadedModel,
}

fn models(gguf: PathBuf) -> Models {
    let timer = Instant::now();
    let from_gguf = load(&gguf, DType::F32, &Device::Cpu).unwrap();
    let our_gguf_load = timer.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let exported = dir.path().join("smollm2-f32");
    let timer = Instant::now();
    from_gguf.export(&exported).unwrap();
    let export = timer.elapsed();
    let timer = Instant::now();
    let ours = load(&exported, DType::F32, &Device::Cpu).unwrap();
    let our_hf_load = timer.elapsed();
    eprintln!(
        "watchfire: load GGUF {our_gguf_load:.2?}, export f32 folder {export:.2?}, load folder \
         {our_hf_load:.2?}"
    );

    // The round trip through the folder keeps every weight bit for bit.
    let probe = ours.tokenizer.encode("Round trip.", false).unwrap().get_ids().to_vec();
    let a = position_log_probs(&from_gguf.model, &probe);
    let b = position_log_probs(&ours.model, &probe);
    assert_eq!(a, b, "the exported folder computes something else than the GGUF");
    Models { _dir: dir, gguf, exported, ours }
}

fn load_peer(path: &std::path::Path, what: &str) -> Peer {
    let timer = Instant::now();
    let peer = Peer::load(path).unwrap_or_else(|err| panic!("mistralrs on {what}: {err}"));
    eprintln!("mistralrs: load {what} {:.2?}", timer.elapsed());
    peer
}

#[test]
fn greedy_decoding_matches_mistralrs() {
    let Some(gguf) = smollm2() else { return };
    let start = Instant::now();
    let models = models(gguf);
    let ours = &models.ours;
    let peer_f32 = load_peer(&models.exported, "exported f32 folder");
    let peer_q = load_peer(&models.gguf, "Q4_1 GGUF");
    let prompts = prompts();

    // Our model reads mistralrs's whole greedy path in one forward pass
    // (teacher forcing): if its argmax is mistralrs's token at every step,
    // its own greedy decoding gives the same tokens, step by step. The
    // first prompt is also decoded for real, re-running the sequence at
    // every step, to show it.
    eprintln!(
        "\n{STEPS} greedy steps, top-{TOP_K}; natural log-probs; mistralrs on the exported f32 \
         folder\n{:<20} {:>6} {:>6} {:>11} {:>11} {:>9}",
        "prompt", "tokens", "agree", "max|Δlp|", "max|Δtop|", "mistralrs"
    );
    let mut worst_chosen: f64 = 0.0;
    let mut worst_shared: f64 = 0.0;
    let mut runs = Vec::new();
    for (index, (name, prompt)) in prompts.iter().enumerate() {
        let ids = ours.tokenizer.encode(prompt.as_str(), false).unwrap().get_ids().to_vec();
        let timer = Instant::now();
        let theirs = peer_f32.greedy(prompt, STEPS, TOP_K).unwrap();
        let peer_time = timer.elapsed();
        assert_eq!(theirs.prompt_ids, ids, "{name}: the two tokenizers differ");
        let mine = forced_greedy(&ours.model, &ids, &theirs.tokens).greedy(&ids);
        let agree = common_prefix(&mine.tokens, &theirs.tokens);
        let (chosen, shared) = logprob_diffs(&mine, &theirs);
        eprintln!(
            "{name:<20} {:>6} {:>6} {chosen:>11.2e} {shared:>11.2e} {:>8.2}s",
            ids.len(),
            agree,
            peer_time.as_secs_f64()
        );
        assert_eq!(
            mine.tokens,
            theirs.tokens,
            "{name}: greedy tokens differ from step {agree}:\nours:  {:?}\npeer:  {:?}",
            ours.tokenizer.decode(&mine.tokens, false).unwrap(),
            peer_f32.detokenize(&theirs.tokens).unwrap()
        );
        if index == 0 {
            let timer = Instant::now();
            let decoded = our_greedy(&ours.model, &ids, STEPS);
            eprintln!(
                "{:<20} {:>6} {:>6} {:>11.2e} {:>11.2e} (watchfire greedy, {:.2?})",
                "  decoded for real",
                "",
                common_prefix(&decoded.tokens, &theirs.tokens),
                logprob_diffs(&decoded, &theirs).0,
                logprob_diffs(&decoded, &theirs).1,
                timer.elapsed()
            );
            assert_eq!(decoded.tokens, theirs.tokens, "{name}: watchfire's greedy decoding");
            let (chosen, shared) = logprob_diffs(&decoded, &theirs);
            worst_chosen = worst_chosen.max(chosen);
            worst_shared = worst_shared.max(shared);
        }
        worst_chosen = worst_chosen.max(chosen);
        worst_shared = worst_shared.max(shared);
        runs.push((ids, theirs));
    }
    eprintln!(
        "f32: largest |Δ log-prob| chosen {worst_chosen:.2e}, shared top-k {worst_shared:.2e} \
         (tolerance {F32_TOLERANCE:.0e})"
    );
    assert!(worst_chosen < F32_TOLERANCE, "chosen-token log-probs differ by {worst_chosen}");
    assert!(worst_shared < F32_TOLERANCE, "top-k log-probs differ by {worst_shared}");

    // Against the quantized original, from the same prompt ids: "forced"
    // counts the steps of mistralrs's greedy path where our argmax is its
    // token (same context at every step); "free" is how long the two
    // free-running decodings agree (ours is the f32 path above); max|Δlp| is
    // over the chosen tokens of the forced path; "same tok" says whether
    // mistralrs's GGUF tokenizer encodes the prompt as ours does.
    eprintln!(
        "\nagainst mistralrs on the Q4_1 GGUF (quantized matmuls)\n{:<20} {:>6} {:>7} {:>5} \
         {:>11} {:>8} {:>9}",
        "prompt", "first", "forced", "free", "max|Δlp|", "same tok", "mistralrs"
    );
    let mut first_agree = 0;
    let mut forced_total = 0;
    let mut worst_q: f64 = 0.0;
    for ((name, prompt), (ids, f32_path)) in prompts.iter().zip(&runs) {
        let timer = Instant::now();
        let theirs = peer_q.greedy_ids(ids, STEPS, TOP_K).unwrap();
        let peer_time = timer.elapsed();
        let same_tokenizer = peer_q.tokenize(prompt).unwrap() == *ids;
        let mine = forced_greedy(&ours.model, ids, &theirs.tokens);
        let agree = mine.tokens.iter().zip(&theirs.tokens).filter(|(a, b)| a == b).count();
        let mut worst: f64 = 0.0;
        for (step, token) in theirs.tokens.iter().enumerate() {
            let our_lp = mine.log_probs[step][*token as usize];
            worst = worst.max((our_lp - theirs.logprobs[step]).abs());
        }
        worst_q = worst_q.max(worst);
        let first = f32_path.tokens[0] == theirs.tokens[0];
        first_agree += usize::from(first);
        forced_total += agree;
        eprintln!(
            "{name:<20} {:>6} {:>4}/{STEPS} {:>5} {worst:>11.2e} {:>8} {:>8.2}s",
            if first { "yes" } else { "no" },
            agree,
            common_prefix(&f32_path.tokens, &theirs.tokens),
            if same_tokenizer { "yes" } else { "no" },
            peer_time.as_secs_f64()
        );
    }
    let total = prompts.len() * STEPS;
    eprintln!(
        "Q4_1: first token agrees on {first_agree}/{} prompts; forced agreement \
         {forced_total}/{total}; largest |Δ log-prob| {worst_q:.2e}\ntest wall time {:.2?}",
        prompts.len(),
        start.elapsed()
    );
    assert!(first_agree * 3 >= prompts.len() * 2, "the first token agrees on too few prompts");
    assert!(forced_total * 4 >= total * 3, "the quantized model disagrees on too many steps");
}

/// The chat entry points the LLM-backed stages use: a JSON-schema
/// constrained completion parses and follows the schema, and a seed
/// reproduces a sampled completion.
#[test]
fn peer_chat_completions() {
    let Some(gguf) = smollm2() else { return };
    let peer = load_peer(&gguf, "Q4_1 GGUF");
    let messages = [
        ChatMessage::new(
            "system",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        ),
        ChatMessage::new("user", "Describe a small house fire as JSON with a place and a time."),
    ];
    let schema = json!({
        "type": "object",
        "properties": {
            "place": { "type": "string", "maxLength": 40 },
            "time": { "type": "string", "maxLength": 20 },
            "injured": { "type": "integer", "minimum": 0, "maximum": 20 }
        },
        "required": ["place", "time", "injured"],
        "additionalProperties": false
    });
    let opts = PeerSampling { max_tokens: 96, temperature: 0.8, top_p: 0.95, seed: 3 };
    let timer = Instant::now();
    let text = peer.complete_json(&messages, &schema, &opts).unwrap();
    eprintln!("complete_json in {:.2?}: {text}", timer.elapsed());
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in ["place", "time", "injured"] {
        assert!(value.get(key).is_some(), "{key} missing from {text}");
    }
    assert!(value["injured"].as_u64().is_some_and(|n| n <= 20), "{text}");
    assert_eq!(peer.complete_json(&messages, &schema, &opts).unwrap(), text, "same seed");

    let opts = PeerSampling { max_tokens: 24, temperature: 1.0, top_p: 1.0, seed: 11 };
    let a = peer.complete(&messages[1..], &opts).unwrap();
    let b = peer.complete(&messages[1..], &opts).unwrap();
    let c = peer.complete(&messages[1..], &PeerSampling { seed: 12, ..opts.clone() }).unwrap();
    eprintln!("complete (seed 11): {a:?}\ncomplete (seed 12): {c:?}");
    assert_eq!(a, b, "the same seed gives the same completion");
    assert_ne!(a, c, "another seed gives another completion");

    let truncated = PeerSampling { max_tokens: 3, ..PeerSampling::default() };
    let err = peer.complete_json(&messages, &schema, &truncated).unwrap_err();
    assert!(matches!(err, PeerError::Truncated { .. }), "{err}");
    let bad = PeerSampling { top_p: 0.0, ..PeerSampling::default() };
    assert!(matches!(peer.complete(&messages, &bad), Err(PeerError::Options(_))));
}
