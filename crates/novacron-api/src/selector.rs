//! Label selectors: `k=v`, `k!=v`, `k` (exists), `!k` (absent), comma-separated (AND).
//! Field selectors: `path=v`, `path!=v` on a kind's selectable fields (e.g.
//! `status.node=node-1`), comma-separated (AND).

use std::collections::BTreeMap;

use crate::error::FieldError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let bad = || FieldError::new("label_selector", format!("invalid selector term {term:?}"));
            let valid_key =
                |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::Absent(k.trim().into())
            } else {
                Requirement::Exists(term.into())
            };
            let key = match &req {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::Absent(k) => k,
            };
            if !valid_key(key) {
                return Err(bad());
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_by(|k| labels.get(k).map(String::as_str))
    }

    /// Whether labels read through `label` (value by key) match, without
    /// gathering them first (a watch tests every change against its selector).
    pub fn matches_by<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::Absent(k) => label(k).is_none(),
        })
    }
}

/// A field selector: equality terms on dotted paths into an object's JSON.
/// A missing or null field reads as the empty string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `s`, accepting only the paths in `selectable`.
    pub fn parse(s: &str, selectable: &[&str]) -> Result<Self, FieldError> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(FieldError::new(
                    "field_selector",
                    format!("invalid field selector term {term:?} (use field=value or field!=value)"),
                ));
            };
            let path = path.trim();
            if !selectable.contains(&path) {
                return Err(FieldError::new(
                    "field_selector",
                    format!(
                        "field {path:?} cannot be selected on (selectable: {})",
                        selectable.join(", ")
                    ),
                ));
            }
            terms.push((path.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the selector asks for exactly `path=value` (among other terms).
    pub fn requires(&self, path: &str, value: &str) -> bool {
        self.0.iter().any(|(p, equal, v)| *equal && p == path && v == value)
    }

    pub fn matches(&self, object: &serde_json::Value) -> bool {
        self.0.iter().all(|(path, equal, wanted)| {
            let field = path.split('.').try_fold(object, |v, key| v.get(key));
            let actual = match field {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (actual == *wanted) == *equal
        })
    }
}

impl std::fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terms: Vec<String> = self
            .0
            .iter()
            .map(|(p, equal, v)| format!("{p}{}{v}", if *equal { "=" } else { "!=" }))
            .collect();
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_selector_semantics() {
        let vm = serde_json::json!({"metadata": {"name": "a"}, "status": {"node": "node-1", "pid": 7, "gone": null}});
        let fields = ["status.node", "status.pid", "status.gone", "metadata.name"];
        let m = |s: &str| FieldSelector::parse(s, &fields).map(|sel| sel.matches(&vm));
        assert_eq!(m("status.node=node-1"), Ok(true));
        assert_eq!(m("status.node==node-1,metadata.name=a"), Ok(true));
        assert_eq!(m("status.node=node-2"), Ok(false));
        assert_eq!(m("status.node!=node-2"), Ok(true));
        assert_eq!(m("status.pid=7"), Ok(true));
        assert_eq!(m("status.gone="), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(FieldSelector::parse("spec.vcpus=1", &fields).is_err());
        assert!(FieldSelector::parse("status.node", &fields).is_err());
        let sel = FieldSelector::parse("status.node=node-1,metadata.name!=b", &fields).unwrap_or_default();
        assert!(sel.requires("status.node", "node-1"));
        assert!(!sel.requires("status.node", "node-2"));
        assert_eq!(sel.to_string(), "status.node=node-1,metadata.name!=b");
    }

    #[test]
    fn selector_semantics() {
        let labels: BTreeMap<String, String> = [("app".into(), "web".into()), ("zone".into(), "a".into())].into();
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(&labels));
        assert_eq!(m("app=web"), Ok(true));
        assert_eq!(m("app==web"), Ok(true));
        assert_eq!(m("app=db"), Ok(false));
        assert_eq!(m("app!=db,zone"), Ok(true));
        assert_eq!(m("!zone"), Ok(false));
        assert_eq!(m("!tier"), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(LabelSelector::parse("a b=c").is_err());
    }
}
