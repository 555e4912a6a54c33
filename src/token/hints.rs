//! One-sentence hints: the likely cause of a grant failure and the fix.
//! Built from codes, statuses and config, never from secrets.

use super::grant::{Delivery, FailureClass, GrantError};
use super::reason::Reason;
use crate::config::{AssertionSource, AuthMethod, CredentialConfig, GrantType};
use std::time::Duration;

/// What to check when the IdP answers `invalid_client`: names the settings
/// of the configured method (docs/client-authentication.md).
pub fn invalid_client(cfg: &CredentialConfig) -> String {
    let m = cfg.auth_method.as_str();
    match (cfg.auth_method, &cfg.client_assertion) {
        (AuthMethod::PrivateKeyJwt, Some(AssertionSource::Key { key, path, .. })) => format!(
            "The IdP rejected the client assertion: check that the public key of client_assertion_key {} (JWK thumbprint {}{}) is registered for client_id {:?}, that the IdP accepts {} (client_assertion_alg), and whether it wants client_assertion_aud = \"issuer\".",
            path.display(),
            key.thumbprint(),
            key.kid().map(|k| format!(", kid {k}")).unwrap_or_default(),
            cfg.client_id,
            key.alg(),
        ),
        (AuthMethod::PrivateKeyJwt, Some(AssertionSource::File(path))) => format!(
            "The IdP rejected the token in client_assertion_file {} as a client assertion: check the federated credential registered for client_id {:?} (the token's issuer, subject and audience).",
            path.display(),
            cfg.client_id,
        ),
        (AuthMethod::ClientSecretJwt, _) => format!(
            "The IdP rejected the client assertion: check client_id and client_secret (the HS256 key), and whether the IdP wants client_assertion_aud = \"issuer\" (auth_method = \"{m}\")."
        ),
        (AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth, _) => format!(
            "The IdP rejected the TLS client certificate: check that client_cert {} is the one registered for client_id {:?} ({}), and that the token endpoint is the IdP's mTLS endpoint (mtls_endpoint_aliases).",
            cfg.client_cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            cfg.client_id,
            if cfg.auth_method == AuthMethod::TlsClientAuth {
                "its subject, for tls_client_auth"
            } else {
                "the certificate itself, for self_signed_tls_client_auth"
            },
        ),
        _ => {
            let other = match cfg.auth_method {
                AuthMethod::ClientSecretBasic => "client_secret_post",
                _ => "client_secret_basic",
            };
            format!(
                "The IdP rejected the client credentials: check client_id and client_secret, and whether the IdP expects auth_method = \"{other}\" instead of \"{m}\"."
            )
        }
    }
}

pub fn for_grant_error(cfg: &CredentialConfig, e: &GrantError) -> String {
    let desc = e.description.as_deref().unwrap_or("").to_ascii_lowercase();
    let code = e.code.as_deref().unwrap_or("");
    if let Some(host) = &e.redirect_host {
        return format!("The token endpoint redirected to {host}: token_url is probably wrong (a login page or an old path); set token_url to the final endpoint.");
    }
    if let Some(h) = vendor(cfg, e) {
        return h;
    }
    match e.class {
        FailureClass::InvalidGrant => {
            if cfg.grant == GrantType::ClientCredentials {
                return "The IdP rejected the client_credentials grant; check the client's grants and audience at the IdP.".into();
            }
            if desc.contains("reuse") || desc.contains("already used") || desc.contains("spent") {
                "The refresh token was already used: another client or replica shares this refresh token, or a rotation was lost; give each credential its own login (or use fleet mode) and run `tokenproxy login`.".into()
            } else if desc.contains("client") {
                "The refresh token was issued to a different client_id; log in again with this credential's client (`tokenproxy login`).".into()
            } else if desc.contains("expired") {
                "The refresh token expired at the IdP (an idle or absolute lifetime ran out); run `tokenproxy login` to start a new family.".into()
            } else {
                "The refresh token was revoked, expired or already used at the IdP; run `tokenproxy login` (or set a new refresh_token seed) to start a new family.".into()
            }
        }
        // Nothing was sent: the request could not be made here.
        FailureClass::Config if e.delivery == Delivery::NotSent && e.status.is_none() => {
            format!(
                "tokenproxy could not authenticate the client ({}); fix the credential's {} and reload (a change to the file is picked up by itself).",
                crate::error_chain(e),
                match cfg.client_assertion {
                    Some(AssertionSource::File(_)) => "client_assertion_file",
                    _ => "client authentication settings",
                }
            )
        }
        FailureClass::Config => match code {
            "invalid_client" => invalid_client(cfg),
            "invalid_scope" => "The IdP does not allow the requested scopes for this client; fix `scopes` (or the route's scopes) to what the client is granted.".into(),
            "unauthorized_client" | "unsupported_grant_type" => format!(
                "This client is not allowed to use the {} grant at the IdP; enable the grant for the client or change `grant`.",
                cfg.grant.as_str()
            ),
            "invalid_request" => "The IdP says the token request is malformed; check extra_params, audience and resource, and the IdP's required parameters.".into(),
            _ if e.status == Some(404) => "The token endpoint answered 404: token_url is wrong.".into(),
            _ => format!(
                "The IdP refused the request ({}); check the credential's configuration against the IdP's client settings.",
                code_or_status(e)
            ),
        },
        FailureClass::Transient => {
            if e.status == Some(429) {
                "The IdP is rate limiting token requests; retrying after Retry-After; a still-valid token keeps serving meanwhile.".into()
            } else if e.status.is_some() {
                format!("The IdP is failing ({}); retrying with backoff; a still-valid token keeps serving meanwhile.", code_or_status(e))
            } else {
                "The IdP is unreachable or did not answer in time; check network, DNS, egress proxy and token_url; retrying with backoff; a still-valid token keeps serving meanwhile.".into()
            }
        }
    }
}

