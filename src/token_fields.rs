//! Values a token response carries besides the token, that routes may use
//! (`upstream = "{token.instance_url}/services/data/"`): a closed list, each
//! with the rule a value must pass before it can steer traffic.
//!
//! A token endpoint is trusted with tokens, not with where requests go: a
//! value becomes an upstream only as a bare https origin (http only on
//! loopback, for tests and local IdPs), without userinfo, path, query or
//! fragment. A value that fails is dropped (the route answers 503), never
//! a reason to distrust the grant it came with.

use std::collections::BTreeMap;

/// A response member a route may name as `{token.NAME}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TokenField {
    /// Salesforce: the API host of the org the grant belongs to.
    InstanceUrl,
}

impl TokenField {
    pub const ALL: [TokenField; 1] = [TokenField::InstanceUrl];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenField::InstanceUrl => "instance_url",
        }
    }

    /// How a route names it: `{token.instance_url}`.
    pub fn placeholder(self) -> &'static str {
        match self {
            TokenField::InstanceUrl => "{token.instance_url}",
        }
    }

    pub fn parse(name: &str) -> Option<TokenField> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The value as it may be used, or why not (static text: the value
    /// itself may be anything).
    pub fn check(self, value: &str) -> Result<String, &'static str> {
        match self {
            TokenField::InstanceUrl => origin(value),
        }
    }
}

/// `value` as `scheme://authority` (lower-case scheme and host, no
/// trailing slash).
fn origin(value: &str) -> Result<String, &'static str> {
    let uri: http::Uri = value.trim().parse().map_err(|_| "not a URL")?;
    let scheme = uri
        .scheme_str()
        .ok_or("not an absolute URL")?
        .to_ascii_lowercase();
    let authority = uri.authority().ok_or("no host")?;
    if authority.as_str().contains('@') {
        return Err("carries user:password@");
    }
    let host = authority.host();
    if host.is_empty() {
        return Err("no host");
    }
    match scheme.as_str() {
        "https" => {}
        "http" if crate::net::is_loopback_host(host) => {}
        "http" => return Err("is plain http off loopback"),
        _ => return Err("is neither https nor loopback http"),
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() || value.contains('#') {
        return Err("is not a bare origin (it has a path, query or fragment)");
    }
    Ok(format!(
        "{scheme}://{}",
        authority.as_str().to_ascii_lowercase()
    ))
}

/// The checked values of one token response (or one stored record), by
/// field name. Stored as such in the record.
pub type Fields = BTreeMap<String, String>;

/// A `token_field_hosts` entry as written, lower-cased: `.example.com`
/// (any subdomain of example.com) or `api.example.com` (that host only).
pub fn host_pattern(p: &str) -> Result<String, &'static str> {
    let p = p.trim().to_ascii_lowercase();
    if p.starts_with("*.") {
        return Err("is a wildcard; write \".example.com\" for any subdomain");
    }
    let name = p.strip_prefix('.').unwrap_or(&p);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err("is not a host name (no scheme, port, path or wildcard)");
    }
    Ok(p)
}

/// Whether a checked origin's host is allowed by `hosts` (entries from
/// [`host_pattern`]). Loopback stays allowed, as [`TokenField::check`]
/// allows it: tests and local IdPs, never a host elsewhere.
pub fn host_allowed(origin: &str, hosts: &[String]) -> bool {
    let Some(host) = origin
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_ascii_lowercase))
    else {
        return false;
    };
    crate::net::is_loopback_host(&host)
        || hosts.iter().any(|p| match p.strip_prefix('.') {
            // `.example.com`: a subdomain, so the dot is part of the match
            // (evilexample.com is not one).
            Some(_) => host.ends_with(p.as_str()),
            None => host == *p,
        })
}

/// The values `hosts` allows (`None`: any checked origin) and the others,
/// as (field, host) for the log.
pub fn allowed(fields: &Fields, hosts: Option<&[String]>) -> (Fields, Vec<(String, String)>) {
    let Some(hosts) = hosts else {
        return (fields.clone(), Vec::new());
    };
    let mut kept = Fields::new();
    let mut dropped = Vec::new();
    for (k, v) in fields {
        if host_allowed(v, hosts) {
            kept.insert(k.clone(), v.clone());
        } else {
            let host = v
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned));
            dropped.push((k.clone(), host.unwrap_or_default()));
        }
    }
    (kept, dropped)
}

