//! Test helpers: a tiny seed set built in code and a harness that runs
//! stage kinds over temporary folders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::corpus::{Entity, Record, write_jsonl};
use crate::progress::NullReporter;
use crate::schema::{EntityRole, EntitySchema};
use crate::stage::{Stage, StageContext, StageError};

/// A seed report whose entities are found in `text` in the order given.
pub fn report(
    id: &str,
    scene: &str,
    text: &str,
    entities: &[(&str, &str)],
    attributes: &[(&str, &str)],
) -> Record {
    let mut from = 0;
    let entities = entities
        .iter()
        .map(|(kind, value)| {
            let byte = from + text[from..].find(value).unwrap_or_else(|| panic!("{value}"));
            from = byte + value.len();
            let start = text[..byte].chars().count();
            let end = start + value.chars().count();
            Entity { kind: kind.to_string(), start, end, value: Some(value.to_string()) }
        })
        .collect();
    Record {
        id: id.to_string(),
        text: text.to_string(),
        scene: scene.to_string(),
        entities,
        attributes: attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        synthetic: false,
        provenance: None,
    }
}

/// Twelve short reports over three scenes.
pub fn tiny_seed() -> Vec<Record> {
    let n = |tod, dist, sev, agency| {
        [("time_of_day", tod), ("district", dist), ("severity", sev), ("agency", agency)]
    };
    vec![
        report(
            "c1",
            "collision",
            "At 22:40 a silver sedan hit a pickup truck on Harbor Road. \
            One person died at the scene. Officers closed the road overnight.",
            &[
                ("time", "22:40"),
                ("vehicle", "silver sedan"),
                ("vehicle", "pickup truck"),
                ("location", "Harbor Road"),
                ("fatalities", "One"),
            ],
            &n("night", "Riverside", "high", "police"),
        ),
        report(
            "c2",
            "collision",
            "A delivery van with plate 7KXP214 bumped a hatchback at 7:15 a.m. \
            at Maple Avenue and 5th Street this morning. Both drivers were uninjured.",
            &[
                ("vehicle", "delivery van"),
                ("plate", "7KXP214"),
                ("vehicle", "hatchback"),
                ("time", "7:15 a.m."),
                ("location", "Maple Avenue and 5th Street"),
            ],
            &n("morning", "Northgate", "low", "police"),
        ),
        report(
            "c3",
            "collision",
            "Dense fog caused a pileup at 1410 Quarry Lane at 14:05. \
            Paramedics treated four people. A grey hatchback was towed.",
            &[
                ("weather", "Dense fog"),
                ("location", "1410 Quarry Lane"),
                ("time", "14:05"),
                ("injured", "four"),
                ("vehicle", "grey hatchback"),
            ],
            &n("afternoon", "Eastfield", "medium", "ems"),
        ),
        report(
            "c4",
            "collision",
            "This evening at 18:20 a motorcycle struck a cyclist on Bridge Street. \
            Two people were hurt. A witness said the rider was speeding.",
            &[
                ("time", "18:20"),
                ("vehicle", "motorcycle"),
                ("location", "Bridge Street"),
                ("injured", "Two"),
                ("witness_remark", "the rider was speeding"),
            ],
            &n("evening", "Old Town", "medium", "police"),
        ),
        report(
            "f1",
            "fire",
            "Crews were called at 03:12 to a kitchen fire at 22 Elm Court. \
            Heavy smoke filled the stairwell. One resident was treated for smoke inhalation.",
            &[
                ("time", "03:12"),
                ("hazard", "kitchen fire"),
                ("location", "22 Elm Court"),
                ("hazard", "Heavy smoke"),
                ("injured", "One"),
            ],
            &n("night", "Westbrook", "medium", "fire"),
        ),
        report(
            "f2",
            "fire",
            "At 16:45 a shed fire spread to a fence on Mill Lane. \
            Strong wind pushed the flames toward the houses. Nobody was hurt this afternoon.",
            &[
                ("time", "16:45"),
                ("hazard", "shed fire"),
                ("location", "Mill Lane"),
                ("weather", "Strong wind"),
            ],
            &n("afternoon", "Riverside", "low", "fire"),
        ),
        report(
            "f3",
            "fire",
            "An electrical fire broke out in a warehouse on Dock Road at 09:30. \
            Three workers were injured. A neighbour said the alarm never sounded.",
            &[
                ("hazard", "electrical fire"),
                ("location", "Dock Road"),
                ("time", "09:30"),
                ("injured", "Three"),
                ("witness_remark", "the alarm never sounded"),
            ],
            &n("morning", "Harbourside", "high", "fire"),
        ),
        report(
            "f4",
            "fire",
            "A car fire was reported at 20:10 outside 5 Station Road. \
            A fire engine put it out within minutes.",
            &[
                ("hazard", "car fire"),
                ("time", "20:10"),
                ("location", "5 Station Road"),
                ("vehicle", "fire engine"),
            ],
            &n("evening", "Old Town", "low", "fire"),
        ),
        report(
            "a1",
            "assault",
            "At 23:55 a man in a grey hoodie punched a bouncer outside the Crown bar. \
            The bouncer was taken to hospital. Witnesses said the man ran toward the river.",
            &[
                ("time", "23:55"),
                ("suspect_description", "a man in a grey hoodie"),
                ("location", "the Crown bar"),
                ("witness_remark", "the man ran toward the river"),
            ],
            &n("night", "Old Town", "medium", "police"),
        ),
        report(
            "a2",
            "assault",
            "A woman was threatened with a knife on Park Lane at 13:20. \
            The suspect wore a red cap. No injuries were reported.",
            &[
                ("weapon", "knife"),
                ("location", "Park Lane"),
                ("time", "13:20"),
                ("suspect_description", "a red cap"),
            ],
            &n("afternoon", "Northgate", "low", "police"),
        ),
        report(
            "a3",
            "assault",
            "Two men fought outside 40 King Street this morning at 06:40. \
            One man was injured by a bottle. A passer-by called the police.",
            &[
                ("location", "40 King Street"),
                ("time", "06:40"),
                ("injured", "One"),
                ("weapon", "bottle"),
                ("bystander_detail", "A passer-by"),
            ],
            &n("morning", "Eastfield", "medium", "police"),
        ),
        report(
            "a4",
            "assault",
            "At 19:05 a cyclist was pushed off his bike on Canal Walk. \
            The attacker was described as a tall man in a black jacket.",
            &[
                ("time", "19:05"),
                ("location", "Canal Walk"),
                ("suspect_description", "a tall man in a black jacket"),
            ],
            &n("evening", "Harbourside", "low", "police"),
        ),
    ]
}

