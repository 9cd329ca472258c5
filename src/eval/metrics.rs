//! Scores for the entity, summary and alert subtasks.
//!
//! Every function here is pure: it reads strings and returns counts, so the
//! same outputs always get the same scores. Counts rather than ratios are
//! returned wherever documents are to be pooled: a caller adds the counts of
//! every document and takes the ratio once (micro-averaging).
//!
//! # Normalization
//!
//! Before any comparison, both sides go through [`normalize`]: Unicode
//! lower-casing; every run of whitespace becomes one space; and every
//! whitespace character and every character among `. , ; : ! ? " ' ( ) [ ]`
//! and the backtick is stripped from both ends. Punctuation inside the text is
//! kept: `Main St.` becomes `main st`, `14:30` stays `14:30`.
//!
//! # Occurrence at word boundaries
//!
//! A value *occurs* in a text when its normalized form is a substring of the
//! normalized text whose neighbouring characters (the one just before and the
//! one just after) are each either absent (start or end of the text) or not
//! alphanumeric (Rust's `char::is_alphanumeric`, which covers every script).
//! So `12` occurs in `12 injured` and in `12:30`, but not in `123` nor in
//! `12th`. A value whose normalized form is empty occurs nowhere. The check
//! is verbatim: a paraphrase (`half past two` for `14:30`, `Main Street` for
//! `Main St`) does not occur.
//!
//! # Entity extraction: precision, recall, F1
//!
//! [`match_entities`] compares the predicted `(type, value)` pairs of one
//! document with the gold pairs. A prediction is correct (a true positive)
//! when a gold pair has the same normalized type and the same normalized
//! value. Pairs are matched as multisets: a pair the gold holds `n` times
//! gives at most `n` true positives, and any further copies of it in the
//! prediction are false positives. Unmatched predictions are false
//! positives; unmatched gold pairs are false negatives. Counts are kept per
//! normalized type: a value predicted under the wrong type is a false
//! positive for the predicted type and a false negative for the gold type.
//!
//! With `tp`, `fp`, `fn_` the counts ([`Counts`]): precision is
//! `tp / (tp + fp)`, recall is `tp / (tp + fn_)`, each 0 when its
//! denominator is 0, and F1 is `2 p r / (p + r)`, 0 when `p + r` is 0.
//! Micro-averaged scores ([`micro`]) add the counts of every type (and, for
//! a data set, of every document) before taking the ratios.
//!
//! # Bootstrap interval
//!
//! [`bootstrap_interval`] gives a 95% percentile interval for any statistic
//! of a set of documents. Each resample draws as many documents as the input
//! holds, uniformly with replacement, from a ChaCha8 generator seeded with
//! the given seed, and computes the statistic on them. The interval is the
//! 2.5th and 97.5th percentiles of the resampled values, with linear
//! interpolation between order statistics: with the `m` values sorted
//! ascending as `v[0] ..= v[m - 1]`, the `q`-th quantile is at rank
//! `h = q (m - 1)`, and its value is `v[⌊h⌋] + (h - ⌊h⌋) (v[⌊h⌋ + 1] - v[⌊h⌋])`
//! (the default rule of NumPy and R's type 7). Resamples on which the
//! statistic is undefined (NaN, such as CCI of a resample in which no output
//! states a fact) are left out before the percentiles. With no documents or no
//! resamples there is no interval, and both bounds are NaN.
//!
//! # CIRS: key information retention
//!
//! [`retained`] counts the key facts of an example (see
//! [`crate::adapt::tasks::KeyFact`]) whose value occurs in the output at word
//! boundaries. CIRS for a data set is the number of facts stated over the
//! number of facts, both summed over documents. The check is verbatim, so a
//! fact restated in other words counts as lost.
//!
//! # CCI: context consistency
//!
//! CCI is the share of the facts an output states that agree with the source
//! report: consistent facts over stated facts ([`Consistency`]), summed over
//! documents. An output that states nothing has no CCI for that document (its
//! counts are 0 and 0, adding nothing to the pooled ratio). What a stated fact
//! is, and when it agrees, depends on the task:
//!
//! - **entities** ([`entities_consistency`]): every predicted `(type, value)`
//!   pair is a stated fact, repeats included. It is inconsistent when it is
//!   *invented* (its value does not occur in the source text) or
//!   *contradicted* (its normalized value is the value of a gold entity, but
//!   only under other normalized types). Otherwise it is consistent, even when
//!   it is not a gold entity: a value copied from the report under a type the
//!   gold does not give it is a wrong extraction, which precision counts, but
//!   not a claim at odds with the report.
//! - **alert** ([`alert_consistency`]): a line that does not split into five
//!   ` | `-separated fields ([`crate::adapt::tasks::parse_alert`]) counts as
//!   one stated, inconsistent fact. Otherwise each field whose normalized
//!   form is neither `unknown` nor empty is a stated fact. Scene and severity
//!   are consistent when they equal the gold field after normalization; place,
//!   time and hazard are consistent when they equal the gold field after
//!   normalization or occur in the source text.
//! - **free text** ([`text_consistency`], for summaries): the stated facts are
//!   found by a lexicon and two patterns. First, the entries of a [`Lexicon`]
//!   (the normalized values of the gold entities of the whole evaluation set)
//!   that occur in the normalized output, longest first and without overlap.
//!   Then, outside those matches, clock times (one or two ASCII digits, `:` or
//!   `.`, two digits, optionally followed by `am`, `pm`, `a.m.` or `p.m.`,
//!   with or without one space before it) and standalone integers (a run of
//!   ASCII digits), each at word boundaries. Each distinct fact counts once,
//!   however often the output repeats it, and is consistent when it occurs in
//!   the source text, verbatim. This sees only values some gold entity of the
//!   set has, times and numbers: an invented fact of any other kind (a cause,
//!   a vehicle, a name no gold entity holds) is not seen, and a number spelled
//!   in words is not a number to it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::adapt::tasks::{AlertFields, KeyFact, UNKNOWN, parse_alert};

