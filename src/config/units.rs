//! Small value parsers: `${VAR}` expansion, durations and sizes. Pure
//! functions of their input (the environment is passed in).

use std::time::Duration;

/// Why a `${...}` could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// The variable is not set (and no `:-default` was given).
    Missing(String),
    /// `${` without `}`, or a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    Syntax(String),
}

impl std::fmt::Display for ExpandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpandError::Missing(v) => write!(
                f,
                "environment variable {v} is not set (referenced as ${{{v}}}; write $${{ for a literal ${{)"
            ),
            ExpandError::Syntax(m) => f.write_str(m),
        }
    }
}

/// Expands `${VAR}` and `${VAR:-default}` from `env`; `$${` is a literal `${`.
/// Any other `$` is kept as is, so values such as passwords with a `$` survive.
pub fn expand(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    if !input.contains('$') {
        return Ok(input.to_owned());
    }
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body.find('}').ok_or_else(|| {
                ExpandError::Syntax("unterminated ${ (write $${ for a literal ${)".into())
            })?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            if !is_var_name(name) {
                return Err(ExpandError::Syntax(format!(
                    "invalid variable name {name:?} in ${{...}} (expected letters, digits and _)"
                )));
            }
            match (env(name), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(ExpandError::Missing(name.to_owned())),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// `"30s"`, `"5m"`, `"1h 30m"`, `"0s"` (humantime). A bare number is refused:
/// seconds or milliseconds would be a guess.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{s:?} has no unit; expected a duration such as \"30s\", \"5m\" or \"1h\""
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{s:?} is not a duration ({e}); expected e.g. \"30s\", \"5m\" or \"1h\"")
    })
}

/// `"100"` (bytes), `"64KiB"`, `"1MiB"`, `"2GiB"`, `"10kB"`/`"10KB"` (×1000),
/// `"5MB"`, `"1GB"`; a space before the unit is allowed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad =
        || format!("{s:?} is not a size; expected e.g. \"64KiB\", \"1MiB\" or \"100\" (bytes)");
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "kB" | "KB" | "k" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables() {
        assert_eq!(expand("x${A}y", &env).unwrap(), "xalphay");
        assert_eq!(expand("${A}${A}", &env).unwrap(), "alphaalpha");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand("${NOPE:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(expand("${A:-dflt}", &env).unwrap(), "alpha");
        assert_eq!(expand("no vars", &env).unwrap(), "no vars");
    }

    #[test]
    fn dollar_escapes_and_plain_dollars() {
        assert_eq!(expand("$${A}", &env).unwrap(), "${A}");
        assert_eq!(expand("pa$$word$", &env).unwrap(), "pa$$word$");
        assert_eq!(expand("$A", &env).unwrap(), "$A");
    }

    #[test]
    fn expansion_errors() {
        assert_eq!(
            expand("${NOPE}", &env),
            Err(ExpandError::Missing("NOPE".into()))
        );
        assert!(matches!(expand("${A", &env), Err(ExpandError::Syntax(_))));
        assert!(matches!(expand("${1X}", &env), Err(ExpandError::Syntax(_))));
        assert!(matches!(expand("${}", &env), Err(ExpandError::Syntax(_))));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("100B").unwrap(), 100);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("64 KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("10kB").unwrap(), 10_000);
        assert_eq!(parse_size("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in [
            "",
            "KiB",
            "1.5MiB",
            "-1",
            "64 kibibytes",
            "99999999999999999999GiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