pub fn tiny_schema() -> EntitySchema {
    let key = ["time", "location", "vehicle", "plate", "injured", "fatalities", "hazard", "weapon"];
    let peripheral = ["weather", "witness_remark", "bystander_detail", "suspect_description"];
    let mut map = BTreeMap::new();
    map.extend(key.iter().map(|t| (t.to_string(), EntityRole::Key)));
    map.extend(peripheral.iter().map(|t| (t.to_string(), EntityRole::Peripheral)));
    EntitySchema(map)
}

/// Runs stages in temporary folders.
pub struct Harness {
    dir: TempDir,
    runs: std::cell::Cell<usize>,
}

impl Harness {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("temp dir"), runs: std::cell::Cell::new(0) }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes records as a JSONL file and returns its path.
    pub fn write_records(&self, name: &str, records: &[Record]) -> PathBuf {
        let path = self.path().join(name);
        write_jsonl(&path, records).expect("write records");
        path
    }

    /// Runs one stage; returns its output folder.
    pub fn run<S: Stage>(
        &self,
        params: &S::Params,
        inputs: &[(&str, &Path)],
        seed: u64,
        schema: &EntitySchema,
    ) -> Result<PathBuf, StageError> {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let out = self.path().join(format!("out-{n}-{}", S::KIND));
        std::fs::create_dir_all(&out)?;
        let inputs = inputs.iter().map(|(k, p)| (k.to_string(), p.to_path_buf())).collect();
        let checkpoints = self.path().join(format!("checkpoints-{}", S::KIND));
        let ctx = StageContext {
            stage_id: S::KIND,
            key: "testkey",
            seed,
            schema,
            inputs: &inputs,
            out_dir: &out,
            checkpoints: &checkpoints,
            reporter: &NullReporter,
        };
        S::run(params, &ctx)?;
        Ok(out)
    }
}

/// Every span of every record slices out exactly its value.
pub fn assert_spans_slice(records: &[Record]) {
    for record in records {
        for entity in &record.entities {
            let slice = record.span_text(entity);
            assert!(slice.is_some(), "{}: span out of range", record.id);
            assert_eq!(slice, entity.value.as_deref(), "{}: {}", record.id, record.text);
        }
    }
}