// ---------------------------------------------------------------------------
// Normalization and occurrence

/// Characters [`normalize`] strips from both ends of a text.
const EDGE_PUNCTUATION: [char; 13] =
    ['.', ',', ';', ':', '!', '?', '"', '\'', '(', ')', '[', ']', '`'];

/// The form in which texts are compared: lower-cased (Unicode), every run of
/// whitespace replaced by one space, and whitespace and the characters
/// `. , ; : ! ? " ' ( ) [ ]` and backtick stripped from both ends.
/// Punctuation inside the text is kept.
pub fn normalize(text: &str) -> String {
    let lower = text.to_lowercase();
    let collapsed = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.trim_matches(|c: char| c == ' ' || EDGE_PUNCTUATION.contains(&c)).to_string()
}

/// Whether the byte span `start..end` of `text` has no alphanumeric
/// character just before or just after it.
fn at_word_boundary(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
}

/// Byte spans of every occurrence of `needle` in `haystack` at word
/// boundaries, overlapping ones included, in order; none for an empty needle.
fn word_matches<'a>(
    haystack: &'a str,
    needle: &'a str,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    let mut from = 0;
    std::iter::from_fn(move || {
        if needle.is_empty() {
            return None;
        }
        loop {
            let start = from + haystack[from..].find(needle)?;
            let end = start + needle.len();
            from = start + haystack[start..].chars().next().map_or(1, char::len_utf8);
            if at_word_boundary(haystack, start, end) {
                return Some((start, end));
            }
        }
    })
}

/// Whether `needle` occurs in `haystack` at word boundaries. Both are taken
/// as already normalized.
fn occurs(haystack: &str, needle: &str) -> bool {
    word_matches(haystack, needle).next().is_some()
}

// ---------------------------------------------------------------------------
// Entity extraction

/// True positives, false positives and false negatives of entity extraction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Predicted pairs that match a gold pair.
    pub tp: usize,
    /// Predicted pairs that match no gold pair.
    pub fp: usize,
    /// Gold pairs that no predicted pair matches.
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Counts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// `tp / (tp + fp)`; 0 when nothing was predicted.
    pub fn precision(&self) -> f64 {
        share(self.tp, self.tp + self.fp)
    }

    /// `tp / (tp + fn)`; 0 when the gold is empty.
    pub fn recall(&self) -> f64 {
        share(self.tp, self.tp + self.fn_)
    }

    /// The harmonic mean of precision and recall; 0 when both are 0.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r > 0.0 { 2.0 * p * r / (p + r) } else { 0.0 }
    }
}

