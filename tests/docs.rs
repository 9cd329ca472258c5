//! Generated files stay in sync with the code. Set `WATCHFIRE_BLESS=1` to
//! rewrite them.

use std::path::Path;

fn check(path: &str, expected: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var_os("WATCHFIRE_BLESS").is_some() {
        std::fs::write(&path, expected).unwrap();
        return;
    }
    let found = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        found == expected,
        "{} is stale; regenerate it with `WATCHFIRE_BLESS=1 cargo test --test docs`",
        path.display()
    );
}

#[test]
fn recipe_schema_is_current() {
    let schema = watchfire::recipe::json_schema();
    let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
    check("recipes/recipe.schema.json", &text);
}

#[test]
fn recipe_reference_is_current() {
    check("book/src/reference.md", &watchfire::reference::markdown());
}

/// Every recipe in the repository and in the book.
fn all_recipes() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["recipes", "book/src/recipes"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn recipes_validate_against_the_schema() {
    let schema = watchfire::recipe::json_schema();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let recipes = all_recipes();
    assert!(!recipes.is_empty());
    for recipe in recipes {
        let text = std::fs::read_to_string(&recipe).unwrap();
        let value: serde_json::Value = serde_yaml::from_str(&text).unwrap();
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", recipe.display());
    }
}
