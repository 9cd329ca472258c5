//! [`Peer`]: a small blocking wrapper around the mistralrs inference engine.
//!
//! mistralrs is the independent implementation that watchfire's own model is
//! checked against (parity tests, benchmarks), and the engine behind the
//! LLM-backed synthetic-data stages. It is async; a [`Peer`] owns a small
//! tokio runtime and blocks on every call, so callers need no runtime of their
//! own (and must not call it from inside one: `block_on` would panic).
//!
//! Everything loads from local files, never from a model hub:
//!
//! - a GGUF file, or a folder holding `model.gguf` (a `model` stage's
//!   artifact, which also holds `source.json`): the tokenizer and the chat
//!   template come from the GGUF metadata, and the matmuls run on the
//!   quantized weights;
//! - a Hugging Face folder with `config.json`, `*.safetensors`,
//!   `tokenizer.json` and, for chat, `tokenizer_config.json` with a
//!   `chat_template` (what [`crate::model::load::LoadedModel::export`]
//!   writes).
//!
//! Activations are f32 in both cases (mistralrs would pick bf16 on a CPU by
//! itself), so that a folder exported in f32 computes what watchfire's model
//! computes, to rounding.
//!
//! Reproducibility: the engine runs one sequence at a time and has no prefix
//! cache, so the same call on the same model gives the same result whatever
//! came before it; sampling uses a per-call RNG seeded from
//! [`PeerSampling::seed`] (mistralrs's own RNG is shared by all requests of an
//! engine and seeded once).
//!
//! Log-probabilities are natural logarithms (mistralrs reports base-10 ones);
//! they are computed here, in f64, from the logits mistralrs produced.
//!
//! mistralrs logs through `tracing` (the `watchfire` binary shows only
//! `watchfire=...` targets unless `WATCHFIRE_LOG` asks for more) and its
//! loading progress bars are switched off.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mistralrs::core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, IsqOrganization, MistralRsBuilder, ModelDType, NormalLoaderBuilder,
    NormalSpecificConfig, Pipeline, SchedulerConfig, TokenSource,
};
use mistralrs::{
    Constraint, CustomLogitsProcessor, Model, NormalRequest, Request, RequestBuilder,
    RequestMessage, Response, SamplingParams, StopTokens, TextMessageRole,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::source::GGUF_NAME;
use crate::model::tokenizer::ChatMessage;

/// Why the peer engine could not load a model or answer a request.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("`{}` does not exist", .0.display())]
    Missing(PathBuf),
    #[error(
        "`{}` is neither a GGUF file nor a folder with `config.json` or `{GGUF_NAME}`",
        .0.display()
    )]
    UnknownLayout(PathBuf),
    #[error("mistralrs could not load `{}`: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("starting the tokio runtime for mistralrs: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("mistralrs loaded `{}` without a tokenizer", .0.display())]
    NoTokenizer(PathBuf),
    #[error("tokenizing with the mistralrs tokenizer: {0}")]
    Tokenize(String),
    #[error("invalid sampling options: {0}")]
    Options(String),
    #[error("mistralrs request failed: {0}")]
    Request(String),
    #[error("the JSON completion was cut off at {max_tokens} tokens: {text:?}")]
    Truncated { max_tokens: usize, text: String },
    #[error("the constrained completion is not valid JSON ({message}): {text:?}")]
    NotJson { message: String, text: String },
}

/// How a chat completion is sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSampling {
    /// The most tokens to generate; generation also ends at an end-of-sequence token.
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy decoding (and ignores `top_p` and `seed`).
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add
    /// up to at least `top_p` (1 keeps all).
    pub top_p: f64,
    /// Seeds this call's RNG: the same call with the same seed gives the same text.
    pub seed: u64,
}

impl Default for PeerSampling {
    fn default() -> Self {
        Self { max_tokens: 256, temperature: 1.0, top_p: 1.0, seed: 0 }
    }
}

/// What [`Peer::greedy`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerGreedy {
    /// The prompt as the mistralrs tokenizer encodes it (no special tokens added).
    pub prompt_ids: Vec<u32>,
    /// The generated token ids, one per step.
    pub tokens: Vec<u32>,
    /// Per step, the natural log-probability of the chosen token.
    pub logprobs: Vec<f64>,
    /// Per step, the `top_k` most likely tokens and their natural
    /// log-probabilities, most likely first.
    pub top: Vec<Vec<(u32, f64)>>,
}