/// `part / whole`, 0 when `whole` is 0.
fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// Counts per normalized type of one document's predicted `(type, value)`
/// pairs against its gold pairs: exact match of the normalized type and
/// value, as multisets. Every type of either side has a key.
pub fn match_entities(
    gold: &[(String, String)],
    predicted: &[(String, String)],
) -> BTreeMap<String, Counts> {
    let mut per_type: BTreeMap<String, Counts> = BTreeMap::new();
    let mut unmatched: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (kind, value) in gold {
        let kind = normalize(kind);
        per_type.entry(kind.clone()).or_default();
        *unmatched.entry((kind, normalize(value))).or_default() += 1;
    }
    for (kind, value) in predicted {
        let pair = (normalize(kind), normalize(value));
        let counts = per_type.entry(pair.0.clone()).or_default();
        match unmatched.get_mut(&pair) {
            Some(left) if *left > 0 => {
                *left -= 1;
                counts.tp += 1;
            }
            _ => counts.fp += 1,
        }
    }
    for ((kind, _), left) in unmatched {
        per_type.entry(kind).or_default().fn_ += left;
    }
    per_type
}

/// The counts of every type added together.
pub fn micro(per_type: &BTreeMap<String, Counts>) -> Counts {
    let mut total = Counts::default();
    for counts in per_type.values() {
        total.add(*counts);
    }
    total
}

// ---------------------------------------------------------------------------
// Bootstrap

/// The 95% percentile bootstrap interval `(2.5th, 97.5th percentile)` of
/// `statistic` over `resamples` resamples of `items`, each drawn with
/// replacement and as large as `items`, from `ChaCha8Rng::seed_from_u64(seed)`.
/// Percentiles interpolate linearly between order statistics (NumPy's
/// default). The same input and seed give the same interval. `(NaN, NaN)`
/// when `items` is empty or `resamples` is 0.
pub fn bootstrap_interval<T>(
    items: &[T],
    statistic: impl Fn(&[&T]) -> f64,
    resamples: usize,
    seed: u64,
) -> (f64, f64) {
    if items.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut sample: Vec<&T> = Vec::with_capacity(items.len());
    let mut values: Vec<f64> = (0..resamples)
        .map(|_| {
            sample.clear();
            sample.extend((0..items.len()).map(|_| &items[rng.random_range(0..items.len())]));
            statistic(&sample)
        })
        .collect();
    // A resample can leave the statistic undefined (no output that states
    // a fact, say); such resamples carry no information about its spread.
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    (quantile(&values, 0.025), quantile(&values, 0.975))
}

/// The `q`-quantile of ascending `sorted` values, interpolating linearly
/// between the two order statistics around rank `q (len - 1)`; NaN when empty.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else { return f64::NAN };
    let rank = q.clamp(0.0, 1.0) * last as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    if below == above {
        return sorted[below];
    }
    sorted[below] + (rank - below as f64) * (sorted[above] - sorted[below])
}

// ---------------------------------------------------------------------------
// CIRS

/// Key-fact retention of one output: `(stated, total)`, where a fact is
/// stated when its value occurs in the output at word boundaries after
/// normalization. The check is verbatim: a paraphrase, such as `half past
/// two` for `14:30`, does not count.
pub fn retained(key_facts: &[KeyFact], output: &str) -> (usize, usize) {
    let output = normalize(output);
    let stated = key_facts.iter().filter(|fact| occurs(&output, &normalize(&fact.value))).count();
    (stated, key_facts.len())
}

// ---------------------------------------------------------------------------
// CCI

/// How many of the facts an output states agree with its source. Add the
/// counts of every document, then take [`Consistency::ratio`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consistency {
    /// Stated facts that agree with the source.
    pub consistent: usize,
    /// Facts the output states.
    pub stated: usize,
}

impl Consistency {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: Consistency) {
        self.consistent += other.consistent;
        self.stated += other.stated;
    }

    /// `consistent / stated`; `None` when nothing is stated.
    pub fn ratio(&self) -> Option<f64> {
        (self.stated > 0).then(|| self.consistent as f64 / self.stated as f64)
    }

    /// Counts one stated fact.
    fn record(&mut self, consistent: bool) {
        self.stated += 1;
        self.consistent += usize::from(consistent);
    }
}

/// CCI counts of one entity-extraction output: every predicted pair is a
/// stated fact, inconsistent when its value does not occur in `source_text`
/// (invented) or is a gold value only under other types (contradicted).
/// A consistent pair may still be a wrong extraction; F1 scores that.
pub fn entities_consistency(
    predicted: &[(String, String)],
    gold: &[(String, String)],
    source_text: &str,
) -> Consistency {
    let source = normalize(source_text);
    let mut gold_types: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (kind, value) in gold {
        gold_types.entry(normalize(value)).or_default().insert(normalize(kind));
    }
    let mut out = Consistency::default();
    for (kind, value) in predicted {
        let value = normalize(value);
        let invented = !occurs(&source, &value);
        let contradicted =
            gold_types.get(&value).is_some_and(|types| !types.contains(&normalize(kind)));
        out.record(!invented && !contradicted);
    }
    out
}

