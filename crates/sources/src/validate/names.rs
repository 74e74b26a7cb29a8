//! The API server's name formats: RFC 1123 and RFC 1035 labels, subdomains, port names.

/// Lower-case alphanumerics and '-', starting and ending with an alphanumeric.
fn label_chars(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 label: names of Namespaces, ports, containers.
pub(super) fn dns1123_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !label_chars(s) {
        return Err(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric \
                    characters or '-', and must start and end with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// RFC 1035 label: Service names, which become DNS names and so must start with a letter.
pub(super) fn dns1035_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !label_chars(s) || !s.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(
            "a DNS-1035 label must consist of lower case alphanumeric characters \
                    or '-', start with an alphabetic character, and end with an \
                    alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// RFC 1123 subdomain: names of most objects, label key prefixes.
pub(super) fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !s.split('.').all(label_chars) {
        return Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                    characters, '-' or '.', and must start and end with an alphanumeric \
                    character"
                .into(),
        );
    }
    Ok(())
}

/// IANA_SVC_NAME (RFC 6335): named ports.
pub(super) fn iana_svc_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only lower case alphanumeric characters or '-'".into());
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter".into());
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not begin or end with '-' or contain '--'".into());
    }
    Ok(())
}
