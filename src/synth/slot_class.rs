//! What an entity type means to the generators and checks: its class, and
//! the small vocabularies (times of day, severities, number words) that the
//! consistency rules are written in.
//!
//! Entity types are free strings in a recipe's schema, so the class is read
//! from the name: `time` or `*_time` is a clock time; names containing
//! `location`, `address`, `street`, `intersection` or `place` are places;
//! `plate` or `license` is a plate number; `injur*` counts injured people and
//! `fatal*`, `death*`, `dead` or `killed` counts fatalities; `vehicle*` is a
//! categorical value that must fit the scene; anything else is categorical.

/// How values of one entity type are generated and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotClass {
    Time,
    Location,
    Plate,
    Injured,
    Fatalities,
    Vehicle,
    Categorical,
}

impl SlotClass {
    pub fn of(entity_type: &str) -> Self {
        let name = entity_type.to_ascii_lowercase();
        let has = |part: &str| name.contains(part);
        if name == "time" || name.ends_with("_time") || name == "clock" {
            Self::Time
        } else if ["location", "address", "street", "intersection", "place"].iter().any(|p| has(p))
        {
            Self::Location
        } else if has("plate") || has("license") {
            Self::Plate
        } else if has("injur") {
            Self::Injured
        } else if has("fatal") || has("death") || has("dead") || has("killed") {
            Self::Fatalities
        } else if has("vehicle") {
            Self::Vehicle
        } else {
            Self::Categorical
        }
    }

    pub fn is_count(self) -> bool {
        matches!(self, Self::Injured | Self::Fatalities)
    }
}

/// A window of the day, as the `time_of_day` attribute names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DayPart {
    /// 05:00 to 11:59.
    Morning,
    /// 12:00 to 16:59.
    Afternoon,
    /// 17:00 to 20:59.
    Evening,
    /// 21:00 to 04:59.
    Night,
}

impl DayPart {
    pub const ALL: [DayPart; 4] = [Self::Morning, Self::Afternoon, Self::Evening, Self::Night];

    /// Reads a `time_of_day` attribute value; `overnight` and `late night` mean night.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "morning" | "early morning" => Some(Self::Morning),
            "afternoon" | "midday" | "noon" => Some(Self::Afternoon),
            "evening" => Some(Self::Evening),
            "night" | "overnight" | "late night" | "nighttime" => Some(Self::Night),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Morning => "morning",
            Self::Afternoon => "afternoon",
            Self::Evening => "evening",
            Self::Night => "night",
        }
    }

    /// The window containing a minute of the day (0..1440).
    pub fn of_minute(minute: u32) -> Self {
        match minute / 60 {
            5..=11 => Self::Morning,
            12..=16 => Self::Afternoon,
            17..=20 => Self::Evening,
            _ => Self::Night,
        }
    }

    /// First minute of the window and its length in minutes.
    pub fn span(self) -> (u32, u32) {
        match self {
            Self::Morning => (5 * 60, 7 * 60),
            Self::Afternoon => (12 * 60, 5 * 60),
            Self::Evening => (17 * 60, 4 * 60),
            Self::Night => (21 * 60, 8 * 60),
        }
    }
}

/// Words in running text that name a part of the day. Matching is on whole
/// words, case-insensitively.
pub const TIME_WORDS: &[(&str, DayPart)] = &[
    ("morning", DayPart::Morning),
    ("afternoon", DayPart::Afternoon),
    ("evening", DayPart::Evening),
    ("night", DayPart::Night),
    ("overnight", DayPart::Night),
    ("tonight", DayPart::Night),
];

pub fn time_word(word: &str) -> Option<DayPart> {
    TIME_WORDS.iter().find(|(w, _)| w.eq_ignore_ascii_case(word)).map(|(_, part)| *part)
}

/// Reads a clock time as minutes after midnight: `14:35`, `2:35 pm`,
/// `2:35PM`, `1435 hours`, `1435hrs`, `noon`, `midnight`.
pub fn parse_clock(value: &str) -> Option<u32> {
    let lower = value.trim().to_ascii_lowercase();
    match lower.as_str() {
        "noon" => return Some(12 * 60),
        "midnight" => return Some(0),
        _ => {}
    }
    let (body, meridiem) = split_meridiem(&lower);
    let body = body.trim_end_matches("hours").trim_end_matches("hrs").trim();
    let (hour, minute) = match body.split_once(':') {
        Some((h, m)) => (h.trim().parse::<u32>().ok()?, m.trim().parse::<u32>().ok()?),
        None if body.len() == 4 && body.bytes().all(|b| b.is_ascii_digit()) => {
            (body[..2].parse().ok()?, body[2..].parse().ok()?)
        }
        None if meridiem.is_some() => (body.parse().ok()?, 0),
        None => return None,
    };
    let hour = match meridiem {
        Some(pm) if (1..=12).contains(&hour) => hour % 12 + if pm { 12 } else { 0 },
        Some(_) => return None,
        None => hour,
    };
    (hour < 24 && minute < 60).then_some(hour * 60 + minute)
}

