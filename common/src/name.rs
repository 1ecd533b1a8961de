//! Names of services, versions and jobs.

/// Whether `name` is a valid service, version or job name: what a DNS label
/// allows, so that it can appear in hostnames (`web.mesh`) and metric
/// labels. The error says what `what` must look like.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!("{what} {name:?} is not a valid name: use 1 to 63 lowercase letters, digits, '-' or '_'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        let long = "a".repeat(64);
        // (name, valid)
        let cases = [
            ("web", true),
            ("web-v2_a", true),
            ("", false),
            ("-web", false),
            ("Web", false),
            ("web.mesh", false),
            (long.as_str(), false),
        ];
        for (name, valid) in cases {
            assert_eq!(check_name("service", name).is_ok(), valid, "{name:?}");
        }
    }
}