/// CCI counts of one alert line. A line that does not parse is one stated,
/// inconsistent fact. Otherwise each field that is not `unknown` (nor empty)
/// after normalization is stated: scene and severity agree when equal to the
/// gold field, place, time and hazard when equal to the gold field or
/// occurring in `source_text`, all after normalization.
pub fn alert_consistency(output: &str, gold: &AlertFields, source_text: &str) -> Consistency {
    let mut out = Consistency::default();
    let Some(line) = parse_alert(output) else {
        out.record(false);
        return out;
    };
    let source = normalize(source_text);
    let fields = [
        (&line.scene, &gold.scene, false),
        (&line.place, &gold.place, true),
        (&line.time, &gold.time, true),
        (&line.severity, &gold.severity, false),
        (&line.hazard, &gold.hazard, true),
    ];
    for (stated, expected, may_quote_source) in fields {
        let stated = normalize(stated);
        if stated.is_empty() || stated == UNKNOWN {
            continue;
        }
        let consistent =
            stated == normalize(expected) || (may_quote_source && occurs(&source, &stated));
        out.record(consistent);
    }
    out
}

/// The normalized entity values of an evaluation set, which
/// [`text_consistency`] looks for in free text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lexicon {
    /// Distinct normalized values of at least two characters, longest first,
    /// then in lexicographic order.
    entries: Vec<String>,
}

impl Lexicon {
    /// A lexicon of the normalized `values`, without repeats; values shorter
    /// than two characters after normalization are left out.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let distinct: BTreeSet<String> =
            values.into_iter().map(normalize).filter(|v| v.chars().count() >= 2).collect();
        let mut entries: Vec<String> = distinct.into_iter().collect();
        entries.sort_by(|a, b| b.chars().count().cmp(&a.chars().count()).then_with(|| a.cmp(b)));
        Lexicon { entries }
    }

    /// How many entries the lexicon holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the lexicon has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries found in `text` (normalized first), in order of position:
    /// occurrences at word boundaries, longest first, each kept only when it
    /// overlaps no occurrence kept before it (of equal length, the one that
    /// starts first wins).
    pub fn matches(&self, text: &str) -> Vec<String> {
        let text = normalize(text);
        self.spans(&text).into_iter().map(|(start, end)| text[start..end].to_string()).collect()
    }

    /// Byte spans of the entries found in normalized `text`, as
    /// [`Lexicon::matches`] chooses them, in order of position.
    fn spans(&self, text: &str) -> Vec<(usize, usize)> {
        let mut candidates: Vec<(usize, usize, usize)> = self
            .entries
            .iter()
            .flat_map(|entry| {
                let chars = entry.chars().count();
                word_matches(text, entry).map(move |(start, end)| (chars, start, end))
            })
            .collect();
        candidates.sort_by_key(|&(chars, start, end)| (Reverse(chars), start, end));
        let mut kept: Vec<(usize, usize)> = Vec::new();
        for (_, start, end) in candidates {
            if !kept.iter().any(|&span| overlaps(span, (start, end))) {
                kept.push((start, end));
            }
        }
        kept.sort_unstable();
        kept
    }
}

/// Whether two half-open spans share a position.
fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// CCI counts of one free-text output: the distinct lexicon entries, clock
/// times and standalone integers it states (see the module documentation),
/// each consistent when it occurs in `source_text` at word boundaries. Facts
/// outside the lexicon that are neither times nor numbers are not seen.
pub fn text_consistency(output: &str, source_text: &str, lexicon: &Lexicon) -> Consistency {
    let output = normalize(output);
    let source = normalize(source_text);
    let named = lexicon.spans(&output);
    let numbers = number_spans(&output)
        .into_iter()
        .filter(|&span| !named.iter().any(|&entry| overlaps(entry, span)));
    let facts: BTreeSet<&str> =
        named.iter().copied().chain(numbers).map(|(start, end)| &output[start..end]).collect();
    let mut out = Consistency::default();
    for fact in facts {
        out.record(occurs(&source, fact));
    }
    out
}

/// Byte spans of the clock times and standalone integers of `text`, in
/// order, each at word boundaries; a clock time is not also read as integers.
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let offsets: Vec<usize> =
        text.char_indices().map(|(at, _)| at).chain(std::iter::once(text.len())).collect();
    let mut spans = Vec::new();
    let mut at = 0;
    while at < chars.len() {
        let starts_word = at == 0 || !chars[at - 1].is_alphanumeric();
        if !(starts_word && chars[at].is_ascii_digit()) {
            at += 1;
            continue;
        }
        let digits_end = at + chars[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        let end = clock_time_end(&chars, at, digits_end)
            .or_else(|| ends_word(&chars, digits_end).then_some(digits_end));
        match end {
            Some(end) => {
                spans.push((offsets[at], offsets[end]));
                at = end;
            }
            None => at = digits_end,
        }
    }
    spans
}

