//! Where each node of a recipe sits in its YAML source.
//!
//! serde_yaml gives typed values but no positions, so the recipe is parsed a
//! second time into an event stream that records, for every path such as
//! `stages.scene.params.count`, the byte span of its key and of its value.
//! Duplicate mapping keys are collected here too, since serde_yaml would only
//! report the second one.

use std::collections::HashMap;
use std::ops::Range;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A path into the recipe: mapping keys and sequence indices.
pub type NodePath = Vec<String>;

/// The location of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpan {
    /// The mapping key that holds the node, when it has one.
    pub key: Option<Range<usize>>,
    /// The node's own value (for a container, its first line).
    pub value: Range<usize>,
}

/// A key that appears twice in one mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateKey {
    pub path: NodePath,
    pub first: Range<usize>,
    pub second: Range<usize>,
}

/// Spans of every node of a YAML document, by path.
#[derive(Debug, Default)]
pub struct SpanIndex {
    nodes: HashMap<NodePath, NodeSpan>,
    pub duplicates: Vec<DuplicateKey>,
    /// Byte offset and message of the first YAML syntax error.
    pub syntax_error: Option<(usize, String)>,
}

impl SpanIndex {
    /// Indexes `source`. Syntax errors leave the index partial; serde_yaml
    /// reports them with their own position.
    pub fn build(source: &str) -> Self {
        let mut builder = Builder::new(source);
        let mut parser = Parser::new_from_str(source);
        if let Err(err) = parser.load(&mut builder, false) {
            let at = builder.byte(*err.marker());
            builder.index.syntax_error = Some((at, err.info().to_string()));
        }
        builder.index
    }

    pub fn get(&self, path: &[impl AsRef<str>]) -> Option<&NodeSpan> {
        let path: NodePath = path.iter().map(|seg| seg.as_ref().to_string()).collect();
        self.nodes.get(&path)
    }

    /// The best span for a path: its value, or its closest indexed ancestor.
    pub fn value_or_ancestor(&self, path: &[impl AsRef<str>]) -> Range<usize> {
        let mut path: NodePath = path.iter().map(|seg| seg.as_ref().to_string()).collect();
        loop {
            if let Some(span) = self.nodes.get(&path) {
                return span.value.clone();
            }
            if path.pop().is_none() {
                return 0..0;
            }
        }
    }

    /// The span of the key naming a node, falling back to its value.
    pub fn key_or_value(&self, path: &[impl AsRef<str>]) -> Range<usize> {
        match self.get(path) {
            Some(NodeSpan { key: Some(key), .. }) => key.clone(),
            Some(span) => span.value.clone(),
            None => self.value_or_ancestor(path),
        }
    }

    /// Child keys of a mapping node, in source order.
    pub fn children(&self, path: &[impl AsRef<str>]) -> Vec<(String, Range<usize>)> {
        let depth = path.len();
        let mut out: Vec<(String, Range<usize>)> = self
            .nodes
            .iter()
            .filter(|(p, _)| {
                p.len() == depth + 1 && p.iter().zip(path).all(|(a, b)| a == b.as_ref())
            })
            .map(|(p, span)| (p[depth].clone(), span.key.clone().unwrap_or(span.value.clone())))
            .collect();
        out.sort_by_key(|(_, span)| span.start);
        out
    }
}

enum Frame {
    Map { path: NodePath, key: Option<(String, Range<usize>)>, seen: HashMap<String, Range<usize>> },
    Seq { path: NodePath, next: usize },
}

impl Frame {
    fn path(&self) -> &NodePath {
        match self {
            Frame::Map { path, .. } | Frame::Seq { path, .. } => path,
        }
    }
}

struct Builder<'a> {
    source: &'a str,
    /// Byte offset of every char, for the parser's char-based markers.
    char_to_byte: Option<Vec<usize>>,
    stack: Vec<Frame>,
    index: SpanIndex,
    flow_depth: usize,
}

impl<'a> Builder<'a> {
    fn new(source: &'a str) -> Self {
        let char_to_byte = (!source.is_ascii())
            .then(|| source.char_indices().map(|(i, _)| i).chain([source.len()]).collect());
        Self { source, char_to_byte, stack: Vec::new(), index: SpanIndex::default(), flow_depth: 0 }
    }

    fn byte(&self, mark: Marker) -> usize {
        match &self.char_to_byte {
            Some(table) => table.get(mark.index()).copied().unwrap_or(self.source.len()),
            None => mark.index().min(self.source.len()),
        }
    }

    /// Places a node that starts at `span`; returns its path when it is a value.
    fn place(&mut self, span: Range<usize>, scalar: Option<&str>) -> Option<NodePath> {
        let first_line = span.start..self.line_end(span.start);
        match self.stack.last_mut() {
            None => Some(Vec::new()),
            Some(Frame::Seq { path, next }) => {
                let mut child = path.clone();
                child.push(next.to_string());
                *next += 1;
                self.index.nodes.insert(child.clone(), NodeSpan { key: None, value: span });
                Some(child)
            }
            Some(Frame::Map { path, key, seen }) => match key.take() {
                None => {
                    // A block mapping's start mark lies after its first key:
                    // place the mapping on the line of that key instead.
                    if seen.is_empty()
                        && let Some(map) = self.index.nodes.get_mut(&*path)
                        && !self.source[map.value.start..].starts_with('{')
                    {
                        map.value = first_line;
                    }
                    let name = scalar.unwrap_or("?").to_string();
                    if let Some(first) = seen.get(&name) {
                        let mut dup = path.clone();
                        dup.push(name.clone());
                        self.index.duplicates.push(DuplicateKey {
                            path: dup,
                            first: first.clone(),
                            second: span.clone(),
                        });
                    } else {
                        seen.insert(name.clone(), span.clone());
                    }
                    *key = Some((name, span));
                    None
                }
                Some((name, key_span)) => {
                    let mut child = path.clone();
                    child.push(name);
                    let node = NodeSpan { key: Some(key_span), value: span };
                    self.index.nodes.entry(child.clone()).or_insert(node);
                    Some(child)
                }
            },
        }
    }

