//! `-l` label selectors as kubectl writes them: `k=v`, `k==v`, `k!=v`, `k` and `!k`,
//! joined by commas (all must hold).

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

impl Selector {
    /// clap's value parser: the message names the requirement that is not one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(key(k, part)?, value(v))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key(k, part)?, value(v))
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(key(k, part)?)
            } else {
                Requirement::Exists(key(part, part)?)
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    /// The selector as `key=value` pairs, for what matches by equality only (`lab probe`).
    pub fn equalities(&self) -> Result<BTreeMap<String, String>, String> {
        self.0
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => Ok((k.clone(), v.clone())),
                other => Err(format!(
                    "{other:?} is not key=value: this selector takes equalities only"
                )),
            })
            .collect()
    }
}

fn key(k: &str, part: &str) -> Result<String, String> {
    let k = k.trim();
    let valid = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if valid {
        Ok(k.to_string())
    } else {
        Err(format!(
            "{part:?} is not a label requirement (k=v, k!=v, k or !k)"
        ))
    }
}

fn value(v: &str) -> String {
    v.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn requirements_combine_as_kubectls() {
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let db = labels(&[("app", "db")]);
        let s = |t: &str| Selector::parse(t).unwrap();
        assert!(s("app=web").matches(&web) && !s("app=web").matches(&db));
        assert!(s("app==web,tier").matches(&web) && !s("app=web,tier").matches(&db));
        assert!(s("app!=web").matches(&db) && !s("app!=web").matches(&web));
        assert!(s("!tier").matches(&db) && !s("!tier").matches(&web));
        assert!(s("").matches(&db));
        assert!(Selector::parse("=web").is_err());
        assert!(Selector::parse("a b=c").is_err());
        assert_eq!(
            s("a=1,b=2").equalities().unwrap(),
            labels(&[("a", "1"), ("b", "2")])
        );
        assert!(s("a!=1").equalities().is_err());
    }
}