type Encode = Box<dyn Fn(&str) -> Result<Vec<u32>, String> + Send + Sync>;
type Decode = Box<dyn Fn(&[u32]) -> Result<String, String> + Send + Sync>;

/// A model loaded in mistralrs; see the module doc.
pub struct Peer {
    // Dropped before the runtime: dropping it stops the engine thread.
    model: Model,
    runtime: tokio::runtime::Runtime,
    encode: Encode,
    decode: Decode,
    eos_ids: Vec<u32>,
    vocab_size: usize,
    path: PathBuf,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("path", &self.path)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

enum Layout {
    /// The folder holding the GGUF file, and the file's name.
    Gguf(PathBuf, String),
    Hf(PathBuf),
}

fn layout(path: &Path) -> Result<Layout, PeerError> {
    if !path.exists() {
        return Err(PeerError::Missing(path.to_path_buf()));
    }
    let path = std::path::absolute(path).map_err(|_| PeerError::Missing(path.to_path_buf()))?;
    let gguf = |file: &Path| {
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Layout::Gguf(dir, name)
    };
    if path.is_file() {
        return Ok(gguf(&path));
    }
    if path.join("config.json").is_file() {
        return Ok(Layout::Hf(path));
    }
    if path.join(GGUF_NAME).is_file() {
        return Ok(gguf(&path.join(GGUF_NAME)));
    }
    Err(PeerError::UnknownLayout(path))
}

/// Copies a PEFT adapter folder (`adapter_config.json`,
/// `adapter_model.safetensors`) into the Hugging Face cache folder `hub`
/// as the repository `watchfire/adapter-HASH` at revision `main`, the layout
/// mistralrs reads adapters from, and returns that id. `HASH` is the
/// adapter's content hash, so different adapters never share an id.
pub fn stage_adapter(hub: &Path, adapter: &Path) -> std::io::Result<String> {
    const FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
    let mut hasher = blake3::Hasher::new();
    for name in FILES {
        hasher.update(&fs_err::read(adapter.join(name))?);
    }
    let hash = hasher.finalize().to_hex()[..16].to_string();
    let repo = hub.join(format!("models--watchfire--adapter-{hash}"));
    let snapshot = repo.join("snapshots").join(&hash);
    fs_err::create_dir_all(&snapshot)?;
    fs_err::create_dir_all(repo.join("refs"))?;
    for name in FILES {
        fs_err::copy(adapter.join(name), snapshot.join(name))?;
    }
    fs_err::write(repo.join("refs").join("main"), &hash)?;
    Ok(format!("watchfire/adapter-{hash}"))
}

type PipelineHandle = Arc<tokio::sync::Mutex<dyn Pipeline>>;

/// Loads the pipeline; errors come back as text (mistralrs reports them as
/// `anyhow` errors, with their chain of causes).
fn load_pipeline(layout: &Layout, lora: &[String]) -> Result<PipelineHandle, String> {
    let device = mistralrs::best_device(false).map_err(|e| e.to_string())?;
    let mapper = DeviceMapSetting::Auto(AutoDeviceMapParams::default_text());
    let loader = match layout {
        Layout::Gguf(..) if !lora.is_empty() => {
            return Err("LoRA adapters load with a Hugging Face folder, not a GGUF file".into());
        }
        Layout::Gguf(dir, name) => GGUFLoaderBuilder::new(
            None,
            None,
            dir.display().to_string(),
            vec![name.clone()],
            GGUFSpecificConfig { topology: None },
            false,
            None,
        )
        .build(),
        Layout::Hf(dir) => {
            let config = NormalSpecificConfig {
                topology: None,
                organization: IsqOrganization::Default,
                write_uqff: None,
                from_uqff: None,
                imatrix: None,
                calibration_file: None,
                hf_cache_path: None,
                matformer_config_path: None,
                matformer_slice_name: None,
            };
            let mut builder = NormalLoaderBuilder::new(
                config,
                None,
                None,
                Some(dir.display().to_string()),
                false,
                None,
            );
            if !lora.is_empty() {
                builder = builder.with_lora(lora.to_vec());
            }
            builder.build(None).map_err(|e| format!("{e:#}"))?
        }
    };
    let pipeline = loader
        .load_model_from_hf(
            None,
            TokenSource::None,
            &ModelDType::F32,
            &device,
            true,
            mapper,
            None,
            None,
        )
        .map_err(|e| format!("{e:#}"))?;
    Ok(pipeline)
}

impl Peer {
    /// Loads a GGUF file, a folder with `model.gguf` (a `model` stage
    /// artifact, which also holds `source.json`), or a Hugging Face folder
    /// with `config.json`; see the module doc.
    pub fn load(path: &Path) -> Result<Peer, PeerError> {
        Self::load_with(path, NonZeroUsize::MIN, &[])
    }