/// A hint in the provider's own terms, for the vendor codes the engine
/// recognises (docs/providers.md, "Error vocabularies").
fn vendor(cfg: &CredentialConfig, e: &GrantError) -> Option<String> {
    let code = e.vendor_code.as_deref()?;
    let login = "run `tokenproxy login` to start a new family";
    Some(match code.to_ascii_lowercase().as_str() {
        "aadsts70008" | "aadsts700082" => format!(
            "Microsoft says the refresh token expired from inactivity ({code}); {login} (a credential refreshed at least every 90 days does not hit this)."
        ),
        "aadsts50173" => format!(
            "Microsoft revoked the grant ({code}): the user's password or credentials changed, or an admin revoked sessions; {login}."
        ),
        "aadsts90002" => format!(
            "Microsoft does not know this tenant ({code}): set tenant to the directory's ID (a GUID), one of its verified domains, or common, organizations or consumers."
        ),
        "aadsts7000215" => format!(
            "Microsoft rejected the client secret ({code}): set client_secret to the secret's Value (not its Secret ID) and check it has not expired in the app registration."
        ),
        "bad_refresh_token" => format!(
            "{} says the refresh token is bad: it expired, was revoked (the app uninstalled or the authorization removed) or was already used{}; {login}.",
            provider_name(cfg, "The IdP"),
            if cfg.provider.is_some_and(|p| p.name == "github") {
                ", or the app's expiring user tokens setting changed"
            } else {
                ""
            }
        ),
        "invalid_refresh_token" => format!(
            "{} says the refresh token is invalid (revoked, already used, or the app was reinstalled); {login}.",
            provider_name(cfg, "The IdP")
        ),
        "invalid_client_id" | "bad_client_secret" => format!(
            "{} rejected the client ({code}): check client_id and client_secret against the app's credentials.",
            provider_name(cfg, "The IdP")
        ),
        _ => return None,
    })
}

/// Vendor codes for "this authorization code is no good" (GitHub, Slack,
/// HubSpot): the code exchange's `invalid_grant`.
const CODE_REFUSED: &[&str] = &["bad_verification_code", "invalid_code", "bad_auth_code"];

/// Whether the IdP refused the authorization code itself (expired, used,
/// another redirect_uri or client), rather than the client or the request.
pub fn code_refused(e: &GrantError) -> bool {
    let code = e.code.as_deref().unwrap_or("");
    e.class == FailureClass::InvalidGrant
        || CODE_REFUSED.iter().any(|c| c.eq_ignore_ascii_case(code))
}

