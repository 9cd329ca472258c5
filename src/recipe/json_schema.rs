//! The JSON schema of recipes, generated from the recipe types and from
//! every stage kind's params, so editors can validate and complete recipes.

use serde_json::{Value, json};

use super::RecipeFile;
use crate::stage::registry;

/// The schema (JSON Schema draft 2020-12). `recipes/recipe.schema.json` is
/// this value, pretty-printed; a test fails when the file is stale.
pub fn json_schema() -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let mut params_refs = Vec::new();
    for kind in registry() {
        let schema = kind.params_schema(&mut generator);
        params_refs.push((kind.kind(), schema.to_value()));
    }
    let mut root = generator.root_schema_for::<RecipeFile>().to_value();
    let kinds: Vec<&str> = registry().iter().map(|k| k.kind()).collect();
    let conditions: Vec<Value> = params_refs
        .into_iter()
        .map(|(kind, params)| {
            json!({
                "if": { "properties": { "kind": { "const": kind } } },
                "then": { "properties": { "params": params } }
            })
        })
        .collect();
    if let Some(stage) = root.pointer_mut("/$defs/StageDecl") {
        stage["properties"]["kind"]["enum"] = json!(kinds);
        stage["allOf"] = Value::Array(conditions);
    }
    root
}