    /// Loads a Hugging Face folder with PEFT LoRA adapters applied to its
    /// weights, the way mistralrs applies them. mistralrs resolves adapters by
    /// repository id through the Hugging Face cache (`HF_HUB_CACHE`, else
    /// `HF_HOME/hub`, else `~/.cache/huggingface/hub`), never a local path:
    /// put an adapter folder there with [`stage_adapter`] first.
    pub fn load_with_lora(path: &Path, adapter_ids: &[String]) -> Result<Peer, PeerError> {
        Self::load_with(path, NonZeroUsize::MIN, adapter_ids)
    }

    /// [`Peer::load`], with an engine that runs up to `max_seqs` sequences
    /// at once (batching them, at the cost of reproducibility).
    fn load_with(path: &Path, max_seqs: NonZeroUsize, lora: &[String]) -> Result<Peer, PeerError> {
        let layout = layout(path)?;
        let load_error = |message: String| PeerError::Load { path: path.to_path_buf(), message };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("watchfire-peer")
            .enable_all()
            .build()
            .map_err(PeerError::Runtime)?;
        let (model, tokenizer, eos_ids) = runtime.block_on(async {
            let pipeline = load_pipeline(&layout, lora).map_err(load_error)?;
            let (tokenizer, eos_ids) = {
                let guard = pipeline.lock().await;
                let metadata = guard.get_metadata();
                let mut eos_ids = metadata.eos_tok.clone();
                // llguidance ends a constrained generation with its own idea
                // of the end-of-sequence token (`<|endoftext|>` where the
                // tokenizer has one), which need not be the engine's
                // (`<|im_end|>` for a ChatML model): both must stop.
                if let Some(env) = metadata.tok_env() {
                    eos_ids.extend(env.tok_trie().eos_tokens());
                }
                eos_ids.sort_unstable();
                eos_ids.dedup();
                (guard.tokenizer(), eos_ids)
            };
            let scheduler = SchedulerConfig::DefaultScheduler {
                method: DefaultSchedulerMethod::Fixed(max_seqs),
            };
            let runner = MistralRsBuilder::new(pipeline, scheduler, false, None)
                .with_no_prefix_cache(true)
                .build()
                .await;
            Ok::<_, PeerError>((Model::new(runner), tokenizer, eos_ids))
        })?;
        let tokenizer = tokenizer.ok_or_else(|| PeerError::NoTokenizer(path.to_path_buf()))?;
        let vocab_size = tokenizer.get_vocab_size(true);
        let encoder = tokenizer.clone();
        let encode: Encode = Box::new(move |text: &str| {
            encoder.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string())
        });
        let decode: Decode =
            Box::new(move |ids: &[u32]| tokenizer.decode(ids, false).map_err(|e| e.to_string()));
        Ok(Peer { model, runtime, encode, decode, eos_ids, vocab_size, path: path.to_path_buf() })
    }

