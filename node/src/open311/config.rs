//! A node's Open311 settings: the service list (each service code is a
//! concern category) with its attribute definitions, and what discovery
//! names. Read from `open311.toml` in the data directory, or the default
//! shipped with the node (`node/open311.toml`, German municipal services).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The default settings, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../open311.toml");

/// The file in a data directory that replaces the default.
pub const FILE_NAME: &str = "open311.toml";

/// A node's Open311 settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Open311Config {
    /// The public URL of this endpoint, for discovery; without it, the
    /// address the request came to.
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub contact: Option<String>,
    #[serde(default)]
    pub key_service: Option<String>,
    /// When these settings last changed (W3C timestamp), for discovery.
    pub changeset: String,
    /// Centre only: each quarter's public endpoint, named when a POST
    /// reaches the (read-only) centre.
    #[serde(default)]
    pub quarter_endpoints: BTreeMap<String, String>,
    #[serde(rename = "service")]
    pub services: Vec<Service>,
}

/// One service: a kind of concern citizens can report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The concern category, e.g. `road-damage`.
    pub code: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub keywords: Vec<String>,
    /// The department a new request of this service is assigned to.
    #[serde(default)]
    pub agency: Option<String>,
    #[serde(default, rename = "attribute")]
    pub attributes: Vec<Attribute>,
}

/// A question a service asks (`attribute[code]` in a POST).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attribute {
    pub code: String,
    /// `false` for information shown to the citizen only, not asked.
    #[serde(default = "yes")]
    pub variable: bool,
    pub datatype: Datatype,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub datatype_description: Option<String>,
    #[serde(default)]
    pub order: u32,
    pub description: String,
    #[serde(default)]
    pub values: Vec<ValueDef>,
}

fn yes() -> bool {
    true
}

/// The attribute datatypes of GeoReport v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Datatype {
    String,
    Number,
    Datetime,
    Text,
    Singlevaluelist,
    Multivaluelist,
}

/// One choice of a list attribute.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueDef {
    pub key: String,
    pub name: String,
}

impl Default for Open311Config {
    fn default() -> Self {
        // The compiled-in file is checked by a unit test; should it ever be
        // broken, the node still serves an (empty) service list.
        Self::parse(DEFAULT_TOML).unwrap_or_else(|e| {
            tracing::error!(error = %e, "the default Open311 settings are invalid");
            Self {
                base_url: None,
                contact: None,
                key_service: None,
                changeset: "1970-01-01T00:00:00+00:00".into(),
                quarter_endpoints: BTreeMap::new(),
                services: Vec::new(),
            }
        })
    }
}