    fn scalar_end(&self, start: usize, style: TScalarStyle) -> usize {
        let rest = &self.source[start..];
        let line_end = rest.find('\n').unwrap_or(rest.len());
        let line = &rest[..line_end];
        let end = match style {
            TScalarStyle::DoubleQuoted => closing_quote(line, '"', true),
            TScalarStyle::SingleQuoted => closing_quote(line, '\'', false),
            TScalarStyle::Literal | TScalarStyle::Folded => line.len(),
            _ => plain_end(line, self.flow_depth > 0),
        };
        start + end
    }

    fn line_end(&self, start: usize) -> usize {
        let rest = &self.source[start..];
        start + rest.find('\n').unwrap_or(rest.len()).max(1).min(rest.len())
    }
}

fn closing_quote(line: &str, quote: char, backslash_escapes: bool) -> usize {
    let mut chars = line.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        if backslash_escapes && c == '\\' {
            chars.next();
        } else if c == quote {
            return i + 1;
        }
    }
    line.len()
}

fn plain_end(line: &str, in_flow: bool) -> usize {
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let next = bytes.get(i + 1).copied();
        let ends = match b {
            b':' => matches!(next, None | Some(b' ') | Some(b'\t')),
            b'#' => i > 0 && bytes[i - 1] == b' ',
            b',' | b']' | b'}' => in_flow,
            _ => false,
        };
        if ends {
            return line[..i].trim_end().len();
        }
    }
    line.trim_end().len()
}

impl MarkedEventReceiver for Builder<'_> {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let start = self.byte(mark);
        match event {
            Event::Scalar(value, style, ..) => {
                let end = self.scalar_end(start, style);
                self.place(start..end, Some(&value));
            }
            Event::Alias(_) => {
                let end = self.scalar_end(start, TScalarStyle::Plain);
                self.place(start..end, None);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(event, Event::MappingStart(..));
                if self.source[start..].starts_with(['{', '[']) {
                    self.flow_depth += 1;
                }
                let end = self.line_end(start);
                if let Some(path) = self.place(start..end, None) {
                    self.index
                        .nodes
                        .entry(path.clone())
                        .or_insert(NodeSpan { key: None, value: start..end });
                    self.stack.push(if is_map {
                        Frame::Map { path, key: None, seen: HashMap::new() }
                    } else {
                        Frame::Seq { path, next: 0 }
                    });
                } else {
                    // A container used as a mapping key: index nothing below it.
                    self.stack.push(Frame::Seq { path: vec!["?".into()], next: 0 });
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                // The end mark of a flow container is its closing bracket.
                let frame = self.stack.pop();
                if self.source[start..].starts_with(['}', ']']) {
                    self.flow_depth = self.flow_depth.saturating_sub(1);
                    if let Some(node) = frame.and_then(|f| self.index.nodes.get_mut(f.path()))
                        && self.source[node.value.start..].starts_with(['{', '['])
                        && node.value.start < start
                    {
                        node.value.end = start + 1;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text<'a>(src: &'a str, span: &Range<usize>) -> &'a str {
        &src[span.clone()]
    }

    #[test]
    fn finds_keys_and_values() {
        let src = "name: demo\nstages:\n  scene:\n    kind: scene\n    params: {count: 4, mode: \"flat\"}\n    inputs:\n      - seed\n";
        let index = SpanIndex::build(src);
        let kind = index.get(&["stages", "scene", "kind"]).unwrap();
        assert_eq!(text(src, kind.key.as_ref().unwrap()), "kind");
        assert_eq!(text(src, &kind.value), "scene");
        let count = index.get(&["stages", "scene", "params", "count"]).unwrap();
        assert_eq!(text(src, &count.value), "4");
        let mode = index.get(&["stages", "scene", "params", "mode"]).unwrap();
        assert_eq!(text(src, &mode.value), "\"flat\"");
        let input = index.get(&["stages", "scene", "inputs", "0"]).unwrap();
        assert_eq!(text(src, &input.value), "seed");
    }

    #[test]
    fn reports_duplicate_keys() {
        let src = "stages:\n  a: 1\n  b: 2\n  a: 3\n";
        let index = SpanIndex::build(src);
        assert_eq!(index.duplicates.len(), 1);
        let dup = &index.duplicates[0];
        assert_eq!(dup.path, vec!["stages", "a"]);
        assert_eq!(text(src, &dup.first), "a");
        assert_eq!(dup.second.start, src.rfind("a:").unwrap());
    }

    #[test]
    fn containers_span_their_own_text() {
        let src = "a:\n  b: 1\nc: [1, {d: []}]\ne: f, g\n";
        let index = SpanIndex::build(src);
        assert_eq!(text(src, &index.get(&["a"]).unwrap().value), "b: 1");
        assert_eq!(text(src, &index.get(&["c"]).unwrap().value), "[1, {d: []}]");
        assert_eq!(text(src, &index.get(&["c", "1"]).unwrap().value), "{d: []}");
        assert_eq!(text(src, &index.get(&["c", "1", "d"]).unwrap().value), "[]");
        assert_eq!(text(src, &index.get(&["e"]).unwrap().value), "f, g");
    }

    #[test]
    fn handles_non_ascii_sources() {
        let src = "name: \"café ☕\"\nseed: 7\n";
        let index = SpanIndex::build(src);
        assert_eq!(text(src, &index.get(&["seed"]).unwrap().value), "7");
    }
}
