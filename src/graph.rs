//! `watchfire graph`: a recipe's stage instances and input files as DOT or
//! Mermaid text.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::recipe::{InputBinding, Recipe};

/// Renders the DAG in Graphviz DOT.
pub fn to_dot(recipe: &Recipe) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph {} {{", quote(&recipe.name));
    out.push_str("  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    let files = file_nodes(recipe);
    for (display, id) in &files {
        let _ = writeln!(out, "  {id} [label={}, shape=note];", quote(display));
    }
    for (index, instance) in recipe.instances.iter().enumerate() {
        let label = format!("{}\n{}", instance.name, instance.kind.kind());
        let _ = writeln!(out, "  s{index} [label={}];", quote(&label));
    }
    for (from, to, slot) in edges(recipe, &files) {
        let _ = writeln!(out, "  {from} -> s{to} [label={}];", quote(slot));
    }
    out.push_str("}\n");
    out
}

/// Renders the DAG as a Mermaid flowchart.
pub fn to_mermaid(recipe: &Recipe) -> String {
    let mut out = String::from("flowchart LR\n");
    let files = file_nodes(recipe);
    for (display, id) in &files {
        let _ = writeln!(out, "  {id}[/\"{}\"/]", display.replace('"', "'"));
    }
    for (index, instance) in recipe.instances.iter().enumerate() {
        let _ =
            writeln!(out, "  s{index}[\"{}<br/><i>{}</i>\"]", instance.name, instance.kind.kind());
    }
    for (from, to, slot) in edges(recipe, &files) {
        let _ = writeln!(out, "  {from} -->|{slot}| s{to}");
    }
    out
}

/// Every edge: source node id, target instance index, input slot.
fn edges<'a>(
    recipe: &'a Recipe,
    files: &BTreeMap<String, String>,
) -> Vec<(String, usize, &'a str)> {
    let mut out = Vec::new();
    for (index, instance) in recipe.instances.iter().enumerate() {
        for (slot, binding) in &instance.inputs {
            let from = match binding {
                InputBinding::Stage { instance, .. } => format!("s{instance}"),
                InputBinding::Path { display, .. } => files[display].clone(),
            };
            out.push((from, index, slot.as_str()));
        }
    }
    out
}

/// One node id per distinct input path, in name order.
fn file_nodes(recipe: &Recipe) -> BTreeMap<String, String> {
    let mut names: Vec<&String> = recipe
        .instances
        .iter()
        .flat_map(|instance| instance.inputs.values())
        .filter_map(|binding| match binding {
            InputBinding::Path { display, .. } => Some(display),
            InputBinding::Stage { .. } => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names.into_iter().enumerate().map(|(i, name)| (name.clone(), format!("f{i}"))).collect()
}

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}