/// A failed code exchange (`tokenproxy login`, admin `/callback`): the
/// likely cause and the fix, in the provider's terms where its code says
/// more. Not [`for_grant_error`]: that speaks of refresh tokens.
pub fn for_code_exchange(cfg: &CredentialConfig, e: &GrantError, code_age: Duration) -> String {
    let who = provider_name(cfg, "The IdP");
    let code = e.code.as_deref().unwrap_or("");
    let again = "start a new login and finish it promptly";
    match e.vendor_code.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("aadsts70008") => return format!(
            "Microsoft says the authorization code expired (AADSTS70008): codes are short-lived, so the callback must reach tokenproxy within minutes; {again}."
        ),
        Some("aadsts54005") => return format!(
            "Microsoft says the authorization code was already redeemed (AADSTS54005): each code works once (a reloaded callback page or another process spent it); {again}."
        ),
        Some("aadsts7000215" | "aadsts90002") => {
            if let Some(h) = vendor(cfg, e) {
                return h;
            }
        }
        _ => {}
    }
    if CODE_REFUSED.iter().any(|c| c.eq_ignore_ascii_case(code)) {
        return format!(
            "{who} rejected the authorization code ({code}): it expired, was already used, or was issued for another redirect_uri or client_id; {again}."
        );
    }
    let desc = e.description.as_deref().unwrap_or("");
    match e.class {
        FailureClass::InvalidGrant => match code_cause(desc, code_age) {
            Some((c, Fix::Again)) => format!("Likely cause: {c}. Start a new login."),
            Some((c, Fix::Promptly)) => {
                format!("Likely cause: {c}. Start a new login and finish it promptly.")
            }
            None => "Likely causes: the code was already used (single-use), it expired (codes live 1-10 minutes), the redirect_uri differs from the authorization request's or the registered one, the PKCE verifier does not match the challenge, or the code was issued to another client. Start a new login.".into(),
        },
        _ if code == "invalid_client"
            || code.eq_ignore_ascii_case("incorrect_client_credentials")
            || code.eq_ignore_ascii_case("invalid_client_id")
            || code.eq_ignore_ascii_case("bad_client_secret") =>
        {
            if cfg.auth_method.uses_secret() && cfg.client_assertion.is_none() {
                format!(
                    "{who} rejected the client authentication: tokenproxy authenticated client_id {:?} with auth_method = \"{}\". Check client_id and client_secret, or try auth_method = \"{}\".",
                    cfg.client_id,
                    cfg.auth_method.as_str(),
                    match cfg.auth_method {
                        AuthMethod::ClientSecretBasic => "client_secret_post",
                        _ => "client_secret_basic",
                    }
                )
            } else {
                invalid_client(cfg)
            }
        }
        _ => for_grant_error(cfg, e),
    }
}

/// What [`for_code_exchange`] advises after a [`code_cause`]: said once,
/// there, never in the cause itself.
enum Fix {
    /// Start a new login.
    Again,
    /// Start a new login and finish it promptly (the code ran out).
    Promptly,
}

/// The likely cause of an `invalid_grant` on the code exchange, most
/// specific first (RFC 6749 §4.1.3, RFC 7636 §4.6), and the fix to add.
fn code_cause(desc: &str, code_age: Duration) -> Option<(&'static str, Fix)> {
    let d = desc.to_ascii_lowercase();
    if d.contains("redirect") {
        Some(("redirect_uri mismatch: the token request must carry exactly the redirect_uri of the authorization request, and it must be registered at the IdP byte for byte (scheme, host, port, path, trailing slash)", Fix::Again))
    } else if d.contains("verifier") || d.contains("pkce") || d.contains("challenge") {
        Some(("PKCE mismatch: the code_verifier does not match the code_challenge; the code was obtained by another login attempt or process than the one exchanging it", Fix::Again))
    } else if d.contains("already")
        || d.contains("used")
        || d.contains("reuse")
        || d.contains("redeemed")
    {
        Some(("code reused: authorization codes are single-use (and a replay may revoke the tokens issued with it)", Fix::Again))
    } else if d.contains("expired") {
        Some(("code expired: codes live 1-10 minutes", Fix::Promptly))
    } else if d.contains("client") {
        Some(("code issued to another client: the authorization request and the token request must use the same client_id", Fix::Again))
    } else if code_age > Duration::from_secs(60) {
        Some((
            "probably an expired code (the callback came late)",
            Fix::Promptly,
        ))
    } else {
        None
    }
}