    /// The token ids that end a chat completion: the engine's
    /// end-of-sequence tokens and llguidance's.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Encodes `text` with the model's tokenizer, adding no special tokens
    /// (special tokens written in the text, like `<|im_start|>`, are kept).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, PeerError> {
        (self.encode)(text).map_err(PeerError::Tokenize)
    }

    /// Decodes token ids, special tokens included.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, PeerError> {
        (self.decode)(ids).map_err(PeerError::Tokenize)
    }

    /// Greedy decoding of `steps` tokens from a raw prompt (no chat
    /// template, no special tokens added); returns the generated token ids
    /// and, per step, the log-probability of the chosen token and the `top_k`
    /// most likely tokens. Generation does not stop at an end-of-sequence
    /// token: exactly `steps` tokens come back.
    pub fn greedy(
        &self,
        prompt: &str,
        steps: usize,
        top_k: usize,
    ) -> Result<PeerGreedy, PeerError> {
        let ids = self.tokenize(prompt)?;
        self.greedy_ids(&ids, steps, top_k)
    }

    /// [`Peer::greedy`] from prompt token ids.
    pub fn greedy_ids(
        &self,
        prompt_ids: &[u32],
        steps: usize,
        top_k: usize,
    ) -> Result<PeerGreedy, PeerError> {
        if prompt_ids.is_empty() {
            return Err(PeerError::Options("the prompt is empty".into()));
        }
        let mut out = PeerGreedy {
            prompt_ids: prompt_ids.to_vec(),
            tokens: Vec::with_capacity(steps),
            logprobs: Vec::with_capacity(steps),
            top: Vec::with_capacity(steps),
        };
        let mut context = prompt_ids.to_vec();
        // mistralrs stops a sequence at an end-of-sequence token; past one,
        // a new request carries on from the whole context.
        while out.tokens.len() < steps {
            let remaining = steps - out.tokens.len();
            let recorder = Arc::new(Recorder::default());
            let sampling =
                SamplingParams { max_len: Some(remaining), ..SamplingParams::deterministic() };
            let processor: Arc<dyn CustomLogitsProcessor> = recorder.clone();
            self.complete_tokens(context.clone(), sampling, processor)?;
            let recorded = std::mem::take(&mut *recorder.steps.lock().expect("not poisoned"));
            if recorded.is_empty() {
                return Err(PeerError::Request("mistralrs generated no token".into()));
            }
            for (i, step) in recorded.iter().enumerate() {
                if step.context_len != context.len() {
                    return Err(PeerError::Request(format!(
                        "step {} saw {} tokens of context, expected {}",
                        out.tokens.len(),
                        step.context_len,
                        context.len()
                    )));
                }
                // The token mistralrs chose ends the next step's context; the
                // last step's is the argmax.
                let chosen = match recorded.get(i + 1) {
                    Some(next) => next.last_token,
                    None => argmax(&step.logits)?,
                };
                let log_probs = log_softmax(&step.logits);
                out.logprobs.push(log_probs[chosen as usize]);
                out.top.push(top_k_of(&log_probs, top_k));
                out.tokens.push(chosen);
                context.push(chosen);
            }
        }
        out.tokens.truncate(steps);
        out.logprobs.truncate(steps);
        out.top.truncate(steps);
        Ok(out)
    }

    /// Chat completion constrained by a JSON schema (llguidance), sampled
    /// with `opts.seed`; returns the text, checked to parse as JSON.
    pub fn complete_json(
        &self,
        messages: &[ChatMessage],
        schema: &serde_json::Value,
        opts: &PeerSampling,
    ) -> Result<String, PeerError> {
        let (text, finish) = self.chat(messages, Constraint::JsonSchema(schema.clone()), opts)?;
        if finish == "length" {
            return Err(PeerError::Truncated { max_tokens: opts.max_tokens, text });
        }
        if let Err(err) = serde_json::from_str::<serde_json::Value>(&text) {
            return Err(PeerError::NotJson { message: err.to_string(), text });
        }
        Ok(text)
    }

    /// Unconstrained chat completion, sampled with `opts.seed`.
    pub fn complete(
        &self,
        messages: &[ChatMessage],
        opts: &PeerSampling,
    ) -> Result<String, PeerError> {
        Ok(self.chat(messages, Constraint::None, opts)?.0)
    }

    /// Sends a chat request; returns the text and mistralrs's finish reason.
    fn chat(
        &self,
        messages: &[ChatMessage],
        constraint: Constraint,
        opts: &PeerSampling,
    ) -> Result<(String, String), PeerError> {
        check_sampling(opts)?;
        if messages.is_empty() {
            return Err(PeerError::Options("no messages".into()));
        }
        let mut request = RequestBuilder::new();
        for message in messages {
            let role = match message.role.as_str() {
                "system" => TextMessageRole::System,
                "user" => TextMessageRole::User,
                "assistant" => TextMessageRole::Assistant,
                "tool" => TextMessageRole::Tool,
                other => TextMessageRole::Custom(other.to_string()),
            };
            request = request.add_message(role, &message.content);
        }
        let sampling = SamplingParams {
            max_len: Some(opts.max_tokens),
            stop_toks: Some(StopTokens::Ids(self.eos_ids.clone())),
            ..SamplingParams::deterministic()
        };
        request = request.set_sampling(sampling).set_constraint(constraint);
        if opts.temperature > 0.0 {
            request = request.add_logits_processor(Arc::new(SeededSampler::new(opts)));
        }
        let response = self
            .runtime
            .block_on(self.model.send_chat_request(request))
            .map_err(|err| PeerError::Request(err.to_string()))?;
        let choice = response
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| PeerError::Request("the response has no choice".into()))?;
        Ok((choice.message.content.unwrap_or_default(), choice.finish_reason))
    }

    /// Sends a completion request for raw token ids and waits for its end.
    fn complete_tokens(
        &self,
        ids: Vec<u32>,
        sampling: SamplingParams,
        processor: Arc<dyn CustomLogitsProcessor>,
    ) -> Result<(), PeerError> {
        self.runtime.block_on(async {
            let rx = self.send_tokens(ids, sampling, Some(vec![processor])).await?;
            completion_done(rx).await
        })
    }

    /// Queues a completion request for raw token ids; the receiver gets its end.
    async fn send_tokens(
        &self,
        ids: Vec<u32>,
        sampling: SamplingParams,
        processors: Option<Vec<Arc<dyn CustomLogitsProcessor>>>,
    ) -> Result<tokio::sync::mpsc::Receiver<Response>, PeerError> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let request = Request::Normal(Box::new(NormalRequest {
            messages: RequestMessage::CompletionTokens(ids),
            sampling_params: sampling,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: 0,
            constraint: Constraint::None,
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: processors,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        }));
        let request_error = |message: String| PeerError::Request(message);
        let sender =
            self.model.inner().get_sender(None).map_err(|e| request_error(e.to_string()))?;
        sender.send(request).await.map_err(|e| request_error(e.to_string()))?;
        Ok(rx)
    }
}

