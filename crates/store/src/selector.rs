//! Kubernetes label selectors, evaluated on plain label maps.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// LabelSelector semantics: every matchLabels pair and every matchExpressions requirement must
/// hold; an empty selector matches everything. An unknown operator matches nothing, so a
/// selector the validator would refuse never selects more than it names.
pub fn matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let listed = value.is_some_and(|v| r.values.iter().flatten().any(|x| x == v));
        match r.operator.as_str() {
            "In" => listed,
            "NotIn" => !listed,
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}

/// Every label key the selector names.
pub fn keys(selector: &LabelSelector) -> impl Iterator<Item = &str> {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, _)| k.as_str());
    let expressions = selector
        .match_expressions
        .iter()
        .flatten()
        .map(|r| r.key.as_str());
    pairs.chain(expressions)
}