impl Open311Config {
    /// The data directory's `open311.toml`, or the default when it has none.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Parses and checks settings.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if crate::open311::render::parse_w3c(&self.changeset).is_none() {
            return Err(format!(
                "changeset {:?} is not a W3C timestamp such as 2026-01-31T00:00:00+01:00",
                self.changeset
            ));
        }
        let mut codes = BTreeSet::new();
        for s in &self.services {
            let code_ok = !s.code.is_empty()
                && s.code.len() <= 64
                && s.code
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !code_ok {
                return Err(format!(
                    "service code {:?} must be 1 to 64 letters, digits, '-' or '_' (it becomes the concern's category)",
                    s.code
                ));
            }
            if !codes.insert(s.code.as_str()) {
                return Err(format!("service code {:?} is listed twice", s.code));
            }
            if s.name.trim().is_empty() {
                return Err(format!("service {:?} has an empty name", s.code));
            }
            let mut attribute_codes = BTreeSet::new();
            for a in &s.attributes {
                if a.code.is_empty() || a.code.len() > 64 || a.code.contains(['[', ']']) {
                    return Err(format!(
                        "service {:?}: attribute code {:?} must be 1 to 64 bytes without brackets",
                        s.code, a.code
                    ));
                }
                if !attribute_codes.insert(a.code.as_str()) {
                    return Err(format!(
                        "service {:?}: attribute {:?} is listed twice",
                        s.code, a.code
                    ));
                }
                let is_list = matches!(
                    a.datatype,
                    Datatype::Singlevaluelist | Datatype::Multivaluelist
                );
                if is_list == a.values.is_empty() {
                    return Err(format!(
                        "service {:?}: attribute {:?} must have values exactly when it is a singlevaluelist or multivaluelist",
                        s.code, a.code
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn service(&self, code: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.code == code)
    }

    /// The service codes, for error messages.
    pub fn codes(&self) -> String {
        self.services
            .iter()
            .map(|s| s.code.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Service {
    /// Checks a POST's `attribute[code]` answers against this service's
    /// definitions; returns them as the concern keeps them.
    pub fn check_answers(
        &self,
        answers: BTreeMap<String, Vec<String>>,
    ) -> Result<BTreeMap<String, Vec<String>>, String> {
        for code in answers.keys() {
            if !self
                .attributes
                .iter()
                .any(|a| a.variable && &a.code == code)
            {
                return Err(format!(
                    "service '{}' has no attribute '{code}'; its attributes are listed at services/{}.json",
                    self.code, self.code
                ));
            }
        }
        let mut out = BTreeMap::new();
        for a in self.attributes.iter().filter(|a| a.variable) {
            let values: Vec<String> = answers
                .get(&a.code)
                .map(|v| {
                    v.iter()
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if values.is_empty() {
                if a.required {
                    return Err(format!(
                        "attribute[{}] is required for service '{}': {}",
                        a.code, self.code, a.description
                    ));
                }
                continue;
            }
            let fail = |what: &str| {
                Err(format!(
                    "attribute[{}] of service '{}' {what}",
                    a.code, self.code
                ))
            };
            let key_ok = |v: &String| a.values.iter().any(|d| &d.key == v);
            match a.datatype {
                Datatype::Multivaluelist => {
                    if !values.iter().all(key_ok) {
                        return fail(&format!("takes only the keys {}", keys(a)));
                    }
                }
                _ if values.len() > 1 => return fail("takes one value"),
                Datatype::Singlevaluelist => {
                    if !values.iter().all(key_ok) {
                        return fail(&format!("takes one of the keys {}", keys(a)));
                    }
                }
                Datatype::Number => {
                    if !values
                        .iter()
                        .all(|v| v.parse::<f64>().is_ok_and(f64::is_finite))
                    {
                        return fail("must be a number");
                    }
                }
                Datatype::Datetime => {
                    if !values
                        .iter()
                        .all(|v| crate::open311::render::parse_w3c(v).is_some())
                    {
                        return fail("must be a W3C timestamp such as 2026-01-31T08:00:00+01:00");
                    }
                }
                Datatype::String => {
                    if values.iter().any(|v| v.chars().count() > 200) {
                        return fail("is longer than 200 characters");
                    }
                }
                Datatype::Text => {
                    if values.iter().any(|v| v.chars().count() > 4000) {
                        return fail("is longer than 4000 characters");
                    }
                }
            }
            out.insert(a.code.clone(), values);
        }
        Ok(out)
    }
}

fn keys(a: &Attribute) -> String {
    a.values
        .iter()
        .map(|v| v.key.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_is_valid_and_german() {
        let config = Open311Config::parse(DEFAULT_TOML).expect("default parses");
        for code in [
            "road-damage",
            "lighting",
            "litter",
            "green-spaces",
            "playgrounds",
            "graffiti",
        ] {
            assert!(config.service(code).is_some(), "{code} missing");
        }
        assert_eq!(
            config.service("lighting").map(|s| s.name.as_str()),
            Some("Straßenbeleuchtung")
        );
    }

    #[test]
    fn a_citys_file_in_the_data_directory_replaces_the_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let default = Open311Config::load(dir.path()).expect("default");
        assert!(default.service("road-damage").is_some());
        let path = dir.path().join(FILE_NAME);
        std::fs::write(
            &path,
            "changeset = \"2026-02-01T00:00:00+01:00\"\n[[service]]\ncode = \"benches\"\nname = \"Bänke\"\n",
        )
        .expect("write");
        let city = Open311Config::load(dir.path()).expect("city file");
        assert_eq!(city.codes(), "benches");
        std::fs::write(&path, "changeset = \"soon\"\nservice = []\n").expect("write");
        let err = Open311Config::load(dir.path()).unwrap_err();
        assert!(
            err.contains("open311.toml") && err.contains("changeset"),
            "{err}"
        );
    }

    #[test]
    fn broken_settings_say_what_is_wrong() {
        let dup = "changeset = \"2026-01-01\"\n[[service]]\ncode = \"a\"\nname = \"A\"\n[[service]]\ncode = \"a\"\nname = \"B\"\n";
        assert!(Open311Config::parse(dup).unwrap_err().contains("twice"));
        let bad_code = "changeset = \"2026-01-01\"\n[[service]]\ncode = \"a b\"\nname = \"A\"\n";
        assert!(
            Open311Config::parse(bad_code)
                .unwrap_err()
                .contains("letters")
        );
        let list_without_values = "changeset = \"2026-01-01\"\n[[service]]\ncode = \"a\"\nname = \"A\"\n[[service.attribute]]\ncode = \"x\"\ndatatype = \"singlevaluelist\"\ndescription = \"?\"\n";
        assert!(
            Open311Config::parse(list_without_values)
                .unwrap_err()
                .contains("values")
        );
        let unknown = "changeset = \"2026-01-01\"\nservices = []\n";
        assert!(Open311Config::parse(unknown).is_err());
    }

    #[test]
    fn answers_are_checked_against_the_definitions() {
        let config = Open311Config::default();
        let road = config.service("road-damage").expect("road-damage");
        let answers = |pairs: &[(&str, &[&str])]| -> BTreeMap<String, Vec<String>> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect()
        };
        assert!(
            road.check_answers(answers(&[]))
                .unwrap_err()
                .contains("required")
        );
        assert!(
            road.check_answers(answers(&[("danger", &["maybe"])]))
                .unwrap_err()
                .contains("yes, no")
        );
        assert!(
            road.check_answers(answers(&[("danger", &["yes"]), ("colour", &["red"])]))
                .unwrap_err()
                .contains("no attribute 'colour'")
        );
        let ok = road
            .check_answers(answers(&[("danger", &["yes"]), ("surface", &["road"])]))
            .expect("valid");
        assert_eq!(ok.len(), 2);
        let dumping = config.service("illegal-dumping").expect("dumping");
        assert!(
            dumping
                .check_answers(answers(&[("kind", &["bulky", "rubble"])]))
                .is_ok()
        );
        let other = config.service("other").expect("other");
        assert!(other.check_answers(answers(&[("count", &["x"])])).is_err());
        assert!(
            other
                .check_answers(answers(&[("when_seen", &["soon"])]))
                .is_err()
        );
        assert!(
            other
                .check_answers(answers(&[("when_seen", &["2026-01-31T08:00:00+01:00"])]))
                .is_ok()
        );
    }
}
