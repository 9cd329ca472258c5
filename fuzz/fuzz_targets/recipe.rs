//! Parses and resolves arbitrary UTF-8 as a recipe: any outcome but a panic
//! (or a hang) is fine.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use watchfire::recipe::{LoadOptions, parse, resolve};

/// A project folder with a data file, so path inputs can resolve too.
fn recipe_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = std::env::temp_dir().join("watchfire-fuzz-project");
        std::fs::create_dir_all(dir.join("data")).expect("project folder");
        std::fs::write(dir.join("watchfire.toml"), "").expect("watchfire.toml");
        std::fs::write(dir.join("data/seed.jsonl"), "{}\n").expect("seed file");
        dir.join("recipe.yaml")
    })
}

fuzz_target!(|text: &str| {
    if let Ok(parsed) = parse(text, "fuzz.yaml") {
        let _ = resolve(parsed, recipe_path(), &LoadOptions::default());
    }
});
