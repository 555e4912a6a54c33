//! One-sentence hints: the likely cause of a grant failure and the fix.
//! Built from codes, statuses and config, never from secrets.

use super::grant::{Delivery, FailureClass, GrantError};
use super::reason::Reason;
use crate::config::{AssertionSource, AuthMethod, CredentialConfig, GrantType};

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
