//! Label keys and values, and label selectors.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::{Check, check_str, invalid, names::dns1123_subdomain, one_of};

const SELECTOR_OPERATORS: &[&str] = &["In", "NotIn", "Exists", "DoesNotExist"];

/// Name part of a label key, and a non-empty label value.
fn label_name_chars(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Qualified name: an optional DNS subdomain prefix and '/', then a name of up to 63 characters.
pub(super) fn label_key(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty".into());
            }
            dns1123_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
            name
        }
        None => key,
    };
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !label_name_chars(name) {
        return Err(
            "name part must consist of alphanumeric characters, '-', '_' or '.', \
                    and must start and end with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

pub(super) fn label_value(value: &str) -> Result<(), String> {
    if value.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !value.is_empty() && !label_name_chars(value) {
        return Err(
            "a valid label must be an empty string or consist of alphanumeric \
                    characters, '-', '_' or '.', and must start and end with an alphanumeric \
                    character"
                .into(),
        );
    }
    Ok(())
}

pub(super) fn labels(field: &str, labels: Option<&BTreeMap<String, String>>) -> Check {
    for (key, value) in labels.into_iter().flatten() {
        check_str(field, key, "label key", label_key)?;
        check_str(&format!("{field}.{key}"), value, "label value", label_value)?;
    }
    Ok(())
}

pub(super) fn label_selector(field: &str, selector: &LabelSelector) -> Check {
    labels(
        &format!("{field}.matchLabels"),
        selector.match_labels.as_ref(),
    )?;
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("{field}.matchExpressions[{i}]");
        check_str(
            &format!("{field}.key"),
            &requirement.key,
            "label key",
            label_key,
        )?;
        let operator = requirement.operator.as_str();
        one_of(
            &format!("{field}.operator"),
            operator,
            "operator",
            SELECTOR_OPERATORS,
        )?;
        let values = requirement.values.as_deref().unwrap_or_default();
        match (operator, values.is_empty()) {
            ("In" | "NotIn", true) => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("must be specified when operator is {operator}"),
                ));
            }
            ("Exists" | "DoesNotExist", false) => {
                return Err(invalid(
                    format!("{field}.values"),
                    format!("may not be specified when operator is {operator}"),
                ));
            }
            _ => {}
        }
        for (j, value) in values.iter().enumerate() {
            check_str(
                &format!("{field}.values[{j}]"),
                value,
                "label value",
                label_value,
            )?;
        }
    }
    Ok(())
}

pub(super) fn selector_is_empty(selector: &LabelSelector) -> bool {
    selector
        .match_labels
        .as_ref()
        .is_none_or(BTreeMap::is_empty)
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(Vec::is_empty)
}