/// Waits for the end of a completion request.
async fn completion_done(mut rx: tokio::sync::mpsc::Receiver<Response>) -> Result<(), PeerError> {
    let request_error = |message: String| Err(PeerError::Request(message));
    match rx.recv().await {
        Some(Response::CompletionDone(_)) => Ok(()),
        Some(Response::InternalError(err) | Response::ValidationError(err)) => {
            request_error(err.to_string())
        }
        Some(Response::CompletionModelError(message, _)) => request_error(message),
        Some(_) => request_error("unexpected response to a completion".into()),
        None => request_error("the engine closed the channel".into()),
    }
}

/// Speed figures of mistralrs on one model, from [`bench`].
#[derive(Debug, Clone, PartialEq)]
pub struct PeerBench {
    /// Seconds from file to a model ready to run (tokenizer included; the
    /// engine's one-token warm-up run too).
    pub load_s: f64,
    /// Prompt tokens per second of one `seq`-token prompt (prefill and one
    /// sampled token; mistralrs computes the last position's logits only).
    pub forward_b1_tok_s: f64,
    /// The same for `batch` such prompts sent together (mistralrs batches
    /// prompts of the same length).
    pub forward_batch_tok_s: f64,
    /// Greedy decode: new tokens per second after a 16-token prompt, the
    /// prompt's time excluded.
    pub decode_tok_s: f64,
}

/// A deterministic stand-in prompt of `len` ordinary tokens (the same as
/// `watchfire bench model` feeds watchfire's model).
fn bench_prompt(len: usize, vocab: usize, row: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(2000).max(1);
    (0..len).map(|i| (1000 + (i * 31 + row * 17) % span) as u32).collect()
}

