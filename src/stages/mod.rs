//! The stage kinds a recipe can name. One file per kind, named as in YAML.

pub mod detail;
pub mod eval;
pub mod filter;
pub mod merge;
pub mod model;
pub mod perplexity;
pub mod probe;
pub mod report;
pub mod scene;
pub mod seed;
pub mod tasks;
pub mod train;

use crate::stage::{Erased, StageKind};

/// Every kind, in the order the recipe reference lists them.
pub static ALL: &[&dyn StageKind] = &[
    &Erased::<seed::Seed>::NEW,
    &Erased::<scene::Scene>::NEW,
    &Erased::<detail::Detail>::NEW,
    &Erased::<filter::Filter>::NEW,
    &Erased::<tasks::Tasks>::NEW,
    &Erased::<model::Model>::NEW,
    &Erased::<perplexity::Perplexity>::NEW,
    &Erased::<probe::Probe>::NEW,
    &Erased::<train::Train>::NEW,
    &Erased::<merge::Merge>::NEW,
    &Erased::<eval::Eval>::NEW,
    &Erased::<report::Report>::NEW,
];
