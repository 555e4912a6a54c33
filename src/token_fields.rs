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
    fn names_round_trip() {
        for f in TokenField::ALL {
            assert_eq!(TokenField::parse(f.as_str()), Some(f));
        }
        assert_eq!(TokenField::parse("id"), None);
    }
}
