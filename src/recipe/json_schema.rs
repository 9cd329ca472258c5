//! The JSON schema of recipes, generated from the recipe types and from
//! every stage kind's params, so editors can validate and complete recipes.

use serde_json::{Map, Value, json};

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
    for (_, params) in &params_refs {
        if let Some(name) = params.get("$ref").and_then(Value::as_str) {
            let pointer = name.trim_start_matches('#').to_string();
            if let Some(Value::Object(def)) = root.pointer_mut(&pointer) {
                allow_interpolation(def);
            }
        }
    }
    root["$defs"]["Interpolation"] = json!({
        "description": "A reference to a recipe param, resolved before hashing.",
        "type": "string",
        "pattern": "\\$\\{params\\.[^}]+\\}"
    });
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

/// Lets every property of a params object also be `${params.NAME}`.
fn allow_interpolation(def: &mut Map<String, Value>) {
    let Some(Value::Object(properties)) = def.get_mut("properties") else { return };
    for property in properties.values_mut() {
        let Value::Object(original) = std::mem::take(property) else { continue };
        let mut wrapped = Map::new();
        let mut inner = original;
        for key in ["description", "default"] {
            if let Some(value) = inner.remove(key) {
                wrapped.insert(key.to_string(), value);
            }
        }
        wrapped.insert(
            "anyOf".to_string(),
            json!([Value::Object(inner), { "$ref": "#/$defs/Interpolation" }]),
        );
        *property = Value::Object(wrapped);
    }
}