/// Splits a trailing `am`/`pm` (with or without dots) off; `Some(true)` is pm.
fn split_meridiem(text: &str) -> (&str, Option<bool>) {
    for (suffix, pm) in [("a.m.", false), ("p.m.", true), ("am", false), ("pm", true)] {
        if let Some(body) = text.strip_suffix(suffix) {
            return (body.trim_end(), Some(pm));
        }
    }
    (text, None)
}

/// Severity levels, ordered. Seed attribute values are mapped onto them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Low,
    Medium,
    High,
}

impl Severity {
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "low" | "minor" => Some(Self::Low),
            "medium" | "moderate" => Some(Self::Medium),
            "high" | "major" | "severe" | "critical" => Some(Self::High),
            _ => None,
        }
    }

    /// Injured counts a report of this severity may carry (inclusive).
    pub fn injured_range(self) -> (u32, u32) {
        match self {
            Self::Low => (1, 2),
            Self::Medium => (1, 5),
            Self::High => (2, 12),
        }
    }
}

const NUMBER_WORDS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// `n` as an English word, for 0 to 20.
pub fn number_word(n: u32) -> Option<&'static str> {
    NUMBER_WORDS.get(n as usize).copied()
}

/// Reads a count written in digits or as a word from zero to twenty.
pub fn parse_count(value: &str) -> Option<u32> {
    let value = value.trim();
    if let Ok(n) = value.parse() {
        return Some(n);
    }
    let lower = value.to_ascii_lowercase();
    match lower.as_str() {
        "a" | "an" | "a single" | "single" => Some(1),
        _ => NUMBER_WORDS.iter().position(|w| *w == lower).map(|n| n as u32),
    }
}

/// Phrases that say nobody was hurt; they contradict an injured count above zero.
pub const NO_INJURY_PHRASES: &[&str] = &[
    "no injuries",
    "no injury",
    "no one was injured",
    "no one was hurt",
    "nobody was injured",
    "nobody was hurt",
    "without injury",
    "uninjured",
    "no one injured",
];

/// Phrases that say nobody died.
pub const NO_FATALITY_PHRASES: &[&str] =
    &["no fatalities", "no deaths", "no one was killed", "nobody was killed", "no one died"];

/// Whether text says nobody was hurt (or died) while it has a count slot of that kind:
/// a template built from sentences of different reports can do that.
pub fn denies_count(text: &str, class: SlotClass) -> bool {
    let phrases = match class {
        SlotClass::Injured => NO_INJURY_PHRASES,
        SlotClass::Fatalities => NO_FATALITY_PHRASES,
        _ => return false,
    };
    let lower = text.to_lowercase();
    phrases.iter().any(|p| lower.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_names() {
        assert_eq!(SlotClass::of("time"), SlotClass::Time);
        assert_eq!(SlotClass::of("dispatch_time"), SlotClass::Time);
        assert_eq!(SlotClass::of("location"), SlotClass::Location);
        assert_eq!(SlotClass::of("plate"), SlotClass::Plate);
        assert_eq!(SlotClass::of("injured"), SlotClass::Injured);
        assert_eq!(SlotClass::of("fatalities"), SlotClass::Fatalities);
        assert_eq!(SlotClass::of("vehicle"), SlotClass::Vehicle);
        assert_eq!(SlotClass::of("weather"), SlotClass::Categorical);
    }

    #[test]
    fn clocks_parse_in_common_forms() {
        assert_eq!(parse_clock("14:35"), Some(14 * 60 + 35));
        assert_eq!(parse_clock("2:35 pm"), Some(14 * 60 + 35));
        assert_eq!(parse_clock("12:10 a.m."), Some(10));
        assert_eq!(parse_clock("0640 hours"), Some(6 * 60 + 40));
        assert_eq!(parse_clock("7 PM"), Some(19 * 60));
        assert_eq!(parse_clock("25:00"), None);
        assert_eq!(parse_clock("soon"), None);
    }

    #[test]
    fn day_parts_cover_the_clock() {
        for minute in 0..1440 {
            let part = DayPart::of_minute(minute);
            let (start, len) = part.span();
            assert!((minute + 1440 - start) % 1440 < len, "{minute} outside {part:?}");
        }
    }

    #[test]
    fn counts_read_words_and_digits() {
        assert_eq!(parse_count("Three"), Some(3));
        assert_eq!(parse_count("12"), Some(12));
        assert_eq!(parse_count("many"), None);
    }
}
