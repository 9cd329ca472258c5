//! The stage kinds a recipe can name. One file per kind, named as in YAML.

use crate::stage::StageKind;

/// Every kind, in the order the recipe reference lists them.
pub static ALL: &[&dyn StageKind] = &[];