/// Whether no alphanumeric character is at char index `at`.
fn ends_word(chars: &[char], at: usize) -> bool {
    !chars.get(at).is_some_and(|c| c.is_alphanumeric())
}

/// Where a clock time ends (char index), when the digits `start..digits_end`
/// begin one: one or two digits, `:` or `.` and two digits, then either
/// `am`, `pm`, `a.m.` or `p.m.` (directly or after one space) or a word
/// boundary.
fn clock_time_end(chars: &[char], start: usize, digits_end: usize) -> Option<usize> {
    let hours = digits_end - start;
    let separator = chars.get(digits_end)?;
    let minutes = chars.get(digits_end + 1..digits_end + 3)?;
    let time_end = digits_end + 3;
    let is_time = (1..=2).contains(&hours)
        && matches!(separator, ':' | '.')
        && minutes.iter().all(char::is_ascii_digit);
    if !is_time {
        return None;
    }
    meridiem_end(chars, time_end).or_else(|| ends_word(chars, time_end).then_some(time_end))
}

/// Where an `am`/`pm` suffix that follows a time at char index `at` ends,
/// when one does and a word boundary follows it.
fn meridiem_end(chars: &[char], at: usize) -> Option<usize> {
    let start = if chars.get(at) == Some(&' ') { at + 1 } else { at };
    ["a.m.", "p.m.", "a.m", "p.m", "am", "pm"].iter().find_map(|suffix| {
        let end = start + suffix.chars().count();
        let written = chars.get(start..end)?;
        (written.iter().copied().eq(suffix.chars()) && ends_word(chars, end)).then_some(end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(kind, value)| (kind.to_string(), value.to_string())).collect()
    }

    fn counts(tp: usize, fp: usize, fn_: usize) -> Counts {
        Counts { tp, fp, fn_ }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    // -- normalize ----------------------------------------------------------

    #[test]
    fn normalize_lowercases_collapses_and_strips_edges() {
        assert_eq!(normalize("  Main   St.\n"), "main st");
        assert_eq!(normalize("(`Elm Rd`)."), "elm rd");
        assert_eq!(normalize("\"ÉCOLE Saint-Jean\"!"), "école saint-jean");
        assert_eq!(normalize("14:30"), "14:30");
        assert_eq!(normalize("a . b"), "a . b");
        assert_eq!(normalize(" . ; "), "");
    }

    #[test]
    fn occurrence_respects_word_boundaries() {
        assert!(occurs("12 injured", "12"));
        assert!(occurs("at 12:30", "12"));
        assert!(!occurs("123 injured", "12"));
        assert!(!occurs("the 12th", "12"));
        assert!(occurs("x 123 and 12", "12"));
        assert!(occurs("xab ab ab", "ab ab"));
        assert!(!occurs("anything", ""));
    }

    // -- entities -----------------------------------------------------------

    #[test]
    fn perfect_match_scores_one() {
        let gold = pairs(&[("location", "Main St"), ("time", "14:30")]);
        let per_type = match_entities(&gold, &gold);
        assert_eq!(per_type.len(), 2);
        assert_eq!(per_type["location"], counts(1, 0, 0));
        assert_eq!(per_type["time"], counts(1, 0, 0));
        let total = micro(&per_type);
        assert_eq!(total, counts(2, 0, 0));
        assert_eq!((total.precision(), total.recall(), total.f1()), (1.0, 1.0, 1.0));
    }

    #[test]
    fn missed_entity_is_a_false_negative() {
        let gold = pairs(&[("location", "Main St"), ("time", "14:30")]);
        let predicted = pairs(&[("location", "Main St")]);
        let per_type = match_entities(&gold, &predicted);
        assert_eq!(per_type["time"], counts(0, 0, 1));
        let total = micro(&per_type);
        assert_eq!(total, counts(1, 0, 1));
        assert_eq!(total.precision(), 1.0);
        assert_eq!(total.recall(), 0.5);
        assert!(close(total.f1(), 2.0 / 3.0));
    }

    #[test]
    fn spurious_entity_gets_its_own_type() {
        let gold = pairs(&[("location", "Main St")]);
        let predicted = pairs(&[("location", "Main St"), ("Hazard", "smoke")]);
        let per_type = match_entities(&gold, &predicted);
        assert_eq!(per_type["hazard"], counts(0, 1, 0));
        assert_eq!(micro(&per_type), counts(1, 1, 0));
        assert_eq!(micro(&per_type).precision(), 0.5);
    }

    #[test]
    fn type_confusion_is_a_false_positive_and_a_false_negative() {
        let gold = pairs(&[("location", "Main St")]);
        let predicted = pairs(&[("street", "Main St")]);
        let per_type = match_entities(&gold, &predicted);
        assert_eq!(per_type["location"], counts(0, 0, 1));
        assert_eq!(per_type["street"], counts(0, 1, 0));
        assert_eq!(micro(&per_type).f1(), 0.0);
    }

    #[test]
    fn duplicates_match_as_multisets() {
        let once = pairs(&[("vehicle", "car")]);
        let twice = pairs(&[("vehicle", "car"), ("vehicle", "Car.")]);
        assert_eq!(match_entities(&once, &twice)["vehicle"], counts(1, 1, 0));
        assert_eq!(match_entities(&twice, &twice)["vehicle"], counts(2, 0, 0));
        assert_eq!(match_entities(&twice, &once)["vehicle"], counts(1, 0, 1));
    }

    #[test]
    fn normalization_applies_to_types_and_values() {
        let gold = pairs(&[("Location", "Main St.")]);
        let predicted = pairs(&[(" location ", "  MAIN   st ")]);
        let per_type = match_entities(&gold, &predicted);
        assert_eq!(per_type.len(), 1);
        assert_eq!(per_type["location"], counts(1, 0, 0));
    }

    #[test]
    fn per_type_and_micro_scores() {
        let gold = pairs(&[("location", "A"), ("location", "B"), ("time", "T")]);
        let predicted =
            pairs(&[("location", "A"), ("location", "C"), ("time", "T"), ("hazard", "H")]);
        let per_type = match_entities(&gold, &predicted);
        let location = per_type["location"];
        assert_eq!(location, counts(1, 1, 1));
        assert_eq!((location.precision(), location.recall(), location.f1()), (0.5, 0.5, 0.5));
        assert_eq!(per_type["time"].f1(), 1.0);
        let hazard = per_type["hazard"];
        assert_eq!((hazard.precision(), hazard.recall(), hazard.f1()), (0.0, 0.0, 0.0));
        let total = micro(&per_type);
        assert_eq!(total, counts(2, 2, 1));
        assert_eq!(total.precision(), 0.5);
        assert!(close(total.recall(), 2.0 / 3.0));
        assert!(close(total.f1(), 4.0 / 7.0));
    }

    #[test]
    fn empty_counts_score_zero_and_serialize_fn() {
        let empty = Counts::default();
        assert_eq!((empty.precision(), empty.recall(), empty.f1()), (0.0, 0.0, 0.0));
        let mut total = counts(1, 2, 3);
        total.add(counts(10, 20, 30));
        assert_eq!(total, counts(11, 22, 33));
        let json = serde_json::to_string(&total).expect("counts serialize");
        assert_eq!(json, r#"{"tp":11,"fp":22,"fn":33}"#);
        let back: Counts = serde_json::from_str(&json).expect("counts deserialize");
        assert_eq!(back, total);
    }

    // -- bootstrap ----------------------------------------------------------

    fn mean(sample: &[&f64]) -> f64 {
        sample.iter().copied().sum::<f64>() / sample.len() as f64
    }

    #[test]
    fn bootstrap_is_deterministic_for_a_seed() {
        let items: Vec<f64> = (0..50).map(f64::from).collect();
        let first = bootstrap_interval(&items, mean, 200, 7);
        assert_eq!(first, bootstrap_interval(&items, mean, 200, 7));
        assert_ne!(first, bootstrap_interval(&items, mean, 200, 8));
    }

    #[test]
    fn bootstrap_interval_contains_the_point_estimate() {
        let items: Vec<f64> = (0..100).map(f64::from).collect();
        let point = mean(&items.iter().collect::<Vec<_>>());
        assert_eq!(point, 49.5);
        let (lo, hi) = bootstrap_interval(&items, mean, 1000, 42);
        assert!(lo < point && point < hi, "{lo} .. {hi}");
        assert!(hi - lo < 30.0, "{lo} .. {hi}");
    }

    #[test]
    fn bootstrap_of_constant_data_is_a_point_and_empty_data_has_none() {
        let items = vec![3.0; 10];
        assert_eq!(bootstrap_interval(&items, mean, 100, 1), (3.0, 3.0));
        let (lo, hi) = bootstrap_interval(&[] as &[f64], mean, 100, 1);
        assert!(lo.is_nan() && hi.is_nan());
        let (lo, hi) = bootstrap_interval(&items, mean, 0, 1);
        assert!(lo.is_nan() && hi.is_nan());
    }

    #[test]
    fn quantiles_interpolate_linearly() {
        let values = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert!(close(quantile(&values, 0.025), 0.1));
        assert!(close(quantile(&values, 0.975), 3.9));
        assert_eq!(quantile(&values, 0.5), 2.0);
        assert_eq!(quantile(&[5.0], 0.975), 5.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    // -- CIRS ---------------------------------------------------------------

    fn fact(kind: &str, value: &str) -> KeyFact {
        KeyFact { kind: kind.to_string(), value: value.to_string() }
    }

    #[test]
    fn retention_counts_verbatim_facts_at_word_boundaries() {
        let facts = [fact("injured", "12"), fact("location", "Main St."), fact("time", "14:30")];
        assert_eq!(retained(&facts, "Fire at MAIN ST with 12 injured at 14:30."), (3, 3));
        assert_eq!(retained(&facts, "123 people at main st, half past two."), (1, 3));
        assert_eq!(retained(&facts, ""), (0, 3));
        assert_eq!(retained(&[], "anything"), (0, 0));
    }

    // -- CCI: entities ------------------------------------------------------

    const SOURCE: &str = "Fire at Main St near Elm Rd at 14:30. 3 injured.";

    #[test]
    fn entity_consistency_flags_invented_and_contradicted_values() {
        let gold = pairs(&[("location", "Main St"), ("time", "14:30")]);
        let consistent =
            pairs(&[("location", "main st."), ("hazard", "Fire"), ("place", "Elm Rd")]);
        assert_eq!(
            entities_consistency(&consistent, &gold, SOURCE),
            Consistency { consistent: 3, stated: 3 }
        );
        // `15:00` is invented; `main` is in the source and no gold value.
        let invented = pairs(&[("time", "15:00"), ("location", "Main")]);
        let got = entities_consistency(&invented, &gold, SOURCE);
        assert_eq!(got, Consistency { consistent: 1, stated: 2 });
        let contradicted = pairs(&[("location", "14:30")]);
        assert_eq!(
            entities_consistency(&contradicted, &gold, SOURCE),
            Consistency { consistent: 0, stated: 1 }
        );
        assert_eq!(entities_consistency(&[], &gold, SOURCE).ratio(), None);
    }

    #[test]
    fn entity_consistency_counts_repeats_and_partial_words_as_invented() {
        let gold = pairs(&[("injured", "3")]);
        let predicted = pairs(&[("injured", "3"), ("injured", "3"), ("location", "Main S")]);
        assert_eq!(
            entities_consistency(&predicted, &gold, SOURCE),
            Consistency { consistent: 2, stated: 3 }
        );
    }

    // -- CCI: alert ---------------------------------------------------------

    fn gold_alert() -> AlertFields {
        AlertFields {
            scene: "FIRE".to_string(),
            place: "Main St".to_string(),
            time: "14:30".to_string(),
            severity: "high".to_string(),
            hazard: "fire".to_string(),
        }
    }

    #[test]
    fn alert_matching_the_gold_is_fully_consistent() {
        let got =
            alert_consistency("FIRE | Main St | 14:30 | High | fire\n", &gold_alert(), SOURCE);
        assert_eq!(got, Consistency { consistent: 5, stated: 5 });
        assert_eq!(got.ratio(), Some(1.0));
    }

    #[test]
    fn alert_fields_are_checked_against_gold_or_source() {
        // place from the source, not the gold: consistent; severity and
        // scene must equal the gold; an invented hazard is inconsistent.
        let got =
            alert_consistency("SMOKE | Elm Rd | 14:30 | low | explosion", &gold_alert(), SOURCE);
        assert_eq!(got, Consistency { consistent: 2, stated: 5 });
        // a scene word that occurs in the source still has to equal the gold scene
        let got = alert_consistency(
            "INJURED | unknown | unknown | unknown | unknown",
            &gold_alert(),
            SOURCE,
        );
        assert_eq!(got, Consistency { consistent: 0, stated: 1 });
    }

    #[test]
    fn unknown_alert_fields_state_nothing() {
        let got = alert_consistency(
            "FIRE | Unknown. | UNKNOWN | unknown | unknown",
            &gold_alert(),
            SOURCE,
        );
        assert_eq!(got, Consistency { consistent: 1, stated: 1 });
        let none = alert_consistency(
            "unknown | unknown | unknown | unknown | unknown",
            &gold_alert(),
            SOURCE,
        );
        assert_eq!(none, Consistency::default());
        assert_eq!(none.ratio(), None);
    }

    #[test]
    fn malformed_alert_is_one_wrong_fact() {
        for line in ["Fire at Main St", "FIRE | Main St | 14:30 | high", ""] {
            let got = alert_consistency(line, &gold_alert(), SOURCE);
            assert_eq!(got, Consistency { consistent: 0, stated: 1 }, "{line:?}");
            assert_eq!(got.ratio(), Some(0.0));
        }
    }

    // -- CCI: free text -----------------------------------------------------

    #[test]
    fn lexicon_prefers_longest_non_overlapping_matches() {
        let lexicon = Lexicon::new(["Main St", "Main St Bridge", "North Main", "x", " . "]);
        assert_eq!(lexicon.len(), 3);
        // `north main` starts first, but the longer `main st bridge` wins.
        assert_eq!(
            lexicon.matches("Crash on North Main St Bridge, then Main St."),
            vec!["main st bridge".to_string(), "main st".to_string()]
        );
        assert_eq!(lexicon.matches("Crash on main st bridge."), vec!["main st bridge".to_string()]);
        assert!(lexicon.matches("Main Street").is_empty());
        assert!(Lexicon::new(["a", "1"]).is_empty());
    }

    #[test]
    fn text_consistency_checks_lexicon_values_times_and_numbers() {
        let lexicon = Lexicon::new(["Main St", "Main St Bridge", "14:30", "Elm Rd", "3"]);
        let source = "Crash on Main St Bridge at 14:30, 3 injured.";
        let output = "Crash on Main St Bridge at 14:30 with 3 injured near Elm Rd; \
                      5 dead at 9.15 pm. Main St Bridge closed.";
        // main st bridge, 14:30, 3: consistent; elm rd, 5, 9.15 pm: not.
        assert_eq!(
            text_consistency(output, source, &lexicon),
            Consistency { consistent: 3, stated: 6 }
        );
    }

    #[test]
    fn numbers_respect_word_boundaries_and_lexicon_matches() {
        let lexicon = Lexicon::new(["Route 66"]);
        assert_eq!(
            text_consistency("Closed: route 66.", "Route 66 closed", &lexicon),
            Consistency { consistent: 1, stated: 1 }
        );
        assert_eq!(
            text_consistency("123 units sent", "12 units sent", &lexicon),
            Consistency { consistent: 0, stated: 1 }
        );
        assert_eq!(
            text_consistency("unit 4x4 and the 12th", "nothing", &lexicon),
            Consistency::default()
        );
    }

    #[test]
    fn clock_times_take_their_suffix() {
        assert_eq!(
            number_texts("at 2:30 pm and 7.05a.m. then 14:30"),
            ["2:30 pm", "7.05a.m.", "14:30"]
        );
        assert_eq!(number_texts("at 2:30 amber"), ["2:30"]);
        assert_eq!(number_texts("123:45 and 1:5"), ["123", "45", "1", "5"]);
        let none = Lexicon::default();
        assert_eq!(
            text_consistency("Seen at 2:30 PM.", "seen at 2:30 pm", &none),
            Consistency { consistent: 1, stated: 1 }
        );
        assert_eq!(
            text_consistency("Seen at 2:30 PM.", "seen at 14:30", &none),
            Consistency { consistent: 0, stated: 1 }
        );
    }

    fn number_texts(text: &str) -> Vec<&str> {
        number_spans(text).into_iter().map(|(start, end)| &text[start..end]).collect()
    }

    #[test]
    fn text_consistency_cannot_see_facts_outside_lexicon_and_numbers() {
        let lexicon = Lexicon::new(["Main St"]);
        let got = text_consistency(
            "Caused by a drunk driver in a red van.",
            "Crash on Main St.",
            &lexicon,
        );
        assert_eq!(got, Consistency::default());
        assert_eq!(got.ratio(), None);
    }

    #[test]
    fn consistency_counts_add_up() {
        let mut total = Consistency { consistent: 1, stated: 2 };
        total.add(Consistency { consistent: 2, stated: 2 });
        assert_eq!(total, Consistency { consistent: 3, stated: 4 });
        assert_eq!(total.ratio(), Some(0.75));
        let json = serde_json::to_string(&total).expect("consistency serializes");
        assert_eq!(json, r#"{"consistent":3,"stated":4}"#);
    }
}
