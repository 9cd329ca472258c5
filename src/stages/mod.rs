//! The stage kinds a recipe can name. One file per kind, named as in YAML.

pub mod detail;
pub mod filter;
pub mod model;
pub mod scene;
pub mod seed;

use crate::stage::{Erased, StageKind};

/// Every kind, in the order the recipe reference lists them.
pub static ALL: &[&dyn StageKind] = &[
    &Erased::<seed::Seed>::NEW,
    &Erased::<scene::Scene>::NEW,
    &Erased::<detail::Detail>::NEW,
    &Erased::<filter::Filter>::NEW,
    &Erased::<model::Model>::NEW,
];
