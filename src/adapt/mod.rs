//! The adaptation method: what turns a synthetic corpus into a model adapted
//! to public-safety text.
//!
//! - [`tasks`] turns annotated reports into examples for three subtasks;
//! - [`batch`] tokenizes examples and pads them into batches;
//! - [`probe`] scores attention heads by gradient magnitude and picks a mask;
//! - [`lora`] is LoRA restricted to a mask's heads, [`prefix`] the
//!   per-subtask key/value prefixes;
//! - [`contrastive`] is the span-level InfoNCE term, [`optim`] AdamW and the
//!   schedule, [`train`] the loop that ties them together;
//! - [`export`] writes adapters in the PEFT layout and merges them.
//!
//! As with `crate::synth`, the stage kinds in `crate::stages` are thin
//! wrappers that read and write files around these functions.

pub mod batch;
pub mod contrastive;
pub mod export;
pub mod lora;
pub mod optim;
pub mod prefix;
pub mod probe;
pub mod tasks;
pub mod testkit;
pub mod train;
