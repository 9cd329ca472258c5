//! The recipe's entity schema: which entity types exist and which of them
//! carry key (safety-relevant) information.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether an entity type is a key fact or a peripheral detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntityRole {
    /// Facts a responder must not lose: time, place, casualties, hazards.
    Key,
    /// Context that may be dropped or paraphrased: weather, remarks.
    Peripheral,
}

/// Entity type name -> role, as declared under `schema:` in a recipe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct EntitySchema(pub BTreeMap<String, EntityRole>);

impl EntitySchema {
    pub fn role(&self, entity_type: &str) -> Option<EntityRole> {
        self.0.get(entity_type).copied()
    }

    pub fn is_key(&self, entity_type: &str) -> bool {
        self.role(entity_type) == Some(EntityRole::Key)
    }

    pub fn contains(&self, entity_type: &str) -> bool {
        self.0.contains_key(entity_type)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn types(&self) -> impl Iterator<Item = (&str, EntityRole)> {
        self.0.iter().map(|(name, role)| (name.as_str(), *role))
    }
}
