//! Recipe errors: each one points into the YAML source.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};

/// What went wrong, for tests and for the diagnostic code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeErrorKind {
    /// The file is not valid YAML.
    Syntax,
    /// A key the recipe format does not know.
    UnknownKey,
    /// A required key is absent or a value has the wrong shape.
    Invalid,
    UnknownKind,
    /// A required input slot of a stage kind is not bound.
    MissingInput,
    /// An input names a slot the stage kind does not have.
    UnknownInputSlot,
    /// An input names a stage (or stage output) that does not exist.
    DanglingInput,
    /// A param has the wrong type. (A param the kind does not have is an
    /// [`UnknownKey`](Self::UnknownKey).)
    ParamType,
    /// A param is outside its allowed range.
    ParamRange,
    /// `${...}` names nothing the recipe defines.
    UnknownInterpolation,
    DuplicateId,
    Cycle,
    /// A variant overrides a param that no stage reads.
    UnusedVariantParam,
    /// A variant overrides a param the recipe does not declare.
    UnknownVariantParam,
    FileNotFound,
    /// `--variant` names a variant the recipe does not have.
    UnknownVariant,
    /// A path leaves the project directory (and every allowed data root).
    PathEscapes,
}

impl RecipeErrorKind {
    pub fn code(self) -> &'static str {
        match self {
            Self::Syntax => "watchfire::recipe::syntax",
            Self::UnknownKey => "watchfire::recipe::unknown_key",
            Self::Invalid => "watchfire::recipe::invalid",
            Self::UnknownKind => "watchfire::recipe::unknown_kind",
            Self::MissingInput => "watchfire::recipe::missing_input",
            Self::UnknownInputSlot => "watchfire::recipe::unknown_input_slot",
            Self::DanglingInput => "watchfire::recipe::dangling_input",
            Self::ParamType => "watchfire::recipe::param_type",
            Self::ParamRange => "watchfire::recipe::param_range",
            Self::UnknownInterpolation => "watchfire::recipe::unknown_interpolation",
            Self::DuplicateId => "watchfire::recipe::duplicate_id",
            Self::Cycle => "watchfire::recipe::cycle",
            Self::UnusedVariantParam => "watchfire::recipe::unused_variant_param",
            Self::UnknownVariantParam => "watchfire::recipe::unknown_variant_param",
            Self::FileNotFound => "watchfire::recipe::file_not_found",
            Self::UnknownVariant => "watchfire::recipe::unknown_variant",
            Self::PathEscapes => "watchfire::recipe::path_escapes",
        }
    }
}

/// An error in a recipe, with the spans it concerns.
#[derive(Debug, Clone)]
pub struct RecipeError {
    pub kind: RecipeErrorKind,
    pub message: String,
    /// Boxed so that `Result<_, RecipeError>` stays small.
    detail: Box<Detail>,
}

#[derive(Debug, Clone)]
struct Detail {
    /// (span, label); the first is the primary one.
    labels: Vec<(Range<usize>, String)>,
    help: Option<String>,
    source: NamedSource<Arc<str>>,
}

impl RecipeError {
    pub fn new(
        kind: RecipeErrorKind,
        source: &NamedSource<Arc<str>>,
        message: impl Into<String>,
    ) -> Self {
        let detail = Detail { labels: Vec::new(), help: None, source: source.clone() };
        Self { kind, message: message.into(), detail: Box::new(detail) }
    }

    pub fn label(mut self, span: Range<usize>, label: impl Into<String>) -> Self {
        self.detail.labels.push((span, label.into()));
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.detail.help = Some(help.into());
        self
    }

    /// Helps with "did you mean" when `wrong` is close to a candidate, and
    /// with `otherwise` when none is.
    pub fn suggest<'a>(
        self,
        wrong: &str,
        candidates: impl IntoIterator<Item = &'a str>,
        otherwise: impl Into<String>,
    ) -> Self {
        match did_you_mean(wrong, candidates) {
            Some(best) => self.help(format!("did you mean `{best}`?")),
            None => self.help(otherwise),
        }
    }

    pub fn help_text(&self) -> Option<&str> {
        self.detail.help.as_deref()
    }

    /// Every (span, label), the primary one first.
    pub fn labels(&self) -> &[(Range<usize>, String)] {
        &self.detail.labels
    }

    /// The primary span, for tests.
    pub fn span(&self) -> Option<Range<usize>> {
        self.detail.labels.first().map(|(span, _)| span.clone())
    }

    /// The text under the primary span, for tests.
    pub fn spanned_text(&self) -> Option<String> {
        let span = self.span()?;
        self.detail.source.inner().get(span).map(str::to_string)
    }
}

/// The candidate closest to `wrong`, when it is close enough to be a typo.
pub fn did_you_mean<'a>(
    wrong: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::jaro_winkler(wrong, candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RecipeError {}

impl Diagnostic for RecipeError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.kind.code()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.detail.help.as_ref().map(|help| Box::new(help) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.detail.source)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(
            self.detail
                .labels
                .iter()
                .map(|(span, label)| LabeledSpan::new_with_span(Some(label.clone()), span.clone())),
        ))
    }
}