/// [`allowed`], logging `token_field_rejected` for each value dropped (a
/// host is no secret): the grant stands, routes using it answer 503.
pub fn keep_allowed(credential: &str, hosts: Option<&[String]>, fields: Fields) -> Fields {
    let (kept, dropped) = allowed(&fields, hosts);
    for (field, host) in dropped {
        tracing::error!(
            event = "token_field_rejected",
            credential,
            field = field.as_str(),
            host = host.as_str(),
            error = "names a host outside token_field_hosts",
            hint = "Routes that use this value answer 503 until a token response carries an allowed one; if the host is the provider's, add it to the credential's token_field_hosts.",
            "Token response value rejected"
        );
    }
    kept
}

/// The values after a grant: each field the response sent replaces the
/// previous value (dropped when it failed its check); a field it did not
/// send keeps the previous value, as a missing `refresh_token` does (RFC
/// 6749 §6).
pub fn merge(previous: &Fields, sent: &Fields, rejected: &[(TokenField, &'static str)]) -> Fields {
    let mut out = previous.clone();
    for (f, _) in rejected {
        out.remove(f.as_str());
    }
    out.extend(sent.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_https_origins_or_loopback_http_pass() {
        let f = TokenField::InstanceUrl;
        assert_eq!(
            f.check("https://NA1.my.Salesforce.com").unwrap(),
            "https://na1.my.salesforce.com"
        );
        assert_eq!(
            f.check("https://eu.example.com:8443/").unwrap(),
            "https://eu.example.com:8443"
        );
        assert_eq!(
            f.check("http://127.0.0.1:4000").unwrap(),
            "http://127.0.0.1:4000"
        );
        for bad in [
            "http://evil.example.com",
            "ftp://x.example.com",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "https://user:pw@x.example.com",
            "https://x.example.com/path",
            "https://x.example.com/?q=1",
            "https://x.example.com#f",
            "//x.example.com",
            "x.example.com",
            "",
            "https://",
        ] {
            assert!(f.check(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_grant_replaces_drops_or_keeps_each_value() {
        let prev = Fields::from([("instance_url".into(), "https://a.example".into())]);
        assert_eq!(merge(&prev, &Fields::new(), &[]), prev);
        let sent = Fields::from([("instance_url".into(), "https://b.example".into())]);
        assert_eq!(merge(&prev, &sent, &[]), sent);
        let bad = [(TokenField::InstanceUrl, "is plain http off loopback")];
        assert!(merge(&prev, &Fields::new(), &bad).is_empty());
    }

    #[test]
    fn host_lists_take_subdomains_or_exact_names_and_loopback() {
        let hosts: Vec<String> = [".salesforce.com", "api.exact.test"]
            .iter()
            .map(|p| host_pattern(p).unwrap())
            .collect();
        for ok in [
            "https://na1.my.salesforce.com",
            "https://a.b.salesforce.com:8443",
            "https://api.exact.test",
            "http://127.0.0.1:4000",
            "https://localhost",
        ] {
            assert!(host_allowed(ok, &hosts), "{ok}");
        }
        for bad in [
            "https://salesforce.com",
            "https://evilsalesforce.com",
            "https://salesforce.com.evil.example",
            "https://x.api.exact.test",
            "https://exact.test",
            "not a url",
        ] {
            assert!(!host_allowed(bad, &hosts), "{bad}");
        }
        assert_eq!(host_pattern(" .Force.COM ").unwrap(), ".force.com");
        for bad in [
            "",
            ".",
            "*.x.com",
            "https://x.com",
            "x.com:443",
            "x.com/p",
            "a..b",
            "-a.com",
            "x y",
        ] {
            assert!(host_pattern(bad).is_err(), "{bad:?} accepted");
        }
        let f = Fields::from([("instance_url".into(), "https://eu.evil.example".into())]);
        let (kept, dropped) = allowed(&f, Some(&hosts));
        assert!(kept.is_empty());
        assert_eq!(
            dropped,
            [("instance_url".to_owned(), "eu.evil.example".to_owned())]
        );
        assert_eq!(allowed(&f, None).0, f);
    }

    #[test]
    fn names_round_trip() {
        for f in TokenField::ALL {
            assert_eq!(TokenField::parse(f.as_str()), Some(f));
        }
        assert_eq!(TokenField::parse("id"), None);
    }
}
