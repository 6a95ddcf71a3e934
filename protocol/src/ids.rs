//! Document ids and quarter slugs: the names every node agrees on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest slug accepted; slugs appear in document ids, paths and URLs.
pub const MAX_SLUG_LEN: usize = 48;

/// Why a slug or document id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The slug is empty, too long, or uses characters other than `a-z`, `0-9` and `-`.
    #[error(
        "invalid quarter slug {0:?}: use 1-{MAX_SLUG_LEN} lowercase letters a-z, digits and '-', starting with a letter (e.g. 'johannstadt')"
    )]
    Slug(String),
    /// The document id is neither `city` nor `quarter/<slug>`.
    #[error("invalid document id {0:?}: expected 'city' or 'quarter/<slug>'")]
    Doc(String),
}

/// A quarter's short, stable name (`johannstadt`, `prohlis`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QuarterSlug(String);

impl QuarterSlug {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, IdError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_SLUG_LEN
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(IdError::Slug(s.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QuarterSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for QuarterSlug {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for QuarterSlug {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(&s)
    }
}

impl From<QuarterSlug> for String {
    fn from(s: QuarterSlug) -> String {
        s.0
    }
}

/// The id of a replicated document. Each has exactly one owner: the centre
/// owns `city`, quarter `x` owns `quarter/x`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DocId {
    /// The city document: roster and, later, the frame set by the centre.
    City,
    /// A quarter's document: its concerns and, later, the rest of its up-flow.
    Quarter(QuarterSlug),
}

impl DocId {
    pub fn quarter(slug: &QuarterSlug) -> Self {
        Self::Quarter(slug.clone())
    }

    /// The quarter this document belongs to, if it is a quarter document.
    pub fn quarter_slug(&self) -> Option<&QuarterSlug> {
        match self {
            DocId::City => None,
            DocId::Quarter(q) => Some(q),
        }
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DocId::City => f.write_str("city"),
            DocId::Quarter(q) => write!(f, "quarter/{q}"),
        }
    }
}

impl FromStr for DocId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "city" {
            return Ok(DocId::City);
        }
        match s.strip_prefix("quarter/") {
            Some(slug) => QuarterSlug::new(slug)
                .map(DocId::Quarter)
                .map_err(|_| IdError::Doc(s.to_owned())),
            None => Err(IdError::Doc(s.to_owned())),
        }
    }
}

impl TryFrom<String> for DocId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DocId> for String {
    fn from(d: DocId) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_checked() {
        assert!(QuarterSlug::new("johannstadt").is_ok());
        assert!(QuarterSlug::new("neustadt-2").is_ok());
        for bad in [
            "",
            "Prohlis",
            "1st",
            "a b",
            "ä",
            "quarter/x",
            &"x".repeat(49),
        ] {
            assert!(QuarterSlug::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn doc_ids_round_trip() {
        for s in ["city", "quarter/prohlis"] {
            let id: DocId = s.parse().expect("valid");
            assert_eq!(id.to_string(), s);
        }
        for bad in ["", "quarter/", "quarter/X", "cities", "quarter/a/b"] {
            assert!(bad.parse::<DocId>().is_err(), "{bad:?} accepted");
        }
    }
}
