//! Coarse report templates: text with typed slots, as G_scene writes them
//! and G_detail fills them.
//!
//! Template text marks a slot as `{type}` for the first distinct value of a
//! type and `{type#2}`, `{type#3}`, ... for the next ones; a slot that appears
//! twice is filled with one value. Literal braces are doubled (`{{`, `}}`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether a template was built with the scene hierarchy or without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Scene category -> role chain -> sentences, then values conditioned on attributes.
    #[default]
    Hierarchical,
    /// Sentences pooled over all scenes, values drawn without conditioning (the ablation).
    Flat,
}

/// What writes templates and fills them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Templates learned from the seed and filled by typed value generators.
    #[default]
    Template,
    /// A language model, bound as the `model` input, writes the templates (`scene`) or the
    /// slot values (`detail`) as JSON under a schema; answers that fail the checks are dropped
    /// and counted.
    Llm,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Hierarchical => "hierarchical",
            Self::Flat => "flat",
        }
    }
}

/// One template, one line of `templates.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    /// First 16 hex digits of the blake3 hash of mode, scene and text.
    pub id: String,
    pub mode: Mode,
    /// The scene category; `None` for flat templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scene: Option<String>,
    pub text: String,
    /// Sentence roles, in order.
    pub roles: Vec<String>,
    /// Every slot, in order of first appearance.
    pub slots: Vec<SlotSpec>,
    /// Ids of the seed reports whose sentences the template is made of.
    pub seed_ids: Vec<String>,
}

impl Template {
    pub fn content_id(mode: Mode, scene: Option<&str>, text: &str) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(mode.name().as_bytes());
        hasher.update(&[0]);
        hasher.update(scene.unwrap_or("").as_bytes());
        hasher.update(&[0]);
        hasher.update(text.as_bytes());
        hasher.finalize().to_hex()[..16].to_string()
    }
}

/// A slot of a template and the surface form its seed value had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotSpec {
    #[serde(rename = "type")]
    pub kind: String,
    pub index: u32,
    pub shape: Shape,
}

/// The surface form of a slot's seed value, so generated values read alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "form", rename_all = "snake_case")]
pub enum Shape {
    /// Any text; drawn from the seed's values of the type.
    Plain,
    /// A count, written as a word (`two`) or digits, for one or several.
    Count { words: bool, plural: bool },
    /// A clock time: `14:35`, `2:35 PM` (12-hour) or `1435 hours` (compact).
    Clock { style: ClockStyle, suffix: String },
    /// A street address, `1234 Maple Ave`, with `, district` when the seed had one.
    Address { district: bool },
    /// Two streets, `Maple Ave and 5th St`.
    Intersection { district: bool },
    /// Letters become `A`, digits `9`, other characters stay: `7ABC123` -> `9AAA999`.
    Pattern { pattern: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockStyle {
    H24,
    H12,
    Compact,
}

/// A parsed piece of template text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Slot { kind: String, index: u32 },
}

/// The template text of one slot.
pub fn slot_token(kind: &str, index: u32) -> String {
    if index == 1 { format!("{{{kind}}}") } else { format!("{{{kind}#{index}}}") }
}

/// Doubles braces so literal text cannot be read as a slot.
pub fn escape(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// Renders pieces back to template text.
pub fn render(pieces: &[Piece]) -> String {
    let mut text = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(literal) => text.push_str(&escape(literal)),
            Piece::Slot { kind, index } => text.push_str(&slot_token(kind, *index)),
        }
    }
    text
}

/// Splits template text into literal text and slots.
pub fn parse(text: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                literal.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                literal.push('}');
            }
            '{' => {
                let mut token = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    token.push(c);
                }
                if !closed {
                    return Err(format!("unclosed slot `{{{token}`"));
                }
                let (kind, index) = match token.split_once('#') {
                    Some((kind, index)) => {
                        (kind, index.parse().map_err(|_| format!("bad slot `{{{token}}}`"))?)
                    }
                    None => (token.as_str(), 1),
                };
                if kind.is_empty() || index == 0 {
                    return Err(format!("bad slot `{{{token}}}`"));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Slot { kind: kind.to_string(), index });
            }
            '}' => return Err("unmatched `}`".to_string()),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Text(literal));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unclosed_slot_is_an_error() {
        assert!(parse("a {time").is_err());
        assert!(parse("a {{time").is_ok());
    }

    #[test]
    fn text_round_trips_through_pieces() {
        let pieces = vec![
            Piece::Text("At ".into()),
            Piece::Slot { kind: "time".into(), index: 1 },
            Piece::Text(" a {odd} car hit ".into()),
            Piece::Slot { kind: "vehicle".into(), index: 2 },
        ];
        let text = render(&pieces);
        assert_eq!(text, "At {time} a {{odd}} car hit {vehicle#2}");
        assert_eq!(parse(&text).unwrap(), pieces);
    }

    #[test]
    fn bad_slots_are_errors() {
        assert!(parse("a {time#x} b").is_err());
        assert!(parse("a } b").is_err());
    }
}