/// Times mistralrs on the model at `path` (see [`PeerBench`]); each forward
/// figure is the best of `runs`. The engine runs up to `batch` sequences at
/// once here.
pub fn bench(
    path: &Path,
    seq: usize,
    batch: usize,
    new_tokens: usize,
    runs: usize,
) -> Result<PeerBench, PeerError> {
    if seq == 0 || batch == 0 {
        return Err(PeerError::Options("seq and batch must be at least 1".into()));
    }
    let start = Instant::now();
    let peer = Peer::load_with(path, NonZeroUsize::new(batch).unwrap_or(NonZeroUsize::MIN), &[])?;
    let load_s = start.elapsed().as_secs_f64();
    let vocab = peer.vocab_size;

    let forward = |rows: usize| -> Result<f64, PeerError> {
        let mut best = f64::INFINITY;
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            peer.runtime.block_on(async {
                let mut pending = Vec::with_capacity(rows);
                for row in 0..rows {
                    let sampling =
                        SamplingParams { max_len: Some(1), ..SamplingParams::deterministic() };
                    pending.push(
                        peer.send_tokens(bench_prompt(seq, vocab, row), sampling, None).await?,
                    );
                }
                for rx in pending {
                    completion_done(rx).await?;
                }
                Ok::<_, PeerError>(())
            })?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok((rows * seq) as f64 / best)
    };
    let forward_b1_tok_s = forward(1)?;
    let forward_batch_tok_s = forward(batch)?;

    let timer = Arc::new(StepTimer::default());
    let sampling =
        SamplingParams { max_len: Some(new_tokens + 1), ..SamplingParams::deterministic() };
    let processor: Arc<dyn CustomLogitsProcessor> = timer.clone();
    peer.complete_tokens(bench_prompt(16, vocab, 0), sampling, processor)?;
    let end = Instant::now();
    let steps = timer.steps.lock().expect("not poisoned");
    let decode_tok_s = match steps.first() {
        Some(first) if steps.len() > 1 => {
            (steps.len() - 1) as f64 / end.duration_since(*first).as_secs_f64()
        }
        _ => return Err(PeerError::Request("the decode run generated no token".into())),
    };
    Ok(PeerBench { load_s, forward_b1_tok_s, forward_batch_tok_s, decode_tok_s })
}

/// Notes when each step's logits arrive; changes nothing.
#[derive(Default)]
struct StepTimer {
    steps: Mutex<Vec<Instant>>,
}

impl CustomLogitsProcessor for StepTimer {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        _context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        self.steps.lock().expect("not poisoned").push(Instant::now());
        Ok(logits.clone())
    }
}

fn check_sampling(opts: &PeerSampling) -> Result<(), PeerError> {
    let invalid = |message: String| Err(PeerError::Options(message));
    if opts.max_tokens == 0 {
        return invalid("max_tokens must be at least 1".into());
    }
    if !(opts.temperature.is_finite() && opts.temperature >= 0.0) {
        return invalid(format!("temperature {} is not a number >= 0", opts.temperature));
    }
    if !(opts.top_p > 0.0 && opts.top_p <= 1.0) {
        return invalid(format!("top_p {} is not in (0, 1]", opts.top_p));
    }
    Ok(())
}

/// What [`Recorder`] saw at one step.
struct Step {
    context_len: usize,
    /// The last token of the context: the one chosen at the previous step.
    last_token: u32,
    logits: Vec<f32>,
}

/// Records, at every step, the context and the logits; changes nothing.
#[derive(Default)]
struct Recorder {
    steps: Mutex<Vec<Step>>,
}

impl CustomLogitsProcessor for Recorder {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        let step = Step {
            context_len: context.len(),
            last_token: context.last().copied().unwrap_or(u32::MAX),
            logits: logits.flatten_all()?.to_vec1()?,
        };
        self.steps.lock().expect("not poisoned").push(step);
        Ok(logits.clone())
    }
}

/// Samples the next token with its own seeded RNG and forces mistralrs
/// (which then decodes greedily) to take it: the returned logits are 0 for
/// that token and -inf for every other.
///
/// Under a constraint, mistralrs first checks the token it got against the
/// grammar and, when the grammar forbids it, asks again with the forbidden
/// tokens at -inf; the second draw then samples among the allowed tokens.
/// Overall that is sampling from the allowed tokens' renormalized
/// probabilities.
struct SeededSampler {
    rng: Mutex<ChaCha8Rng>,
    temperature: f64,
    top_p: f64,
}

