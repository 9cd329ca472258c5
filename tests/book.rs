//! The book's recipes, run the way its pages run them. The walkthrough's
//! `console` blocks are replayed in order and compared with the real output
//! (hashes, times, sizes and the project path filtered out); the figures and
//! examples of the synthetic-data page are recomputed from real runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::{Project, filtered, repo};
use serde_json::Value;

const WALKTHROUGH: &str = "book/src/walkthrough.md";
const SYNTHETIC: &str = "book/src/synthetic-data.md";
/// The project folder the walkthrough's outputs were recorded in.
const DOC_PROJECT: &str = "/tmp/fire";

fn page(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap()
}

/// Text with every run of whitespace made one space, so wrapping does not matter.
fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn book_recipe(name: &str) -> String {
    std::fs::read_to_string(repo().join("book/src/recipes").join(name)).unwrap()
}

/// A project with the bundled seed and copies of some book recipes in `recipes/`.
fn project_with(names: &[&str]) -> Project {
    let project = Project::new();
    for name in names {
        project.write(&format!("recipes/{name}"), &book_recipe(name));
    }
    project
}

/// Fenced blocks of one language: their text without the fences.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let open = format!("```{lang}");
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match &mut current {
            None if line.trim_end() == open => current = Some(String::new()),
            Some(block) if line.starts_with("```") => {
                out.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

/// The block of `lang` whose first line starts with `first`.
fn block_starting(text: &str, lang: &str, first: &str) -> String {
    let found = blocks(text, lang).into_iter().find(|b| b.starts_with(first));
    found.unwrap_or_else(|| panic!("no {lang} block starting with {first:?}"))
}

/// What a command printed: stdout, then stderr when it failed.
fn shown(out: &std::process::Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    text
}

/// A page's `console` blocks, replayed in order against a project.
struct Transcript {
    blocks: Vec<(String, String)>,
    next: usize,
}

impl Transcript {
    fn of(rel: &str) -> Self {
        let blocks = blocks(&page(rel), "console")
            .into_iter()
            .map(|block| {
                let (command, output) = block.split_once('\n').unwrap_or((&block, ""));
                let command = command.strip_prefix("$ ").expect("a console block starts with `$ `");
                (command.to_string(), output.to_string())
            })
            .collect();
        Self { blocks, next: 0 }
    }

    /// The next block, which must show `command`.
    fn take(&mut self, command: &str) -> String {
        let (shown, output) = self.blocks.get(self.next).cloned().unwrap_or_default();
        assert_eq!(shown, command, "block {} of {WALKTHROUGH}", self.next + 1);
        self.next += 1;
        output
    }

    /// Runs the next block's `watchfire` command and compares its output.
    fn run(&mut self, project: &Project, command: &str) -> std::process::Output {
        let expected = self.take(command);
        let args: Vec<&str> = command.strip_prefix("watchfire ").unwrap().split(' ').collect();
        let out = project.run(&args);
        let expected = expected.replace(DOC_PROJECT, &project.path().to_string_lossy());
        assert_eq!(
            filtered(shown(&out).trim_end(), project),
            filtered(expected.trim_end(), project),
            "`{command}` prints something else than {WALKTHROUGH} shows"
        );
        out
    }

    fn finish(self) {
        assert_eq!(self.next, self.blocks.len(), "console blocks left unchecked");
    }
}

/// The artifact folder of a stage instance.
fn artifact(project: &Project, recipe: &str, stage: &str) -> PathBuf {
    project.artifact(recipe, stage)
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn jsonl_file(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn has_row(table: &str, stage: &str, kind: &str, status: &str) -> bool {
    let stage = regex_lite::escape(stage);
    let re = regex_lite::Regex::new(&format!(r"(?m)^{stage}\s+{kind}\s+{status}\b")).unwrap();
    re.is_match(table)
}

#[test]
fn pages_include_existing_recipes_and_every_recipe_is_included() {
    let re = regex_lite::Regex::new(r"\{\{#include (recipes/[^}:]+)\}\}").unwrap();
    let mut included = BTreeSet::new();
    for rel in [WALKTHROUGH, SYNTHETIC] {
        for caps in re.captures_iter(&page(rel)) {
            let path = repo().join("book/src").join(&caps[1]);
            assert!(path.is_file(), "{rel} includes {}, which does not exist", &caps[1]);
            included.insert(caps[1].trim_start_matches("recipes/").to_string());
        }
    }
    let dir = repo().join("book/src/recipes");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(included.contains(&name), "book/src/recipes/{name} is not included by any page");
    }
}

#[test]
fn the_walkthrough_runs_as_written() {
    let project = project_with(&["first.yaml"]);
    let mut t = Transcript::of(WALKTHROUGH);
    let first = "recipes/first.yaml";

    t.run(&project, "watchfire run recipes/first.yaml");
    assert!(project.path().join("recipes/first.lock").is_file());
    assert!(project.path().join("cache").is_dir());
    t.run(&project, "watchfire run recipes/first.yaml");

    project.edit(first, "templates_per_scene: 40", "templates_per_scene: 60");
    let plan = t.run(&project, "watchfire plan recipes/first.yaml");
    let plan = String::from_utf8(plan.stdout).unwrap();
    assert!(has_row(&plan, "scene", "scene", "run"), "{plan}");
    assert!(plan.contains("param `templates_per_scene` 40 -> 60"), "{plan}");
    assert!(plan.contains("waits on `scene` (cached if its output is unchanged)"), "{plan}");
    assert_eq!(project.ok(&["run", "-n", first]), plan, "`run -n` prints the plan");
    let run = t.run(&project, "watchfire run recipes/first.yaml");
    let run = String::from_utf8(run.stdout).unwrap();
    assert!(has_row(&run, "seed", "seed", "cached"), "{run}");

    early_cutoff(&project, &mut t);
    show_and_report(&project, &mut t);
    t.run(&project, "watchfire graph recipes/first.yaml --format mermaid");
    variants(&project, &mut t);
    very_verbose(&project);
    failing_stage(&project, &mut t);
    t.finish();
}

fn early_cutoff(project: &Project, t: &mut Transcript) {
    t.take("echo >> recipes/data/seed.jsonl");
    let seed = project.read("recipes/data/seed.jsonl");
    project.write("recipes/data/seed.jsonl", &format!("{seed}\n"));
    let plan = t.run(project, "watchfire plan recipes/first.yaml");
    let plan = String::from_utf8(plan.stdout).unwrap();
    assert!(plan.contains("file `recipes/data/seed.jsonl` changed"), "{plan}");
    let run = t.run(project, "watchfire run recipes/first.yaml");
    let run = String::from_utf8(run.stdout).unwrap();
    assert!(has_row(&run, "seed", "seed", "ran"), "{run}");
    for stage in ["scene", "detail", "filter"] {
        assert!(has_row(&run, stage, stage, "cached"), "{run}");
    }
}

fn show_and_report(project: &Project, t: &mut Transcript) {
    t.run(project, "watchfire show filter");
    let out = artifact(project, "recipes/first.yaml", "filter");
    let report = std::fs::read_to_string(out.join("report.json")).unwrap();
    let text = page(WALKTHROUGH);
    let shown = block_starting(&text, "text", "$ cat ");
    for line in shown.lines().skip(1).filter(|l| l.trim() != "...") {
        assert!(report.contains(line), "report.json lacks {line:?}:\n{report}");
    }
    let parsed: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(parsed["input"], 500);
    let dropped = std::fs::read_to_string(out.join("dropped.jsonl")).unwrap();
    let first = dropped.lines().next().unwrap();
    assert!(text.contains(first), "the walkthrough should show {first}");
}

fn variants(project: &Project, t: &mut Transcript) {
    project.write("recipes/variants.yaml", &book_recipe("variants.yaml"));
    let plan = t.run(project, "watchfire plan recipes/variants.yaml");
    let plan = String::from_utf8(plan.stdout).unwrap();
    let seeds = plan.lines().filter(|l| l.starts_with("seed ") || l.starts_with("seed@")).count();
    assert_eq!(seeds, 1, "one `seed` shared by every variant:\n{plan}");
    assert!(!plan.contains("detail@copy"), "the copy variants share `detail`:\n{plan}");
    assert!(!plan.contains("max_copied_ngram=20"), "a variant equal to the default adds nothing");
    t.run(project, "watchfire run recipes/variants.yaml");
}

fn very_verbose(project: &Project) {
    let first = "recipes/first.yaml";
    project.edit(first, "records: 500", "records: 1000");
    let out = project.run(&["run", first, "-vv"]);
    assert!(out.status.success());
    let stderr = filtered(&String::from_utf8_lossy(&out.stderr), project);
    let stdout = filtered(&String::from_utf8_lossy(&out.stdout), project);
    let shown =
        block_starting(&page(WALKTHROUGH), "text", "$ watchfire run recipes/first.yaml -vv");
    let key_json: String = shown
        .lines()
        .skip_while(|l| !l.starts_with("key of `detail`"))
        .take_while(|l| !l.contains("INFO"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(key_json.contains("\"count\": 1000"), "{key_json}");
    assert!(stderr.contains(&filtered(&key_json, project)), "{stderr}");
    let table: Vec<&str> = shown.lines().skip_while(|l| !l.starts_with("stage ")).collect();
    assert_eq!(stdout.trim_end(), filtered(&table.join("\n"), project));
}

fn failing_stage(project: &Project, t: &mut Transcript) {
    project.write("recipes/failing.yaml", &book_recipe("failing.yaml"));
    let county = blocks(&page(WALKTHROUGH), "json").remove(0);
    project.write("recipes/data/county.jsonl", &county);
    let out = t.run(project, "watchfire run recipes/failing.yaml");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(has_row(&stdout, "county", "seed", "failed"), "{stdout}");
    assert!(has_row(&stdout, "county_scene", "scene", "skipped"), "{stdout}");
    assert!(stdout.contains("skipped (county failed)"), "{stdout}");
    assert!(has_row(&stdout, "city_scene", "scene", "ran"), "{stdout}");

    project.edit("recipes/data/county.jsonl", "\"end\": 34", "\"end\": 31");
    let out = t.run(project, "watchfire run recipes/failing.yaml");
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(has_row(&stdout, "city_scene", "scene", "cached"), "{stdout}");
}

#[test]
fn changing_a_param_back_finds_every_stage_cached() {
    let project = project_with(&["first.yaml"]);
    let first = "recipes/first.yaml";
    project.ok(&["run", first]);
    project.edit(first, "templates_per_scene: 40", "templates_per_scene: 60");
    project.ok(&["run", first]);
    project.edit(first, "templates_per_scene: 60", "templates_per_scene: 40");
    let run = project.ok(&["run", first]);
    assert!(run.contains("nothing to do, all 4 stages cached"), "{run}");
}

#[test]
fn seed_errors_name_the_file_and_line() {
    let good = r#"{"id": "county-001", "scene": "structure_fire", "text": "Barn fire on Mill Lane at 14:05.", "entities": [{"type": "location", "start": 13, "end": 22}, {"type": "time", "start": 26, "end": 31}]}"#;
    let cases = [
        good.replace("\"end\": 31", "\"end\": 34"),
        format!(
            "{good}\n{}",
            r#"{"id": "county-002", "scene": "structure_fire", "text": "Shed fire at 9:10 p.m.", "entities": [{"type": "time", "start": 13, "end": 22, "value": "9:10 pm"}]}"#
        ),
        format!("{good}\n{}", r#"{"id": "county-001", "scene": "structure_fire", "text": "x"}"#),
        format!(
            "{good}\n{}",
            r#"{"id": "county-004", "scene": "fire", "text": "Shed fire at 9:10 p.m.", "entities": [{"type": "time", "start": 13, "end": 22}, {"type": "time", "start": 18, "end": 20}]}"#
        ),
        format!("{good}\n{}", r#"{"id": "county-003", "text": "Shed fire", "entities": []}"#),
    ];
    let text = flat(&page(SYNTHETIC));
    let project = project_with(&["failing.yaml"]);
    for (n, lines) in cases.iter().enumerate() {
        project.write("recipes/data/county.jsonl", &format!("{lines}\n"));
        let out = project.run(&["run", "recipes/failing.yaml", "-q"]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr.lines().find(|l| l.starts_with("error: ")).unwrap();
        let error = error.replace(&*project.path().to_string_lossy(), DOC_PROJECT);
        if n < 4 {
            assert!(text.contains(&error), "{SYNTHETIC} should show {error}");
        } else {
            let tail = error.rsplit("/recipes/data/").next().unwrap();
            assert!(text.contains(tail), "{SYNTHETIC} should show {tail}");
        }
    }
}

/// Distinct values per entity type, and how many spans there are.
fn values(records: &[Value]) -> BTreeMap<String, (BTreeSet<String>, usize)> {
    let mut out: BTreeMap<String, (BTreeSet<String>, usize)> = BTreeMap::new();
    for record in records {
        let text: Vec<char> = record["text"].as_str().unwrap().chars().collect();
        for e in record["entities"].as_array().unwrap() {
            let (start, end) = (e["start"].as_u64().unwrap(), e["end"].as_u64().unwrap());
            let span: String = text[start as usize..end as usize].iter().collect();
            if let Some(value) = e["value"].as_str() {
                assert_eq!(value, span, "a span slices out its value");
            }
            let entry = out.entry(e["type"].as_str().unwrap().to_string()).or_default();
            entry.0.insert(span);
            entry.1 += 1;
        }
    }
    out
}

/// The row of the figures table for one variant's `report.json`.
fn figures_row(label: &str, report: &Value) -> String {
    let dropped = &report["dropped"];
    let consistency: u64 = ["copied_ngram", "near_duplicate"].iter().fold(
        dropped.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum(),
        |sum, r| sum - dropped[r].as_u64().unwrap(),
    );
    format!(
        "| {label} | {} | {} | {consistency} | {} | {} | {} | {} | {} |",
        report["input"],
        report["kept"],
        dropped["copied_ngram"],
        dropped["near_duplicate"],
        report["diversity"]["tokens"],
        report["diversity"]["distinct_2"],
        report["templates"]["distinct"],
    )
}

#[test]
fn synthetic_data_figures_and_example_match_the_page() {
    let project = project_with(&["synthetic.yaml"]);
    let recipe = "recipes/synthetic.yaml";
    let run = project.ok(&["run", recipe]);
    assert!(!run.contains("scene@private"), "`dp_epsilon` does not reach `scene`:\n{run}");
    let page_text = page(SYNTHETIC);
    let text = flat(&page_text);
    let report = |stage: &str| json_file(&artifact(&project, recipe, stage).join("report.json"));
    for (label, stage) in [
        ("default (hierarchical)", "filter"),
        ("flat", "filter@flat"),
        ("private (`dp_epsilon: 1.0`)", "filter@private"),
        ("small (hierarchical)", "filter@small"),
    ] {
        let row = figures_row(label, &report(stage));
        assert!(text.contains(&row), "{SYNTHETIC} should have the row\n{row}");
    }
    let flat = &report("filter@flat")["dropped"];
    let breakdown = format!(
        "{} are `time_mismatch`, {} `vehicle_scene`, {} `injured_severity` and {} `fatality_severity`",
        flat["time_mismatch"],
        flat["vehicle_scene"],
        flat["injured_severity"],
        flat["fatality_severity"]
    );
    assert!(text.contains(&breakdown), "{SYNTHETIC} should say {breakdown}");

    let corpus = |stage: &str| jsonl_file(&artifact(&project, recipe, stage).join("corpus.jsonl"));
    let kept = corpus("filter");
    for record in &kept {
        assert_eq!(record["synthetic"], true);
        assert!(!record["provenance"]["seed_ids"].as_array().unwrap().is_empty());
    }
    privacy_claims(&project, &text, &kept, &corpus("filter@private"));
    worked_example(&project, &page_text, &kept);
}

fn privacy_claims(project: &Project, text: &str, kept: &[Value], private: &[Value]) {
    let seed = values(&jsonl_file(&project.path().join("recipes/data/seed.jsonl")));
    let (kept, private) = (values(kept), values(private));
    let remarks = format!(
        "{} of the seed's {} distinct witness remarks still appear in the kept corpus (against {}",
        private["witness_remark"].0.len(),
        seed["witness_remark"].0.len(),
        kept["witness_remark"].0.len()
    );
    assert!(text.contains(&remarks), "{SYNTHETIC} should say {remarks}");
    let vehicles =
        format!("{} of {} vehicle values", private["vehicle"].0.len(), seed["vehicle"].0.len());
    assert!(text.contains(&vehicles), "{SYNTHETIC} should say {vehicles}");
    for kind in ["vehicle", "weapon", "witness_remark"] {
        assert!(kept[kind].0.is_subset(&seed[kind].0), "every {kind} is a seed value");
    }
    let (locations, spans) = &kept["location"];
    let copied = kept_spans_from_seed(project, &seed["location"].0);
    let places = format!("{copied} of {spans} place spans");
    assert!(text.contains(&places), "{SYNTHETIC} should say {places}");
    assert!(locations.len() > 1);

    let usable = |stage: &str| {
        let stats =
            json_file(&artifact(project, "recipes/synthetic.yaml", stage).join("stats.json"));
        stats["usable_templates"].as_u64().unwrap()
    };
    let templates =
        format!("left {} of {} templates usable", usable("detail@private"), usable("detail"));
    assert!(text.contains(&templates), "{SYNTHETIC} should say {templates}");
}

/// Location spans of the default corpus whose text is a seed value.
fn kept_spans_from_seed(project: &Project, seed: &BTreeSet<String>) -> usize {
    let corpus = artifact(project, "recipes/synthetic.yaml", "filter").join("corpus.jsonl");
    jsonl_file(&corpus)
        .iter()
        .flat_map(|r| r["entities"].as_array().unwrap().clone())
        .filter(|e| e["type"] == "location" && seed.contains(e["value"].as_str().unwrap()))
        .count()
}

/// The page's JSON examples are a real seed report, template and record.
fn worked_example(project: &Project, text: &str, kept: &[Value]) {
    let shown: Vec<Value> =
        blocks(text, "json").iter().map(|b| serde_json::from_str(b).unwrap()).collect();
    assert_eq!(shown.len(), 3, "a seed report, a template and a record");
    let seed = jsonl_file(&project.path().join("recipes/data/seed.jsonl"));
    assert_eq!(shown[0], seed[0]);

    let scene = artifact(project, "recipes/synthetic.yaml", "scene");
    let templates = jsonl_file(&scene.join("templates.jsonl"));
    assert!(templates.contains(&shown[1]), "no template {}", shown[1]["id"]);

    let without_key = |mut record: Value| {
        record["provenance"].as_object_mut().unwrap().remove("stage_key");
        record
    };
    let record = without_key(shown[2].clone());
    assert!(kept.iter().any(|r| without_key(r.clone()) == record), "no record {}", record["id"]);
    assert_eq!(record["provenance"]["template_id"], shown[1]["id"]);
}

const SAFENET_CSV: &str = "\"ID\", \"SAFENET ID\", \"Event Start Date\", \"Incident Name\", \
    \"Event State\", \"Event Jurisdiction\", \"Event Resources\", \"Event Incident Type\", \
    \"Event Incident Activity\", \"Event Incident Stage\", \"Narrative\"\n\
    \"1\",\"A1\",\"12/12/2005 14:00\",\"TWEEDY COMPLEX (REHAB)\",\"AZ\",\"BLM\",\"Chase Truck, Engine\",\
    \"Wildland;\",\"Line;\",\"Extended;\",\"On the Tweedy Complex in Arizona the engine crew lost radio \
    contact. The chase truck relayed traffic until the repeater came back.\"\n\
    \"2\",\"A2\",\"07/01/2006 09:00\",\"BIG BAR\",\"CA\",\"USFS\",\"Engine, Crew Buggy\",\"Wildland;\",\
    \"Line;\",\"Initial Attack;\",\"During initial attack on Big Bar the engine backed into a ditch. \
    Nobody was hurt and the crew buggy towed it out.\"\n\
    \"3\",\"A3\",\"08/15/2007 16:30\",\"RIDGE\",\"OR\",\"BLM\",\"Helicopter\",\"Wildland;\",\"Line;\",\
    \"Extended;\",\"The helicopter dropped water on the Ridge fire in Oregon. A bucket line snapped.\"\n";

const IDRISI_JSONL: &str = concat!(
    r#"{"tweet_id": "1", "text": "Flooding on Main Street in Houston, stay away", "humAID_class": "caution_and_advice", "location_mentions": [{"text": "Main Street", "type": "Street/road", "start_offset": 12, "end_offset": 23}, {"text": "Houston", "type": "City/town", "start_offset": 27, "end_offset": 34}]}"#,
    "\n",
    r#"{"tweet_id": "2", "text": "Shelters open in Beaumont and Orange tonight", "humAID_class": "caution_and_advice", "location_mentions": [{"text": "Beaumont", "type": "City/town", "start_offset": 17, "end_offset": 25}, {"text": "Orange", "type": "City/town", "start_offset": 30, "end_offset": 36}]}"#,
    "\n",
    r#"{"tweet_id": "3", "text": "Roads closed near Katy after the storm", "humAID_class": "caution_and_advice", "location_mentions": [{"text": "Katy", "type": "City/town", "start_offset": 18, "end_offset": 22}]}"#,
    "\n",
);

#[test]
fn real_formats_are_read_from_a_data_root_outside_the_project() {
    // The layout the page describes: the project in `main/`, the data in `shared/data/`.
    let outer = Project::new();
    outer.write("main/watchfire.toml", "");
    outer.write("shared/data/safenet/SAFENET_2005.csv", SAFENET_CSV);
    outer.write("shared/data/idrisi/harvey_2017_train.jsonl", IDRISI_JSONL);
    let main = outer.path().join("main");
    for name in ["safenet.yaml", "idrisi.yaml"] {
        outer.write(&format!("main/recipes/{name}"), &book_recipe(name));
        let recipe = format!("recipes/{name}");
        let refused = outer.command(&["run", &recipe]).current_dir(&main).output().unwrap();
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains("is outside the project"), "{stderr}");
        assert!(stderr.contains("--data-root"), "{stderr}");

        let args = ["run", &recipe, "--data-root", "../shared/data"];
        let out = outer.command(&args).current_dir(&main).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": 4 ran, 0 cached, 0 failed"), "{stdout}");
    }
}

/// The evaluation chapter's worked examples: each JSON block is scored as
/// the `eval` stage scores an answer, and must give the figures it states.
#[test]
fn the_evaluation_chapters_worked_examples_hold() {
    use std::collections::BTreeMap as Map;
    use watchfire::adapt::tasks::{Example, KeyFact, REPORT_HEADER, Task};
    use watchfire::eval::metrics::Lexicon;
    use watchfire::eval::score::{ScoreConfig, outcome, score};
    use watchfire::schema::{EntityRole, EntitySchema};

    let page = page("book/src/evaluation.md");
    let report = "At 14:30 in light rain a silver van hit the wall of 12 Mill Lane.";
    assert!(page.contains(&format!("report:  {report}")), "the page's report changed");
    let schema = EntitySchema(Map::from([
        ("time".to_string(), EntityRole::Key),
        ("vehicle".to_string(), EntityRole::Key),
        ("location".to_string(), EntityRole::Key),
        ("weather".to_string(), EntityRole::Peripheral),
    ]));
    let examples: Vec<Value> = blocks(&page, "json")
        .iter()
        .map(|b| serde_json::from_str::<Value>(b).unwrap())
        .filter(|v| v.get("worked_example").is_some())
        .collect();
    assert_eq!(examples.len(), 3);
    for ex in examples {
        let task: Task = serde_json::from_value(ex["worked_example"].clone()).unwrap();
        let pair =
            |v: &Value| (v[0].as_str().unwrap().to_string(), v[1].as_str().unwrap().to_string());
        let example = Example {
            id: "r:x".into(),
            task,
            source_id: "r".into(),
            template_id: None,
            prompt: format!("Do it.{REPORT_HEADER}{report}"),
            target: ex["target"].as_str().unwrap().into(),
            key_facts: ex["key_facts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let (kind, value) = pair(v);
                    KeyFact { kind, value }
                })
                .collect(),
            spans: Vec::new(),
        };
        let lexicon = Lexicon::new(
            ex.get("lexicon")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|v| v.as_str().unwrap()),
        );
        let o = outcome(&example, ex["output"].as_str().unwrap(), false, &lexicon, &[]);
        let config = ScoreConfig { schema: &schema, entity_types: &[], resamples: 10, seed: 0 };
        let s = score(&[o], &config);
        let found = Map::from([
            ("key_f1", s.key_entities.as_ref().map(|e| e.f1.value)),
            ("all_f1", s.all_entities.as_ref().map(|e| e.f1.value)),
            ("cirs", s.cirs.map(|f| f.value)),
            ("cci", s.cci.map(|f| f.value)),
        ]);
        for (name, want) in ex["expect"].as_object().unwrap() {
            let got = found[name.as_str()].unwrap_or_else(|| panic!("{task:?}: no {name}"));
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "{task:?} {name}: the page says {want}, scoring gives {got}"
            );
        }
    }
}

/// The evaluation chapter's ablation: added to the paper recipe under
/// `variants`, it brings exactly its own train and eval stages (the report
/// reads them); every other stage instance is unchanged, so with a warm
/// cache only those run.
#[test]
fn the_chapters_ablation_adds_only_its_own_stages() {
    use watchfire::recipe::{LoadOptions, load};

    let data = repo().join("../shared/data");
    if !data.join("idrisi").is_dir() {
        eprintln!("skipped: the paper recipe reads ../shared/data/idrisi, which is absent");
        return;
    }
    let page = page("book/src/evaluation.md");
    let snippet = block_starting(&page, "yaml", "  no_prefix:");
    let paper = page_text("recipes/paper.yaml");
    let dir = tempfile::tempdir_in(repo().join("recipes")).unwrap();
    let with = dir.path().join("paper.yaml");
    let text = paper.replace("\nvariants:\n", &format!("\nvariants:\n{snippet}"));
    assert_ne!(text, paper, "the paper recipe has no `variants:`");
    // The copy sits one folder deeper: its relative paths gain a `../`.
    let text = text
        .replace("data: data/", "data: ../data/")
        .replace("general: data/", "general: ../data/");
    let text = text.replace("../../shared/", "../../../shared/");
    std::fs::write(&with, text).unwrap();

    let options = LoadOptions { data_roots: vec![data], variants: Vec::new() };
    let before = load(&repo().join("recipes/paper.yaml"), &options).unwrap();
    let after = load(&with, &options).unwrap();
    let signature = |r: &watchfire::recipe::Recipe, name: &str| {
        let i = r.instances.iter().find(|i| i.name == name).unwrap();
        (i.kind.kind(), i.params.to_string(), i.inputs.len())
    };
    let names = |r: &watchfire::recipe::Recipe| -> BTreeSet<String> {
        r.instances.iter().map(|i| i.name.clone()).collect()
    };
    let added: Vec<String> = names(&after).difference(&names(&before)).cloned().collect();
    assert_eq!(added, ["eval@no_prefix", "eval_real@no_prefix", "train@no_prefix"]);
    for name in names(&before) {
        if name != "report" {
            assert_eq!(signature(&before, &name), signature(&after, &name), "{name} changed");
        }
    }
    let report = |r: &watchfire::recipe::Recipe| {
        r.instances.iter().find(|i| i.name == "report").unwrap().inputs.len()
    };
    assert_eq!(report(&after), report(&before) + 3, "the report gathers the new variant");
}

fn page_text(rel: &str) -> String {
    page(rel)
}