/// The IdP redirected back with `error` (RFC 6749 §4.1.2.1): what to do,
/// in the provider's terms where its description names a known code.
pub fn for_authorization_error(error: &str, description: Option<&str>) -> String {
    let aadsts = description.and_then(|d| {
        let rest = &d[d.find("AADSTS")? + 6..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        (!digits.is_empty()).then_some(digits)
    });
    match aadsts.as_deref() {
        Some("50011") => return "Microsoft says the redirect URI is not registered for the app (AADSTS50011): add redirect_uri exactly as configured (scheme, host, port, path) under the app registration's Authentication platform, then log in again.".into(),
        Some("700016") => return "Microsoft does not know this client_id in the tenant (AADSTS700016): check client_id, and set tenant to the directory the app is registered in (or make the app multi-tenant).".into(),
        Some("90002") => return "Microsoft does not know this tenant (AADSTS90002): set tenant to the directory's ID (a GUID), one of its verified domains, or common, organizations or consumers.".into(),
        Some("65001") => return "Microsoft says consent is missing (AADSTS65001): the user or an admin must consent to the requested scopes; grant admin consent in the app registration, or log in again and approve.".into(),
        _ => {}
    }
    match error {
        "access_denied" => "The user (or a policy at the IdP) declined; run the login again and approve the requested access, or ask the IdP admin to grant this client.".into(),
        "invalid_scope" => "Fix `scopes` to scopes this client may request, then log in again.".into(),
        "unauthorized_client" | "unsupported_response_type" => "Enable the authorization code grant for this client at the IdP, then log in again.".into(),
        "invalid_request" => "Check authorize_url, client_id, redirect_uri (registered exactly) and that the IdP supports PKCE S256.".into(),
        // GitHub redirects to the registered callback with this.
        "redirect_uri_mismatch" => "The redirect_uri is not the callback URL registered for the app: set redirect_uri to exactly the registered one (or register it), then log in again.".into(),
        "login_required" | "consent_required" | "interaction_required" => "Sign in at the IdP in this browser and approve the consent screen, then log in again.".into(),
        "server_error" | "temporarily_unavailable" => "The IdP failed; try again in a minute.".into(),
        _ => "See the IdP's description above, fix the client or the request, and log in again.".into(),
    }
}

fn provider_name(cfg: &CredentialConfig, default: &'static str) -> &'static str {
    cfg.provider.map_or(default, |p| p.display)
}

fn code_or_status(e: &GrantError) -> String {
    match (&e.code, e.status) {
        (Some(c), Some(s)) => format!("{s} {c}"),
        (Some(c), None) => c.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no answer".into(),
    }
}

/// `gateway_status`: the 5xx without an OAuth error body that hid the answer.
pub fn lost_rotation(cfg: &CredentialConfig, gateway_status: Option<u16>) -> String {
    let check = if cfg.introspection_url.is_some() {
        "the IdP's introspection says it is no longer active"
    } else {
        "there is no introspection_url or reuse_grace to prove presenting it again is safe"
    };
    match gateway_status {
        Some(status) => format!("The token endpoint answered {status} without an OAuth error body: a gateway in front of the IdP may have lost its answer after the refresh token was rotated, and {check}; presenting it again would trigger reuse detection, so run `tokenproxy login` to start a new family (setting introspection_url, or reuse_grace to the IdP's reuse window, lets tokenproxy verify and retry next time)."),
        None => format!("A refresh may have been spent without its answer arriving (timeout, reset or crash) and {check}; presenting it again would trigger reuse detection, so run `tokenproxy login` to start a new family."),
    }
}

pub fn dead_on_disk(reason: &Reason) -> String {
    match reason {
        Reason::LostRotation => "This token set was marked lost (a refresh answer never arrived); run `tokenproxy login` to start a new family.".into(),
        Reason::Migrated => "This token set was moved out of this store (`tokenproxy store migrate` or `store export`); point this process at the store it went to (or log in again).".into(),
        _ => format!("The IdP rejected this refresh token earlier ({reason}); run `tokenproxy login` or set a new refresh_token seed."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::grant::Delivery;

    fn refused(code: &str, vendor: Option<&str>, class: FailureClass) -> GrantError {
        let mut e = GrantError::transient(Delivery::Answered, Some(400), "refused");
        e.class = class;
        e.code = Some(code.into());
        e.vendor_code = vendor.map(str::to_owned);
        e
    }

    #[test]
    fn a_code_exchange_hint_speaks_of_the_code_never_of_a_refresh_token() {
        let mut cfg = crate::token::tests_support::credential(
            "c",
            "https://idp.example/token",
            AuthMethod::ClientSecretBasic,
        );
        let age = Duration::from_secs(3);
        // Microsoft's AADSTS70008 names codes and refresh tokens alike.
        let e = refused(
            "invalid_grant",
            Some("AADSTS70008"),
            FailureClass::InvalidGrant,
        );
        let h = for_code_exchange(&cfg, &e, age);
        assert!(h.contains("authorization code expired"), "{h}");
        assert!(!for_grant_error(&cfg, &e).contains("authorization code"));
        let e = refused(
            "invalid_grant",
            Some("AADSTS54005"),
            FailureClass::InvalidGrant,
        );
        assert!(for_code_exchange(&cfg, &e, age).contains("already redeemed"));
        cfg.provider = crate::providers::find("hubspot");
        let e = refused("BAD_AUTH_CODE", None, FailureClass::Config);
        assert!(code_refused(&e));
        let h = for_code_exchange(&cfg, &e, age);
        assert!(
            h.starts_with("HubSpot rejected the authorization code (BAD_AUTH_CODE)"),
            "{h}"
        );
        let e = refused("invalid_client", None, FailureClass::Config);
        assert!(!code_refused(&e));
        assert!(
            for_code_exchange(&cfg, &e, age).contains("try auth_method = \"client_secret_post\"")
        );
    }

    /// The clauses of a hint (split on ". " and ";"), lowercased and trimmed.
    fn clauses(h: &str) -> Vec<String> {
        h.split(". ")
            .flat_map(|s| s.split(';'))
            .map(|c| c.trim().trim_end_matches('.').trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty())
            .collect()
    }

    /// A clause said twice, or said again as the start of a longer one
    /// ("start a new login" then "start a new login and finish it promptly").
    fn repeated(h: &str) -> Option<(String, String)> {
        let c = clauses(h);
        for (i, a) in c.iter().enumerate() {
            for (j, b) in c.iter().enumerate() {
                if i != j && (a == b || b.starts_with(&format!("{a} "))) {
                    return Some((a.clone(), b.clone()));
                }
            }
        }
        None
    }

    #[test]
    fn no_code_exchange_hint_says_the_same_thing_twice() {
        let mut cfg = crate::token::tests_support::credential(
            "c",
            "https://idp.example/token",
            AuthMethod::ClientSecretBasic,
        );
        let grant = |desc: &str| {
            let mut e = refused("invalid_grant", None, FailureClass::InvalidGrant);
            e.description = Some(desc.into());
            e
        };
        // Every code-exchange failure this module tells apart.
        let mut cases = vec![
            // code_cause, most specific first, then by the code's age.
            (grant("redirect_uri does not match"), 3),
            (grant("code_verifier does not match the challenge"), 3),
            (grant("authorization code already used"), 3),
            (
                grant("authorization code already used; its tokens are revoked"),
                3,
            ),
            (grant("code was redeemed before"), 3),
            (grant("authorization code expired"), 3),
            (grant("code was issued to another client"), 3),
            (grant("invalid code"), 120),
            (grant("invalid code"), 3),
        ];
        for vendor in ["AADSTS70008", "AADSTS54005", "AADSTS7000215", "AADSTS90002"] {
            cases.push((
                refused("invalid_grant", Some(vendor), FailureClass::InvalidGrant),
                3,
            ));
        }
        for code in CODE_REFUSED.iter().chain(&["BAD_AUTH_CODE"]) {
            cases.push((refused(code, None, FailureClass::Config), 3));
            cases.push((refused(code, None, FailureClass::InvalidGrant), 3));
        }
        for code in [
            "invalid_client",
            "incorrect_client_credentials",
            "invalid_client_id",
            "bad_client_secret",
            "invalid_scope",
            "invalid_request",
        ] {
            cases.push((refused(code, None, FailureClass::Config), 3));
        }
        for provider in [None, Some("github"), Some("hubspot"), Some("microsoft")] {
            cfg.provider = provider.and_then(crate::providers::find);
            for (e, age) in &cases {
                let h = for_code_exchange(&cfg, e, Duration::from_secs(*age));
                assert!(
                    repeated(&h).is_none(),
                    "{provider:?} {:?} {:?} ({age}s): {:?} in {h:?}",
                    e.code,
                    e.description,
                    repeated(&h).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_reused_code_hint_says_start_a_new_login_once() {
        let cfg = crate::token::tests_support::credential(
            "c",
            "https://idp.example/token",
            AuthMethod::ClientSecretBasic,
        );
        let mut e = refused("invalid_grant", None, FailureClass::InvalidGrant);
        e.description = Some("authorization code already used; its tokens are revoked".into());
        let h = for_code_exchange(&cfg, &e, Duration::ZERO);
        assert!(h.starts_with("Likely cause: code reused:"), "{h}");
        assert_eq!(
            h.to_ascii_lowercase().matches("start a new login").count(),
            1,
            "{h}"
        );
    }

    #[test]
    fn an_authorization_error_hint_reads_the_vendor_code_first() {
        let h = for_authorization_error(
            "invalid_request",
            Some("AADSTS50011: The redirect URI does not match."),
        );
        assert!(
            h.contains("AADSTS50011") && h.contains("redirect_uri"),
            "{h}"
        );
        assert!(for_authorization_error("access_denied", None).contains("declined"));
        assert!(for_authorization_error("redirect_uri_mismatch", None).contains("registered"));
    }
}