impl SeededSampler {
    fn new(opts: &PeerSampling) -> Self {
        Self {
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(opts.seed)),
            temperature: opts.temperature,
            top_p: opts.top_p,
        }
    }

    fn sample(&self, logits: &[f32]) -> candle_core::Result<usize> {
        let max =
            logits.iter().copied().filter(|v| v.is_finite()).fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            candle_core::bail!("no token has a finite logit");
        }
        let weight = |v: f32| {
            if v.is_finite() {
                ((f64::from(v) - f64::from(max)) / self.temperature).exp()
            } else {
                0.0
            }
        };
        let weights: Vec<f64> = logits.iter().map(|&v| weight(v)).collect();
        let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0.0).collect();
        if self.top_p < 1.0 {
            order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
            let total: f64 = order.iter().map(|&i| weights[i]).sum();
            let mut kept = 0.0;
            let mut keep = 0;
            for &i in &order {
                kept += weights[i];
                keep += 1;
                if kept >= self.top_p * total {
                    break;
                }
            }
            order.truncate(keep);
        }
        let total: f64 = order.iter().map(|&i| weights[i]).sum();
        let mut target = self.rng.lock().expect("not poisoned").random::<f64>() * total;
        for &i in &order {
            target -= weights[i];
            if target < 0.0 {
                return Ok(i);
            }
        }
        Ok(*order.last().expect("a finite logit"))
    }
}

impl CustomLogitsProcessor for SeededSampler {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        _context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        let values: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let chosen = self.sample(&values)?;
        let mut forced = vec![f32::NEG_INFINITY; values.len()];
        forced[chosen] = 0.0;
        candle_core::Tensor::from_vec(forced, logits.shape(), logits.device())
    }
}

fn argmax(logits: &[f32]) -> Result<u32, PeerError> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            return Err(PeerError::Request(format!("logit {i} is NaN")));
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    let (index, _) = best.ok_or_else(|| PeerError::Request("empty logits".into()))?;
    Ok(index as u32)
}

/// Natural log-softmax, in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&v| f64::from(v) - log_sum).collect()
}

/// The `k` largest entries, largest first (ties by lower id).
fn top_k_of(log_probs: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut order: Vec<usize> = (0..log_probs.len()).collect();
    let k = k.min(order.len());
    if k == 0 {
        return Vec::new();
    }
    let by_value = |a: &usize, b: &usize| log_probs[*b].total_cmp(&log_probs[*a]).then(a.cmp(b));
    order.select_nth_unstable_by(k - 1, by_value);
    order.truncate(k);
    order.sort_by(by_value);
    order.into_iter().map(|i| (i as u32, log_probs[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_top_k() {
        let lp = log_softmax(&[1.0, 3.0, 2.0, 3.0]);
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        let top = top_k_of(&lp, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 2]);
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]).unwrap(), 1);
    }

    #[test]
    fn seeded_sampler_is_reproducible_and_respects_top_p() {
        let logits = [0.0f32, 1.0, 2.0, f32::NEG_INFINITY, 0.5];
        let opts = PeerSampling { temperature: 1.0, top_p: 1.0, seed: 7, ..Default::default() };
        let draw = |opts: &PeerSampling| {
            let sampler = SeededSampler::new(opts);
            (0..200).map(|_| sampler.sample(&logits).unwrap()).collect::<Vec<_>>()
        };
        let a = draw(&opts);
        assert_eq!(a, draw(&opts));
        assert!(!a.contains(&3), "a -inf logit is never drawn");
        assert!([0, 1, 2, 4].iter().all(|t| a.contains(t)));
        assert_ne!(a, draw(&PeerSampling { seed: 8, ..opts.clone() }));

        // p = softmax: 2 -> 0.58, 1 -> 0.21; top_p 0.6 keeps exactly {2, 1}.
        let nucleus = draw(&PeerSampling { top_p: 0.6, ..opts.clone() });
        assert!(nucleus.iter().all(|t| [1, 2].contains(t)));
        assert!(nucleus.contains(&1) && nucleus.contains(&2));
    }
}
