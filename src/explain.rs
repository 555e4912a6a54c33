//! `tokenproxy explain`: reads our JSON log lines and says, per credential,
//! what went wrong, in the words of docs/troubleshooting.md, what tokenproxy
//! did about it and the fix. One table ([`ENTRIES`]) is the knowledge base;
//! the page shares its anchors (a test keeps the two equal).
//!
//! Reads logs only: opens no socket, no store, no config. Prints nothing a
//! log line carried verbatim except short codes and scrubbed, capped text,
//! so a token that leaked into a line does not leak further.

use crate::process::EXIT_USAGE;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::ExitCode;

/// How bad a cause is: a dead credential needs a human; a warning may heal
/// by itself; a note is normal operation worth knowing about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Severity {
    Dead,
    Warning,
    Note,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Dead => "dead",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One cause: the `reason`s, `outcome`s, OAuth codes and log events that
/// point to it, and what to say about it. `{credential}` in `fix` is
/// replaced by the credential's name.
#[derive(Debug)]
pub(crate) struct Entry {
    /// The anchor in docs/troubleshooting.md (the slug of `title`).
    pub anchor: &'static str,
    pub title: &'static str,
    pub keys: &'static [&'static str],
    pub severity: Severity,
    pub cause: &'static str,
    pub did: &'static str,
    pub fix: &'static str,
}

pub(crate) const DOC: &str = "docs/troubleshooting.md";

/// The knowledge base. Several entries may share a key (`invalid_grant` has
/// several causes); the log line's description and hint pick one.
pub(crate) const ENTRIES: &[Entry] = &[
    Entry {
        anchor: "refresh-token-reused-after-rotation",
        title: "Refresh token reused after rotation",
        keys: &["invalid_grant", "bad_refresh_token"],
        severity: Severity::Dead,
        cause: "The IdP saw a refresh token presented after it had already been exchanged for a new one, and (reuse detection) revoked the whole token family. Another client, replica or copy of the store shares this refresh token, or an earlier rotation's answer was lost.",
        did: "Marked the credential dead and stopped presenting the token; the current access token keeps being injected until it expires, then requests get 503 credential_unavailable.",
        fix: "Give the refresh token one writer: one replica with a file store on a persistent volume, or fleet mode (store.url = \"postgres://...\"); make sure nothing else (a script, another proxy) uses the same client login. Then run `tokenproxy login -c FILE {credential}`.",
    },
    Entry {
        anchor: "refresh-token-revoked-or-expired",
        title: "Refresh token revoked or expired",
        keys: &["invalid_grant", "bad_refresh_token", "expired_token"],
        severity: Severity::Dead,
        cause: "The IdP no longer accepts this refresh token: it was revoked (user removed the app's access, password change, admin action), it reached its absolute lifetime, or it was issued to another client_id.",
        did: "Marked the credential dead; no token request is sent with this refresh token again.",
        fix: "Run `tokenproxy login -c FILE {credential}` (or set a new refresh_token seed in the config and reload); check at the IdP that the grant was not revoked on purpose.",
    },
    Entry {
        anchor: "refresh-token-idle-expired",
        title: "Refresh token idle-expired",
        keys: &["invalid_grant", "expired_token"],
        severity: Severity::Dead,
        cause: "The refresh token expired at the IdP: it was not used within the IdP's idle window (sliding expiry), or its absolute lifetime ran out. Common after a proxy was stopped for days.",
        did: "Marked the credential dead; no token request is sent with this refresh token again.",
        fix: "Run `tokenproxy login -c FILE {credential}`; keep the proxy running (it refreshes well inside the idle window), and watch `refresh_token_expiring` warnings.",
    },
    Entry {
        anchor: "refresh-token-expiring-soon",
        title: "Refresh token expiring soon",
        keys: &["refresh_token_expiring"],
        severity: Severity::Warning,
        cause: "The IdP said when the refresh token itself expires (refresh_token_expires_in) and that is less than 7 days away; rotation does not extend it.",
        did: "Keeps refreshing normally and warns; when it runs out the credential goes dead.",
        fix: "Run `tokenproxy login -c FILE {credential}` before the refresh token expires.",
    },
    Entry {
        anchor: "authorization-code-reused-or-expired",
        title: "Authorization code reused or expired",
        keys: &["exchange_failed", "bad_verification_code", "state_expired", "state_reused"],
        severity: Severity::Warning,
        cause: "During `tokenproxy login` the authorization code was rejected: codes are single-use and live 1-10 minutes, so a code exchanged twice, or a callback that came late, fails with invalid_grant.",
        did: "Installed nothing; the credential keeps its previous state.",
        fix: "Run `tokenproxy login -c FILE {credential}` again and finish it promptly in the same browser; do not reload the callback page.",
    },
    Entry {
        anchor: "redirect_uri-or-pkce-mismatch",
        title: "redirect_uri or PKCE mismatch",
        keys: &["exchange_failed", "state_other_browser"],
        severity: Severity::Warning,
        cause: "During `tokenproxy login` the IdP refused the code because the token request's redirect_uri differs from the one registered and used in the authorization request, or the code_verifier does not match the code_challenge (the code came from another login attempt).",
        did: "Installed nothing; the credential keeps its previous state.",
        fix: "Register the redirect_uri exactly (scheme, host, port, path, trailing slash) at the IdP as `tokenproxy login` prints it, finish each login in the browser that started it, then run `tokenproxy login -c FILE {credential}` again.",
    },
    Entry {
        anchor: "wrong-client-credentials-or-auth-method",
        title: "Wrong client credentials or auth method",
        keys: &["invalid_client", "unauthorized_client", "unsupported_grant_type"],
        severity: Severity::Dead,
        cause: "The IdP rejected the client: client_id or client_secret is wrong or rotated, the IdP expects the other client authentication method (client_secret_basic vs client_secret_post), or the client may not use this grant type.",
        did: "Marked the credential dead as a configuration error; retries every 5 minutes and at once when the config or a *_file secret changes.",
        fix: "Fix client_id / client_secret (or client_secret_file) for credential {credential}, or set auth_method = \"client_secret_post\" (or \"client_secret_basic\"); enable the grant for the client at the IdP. Check with `tokenproxy doctor -c FILE {credential}`, then reload (SIGHUP or POST /reload).",
    },
    Entry {
        anchor: "token-endpoint-misconfigured",
        title: "Token endpoint misconfigured",
        keys: &["config_error", "invalid_request", "invalid_scope", "not_found"],
        severity: Severity::Dead,
        cause: "The token request cannot work as configured: token_url is wrong (404, a redirect to a login page), the scopes are not allowed for the client, or the IdP needs parameters (audience, resource, extra_params) it did not get.",
        did: "Marked the credential dead as a configuration error; retries every 5 minutes and at once when the config changes.",
        fix: "Fix token_url (or issuer), scopes, audience/resource or extra_params of credential {credential}; `tokenproxy doctor -c FILE {credential}` checks the endpoint without spending a token; then reload.",
    },
    Entry {
        anchor: "lost-rotation",
        title: "Lost rotation",
        keys: &["lost_rotation"],
        severity: Severity::Dead,
        cause: "A refresh request reached the IdP but its answer never arrived (timeout, connection reset, crash): the IdP may have rotated the refresh token, and presenting the old one again would trigger reuse detection and revoke the family.",
        did: "Did not present the possibly spent refresh token again; marked the credential dead (reason lost_rotation).",
        fix: "Run `tokenproxy login -c FILE {credential}`. To let tokenproxy check and retry safely next time, set introspection_url (RFC 7662) or reuse_grace to the IdP's refresh-token reuse window.",
    },
    Entry {
        anchor: "lost-rotation-behind-a-gateway-5xx",
        title: "Lost rotation behind a gateway 5xx",
        keys: &["gateway_5xx"],
        severity: Severity::Dead,
        cause: "The token endpoint answered 500, 502 or 504 without an OAuth error body: a gateway or load balancer in front of the IdP may have lost the IdP's answer after the refresh token was rotated.",
        did: "Treated it as a lost rotation: did not present the refresh token again; marked the credential dead.",
        fix: "Run `tokenproxy login -c FILE {credential}`; set introspection_url or reuse_grace so the next such answer can be verified and retried; ask the gateway's owner about its timeouts towards the IdP.",
    },
    Entry {
        anchor: "lost-rotation-not-yet-verified",
        title: "Lost rotation not yet verified",
        keys: &["lost_rotation_unverified", "refresh_in_flight_elsewhere"],
        severity: Severity::Warning,
        cause: "A refresh may have been spent without its answer arriving (here or on another replica), and whether the token is still active could not be confirmed yet.",
        did: "Kept the write-ahead intent and retries the check with backoff; presents the token again only when the IdP says it is still active.",
        fix: "Usually nothing: it resolves by itself. If it persists, check that introspection_url answers (`tokenproxy doctor -c FILE {credential}`).",
    },
    Entry {
        anchor: "rate-limited",
        title: "Rate limited",
        keys: &["rate_limited", "slow_down"],
        severity: Severity::Warning,
        cause: "The token endpoint answered 429 (or slow_down): too many token requests for this client, often from many replicas or restarts each fetching their own token.",
        did: "Waited for Retry-After (or backoff) before trying again; a still-valid access token keeps serving.",
        fix: "Share tokens instead of fetching per process: one writer or fleet mode (store.url); avoid restart loops; raise max_backoff if the IdP's window is long.",
    },
    Entry {
        anchor: "idp-unreachable",
        title: "IdP unreachable",
        keys: &["transient", "idp_unreachable", "refresh_timeout", "backoff"],
        severity: Severity::Warning,
        cause: "The token endpoint could not be reached or did not answer in time: DNS, connect, TLS, the egress proxy, or a network policy.",
        did: "Retried with exponential backoff (capped at max_backoff); the request was not sent, so nothing was spent; a still-valid access token keeps serving.",
        fix: "Check from the pod: DNS of token_url, egress rules, server.egress_proxy (HTTPS_PROXY), the IdP's CA (ca_file); `tokenproxy doctor -c FILE {credential}` tests each step.",
    },
    Entry {
        anchor: "idp-failing",
        title: "IdP failing",
        keys: &["idp_error", "server_error", "temporarily_unavailable"],
        severity: Severity::Warning,
        cause: "The IdP answered with an error that says it refused the request for now (503, or 5xx with an OAuth error body such as server_error or temporarily_unavailable).",
        did: "Retried with backoff; nothing was spent; a still-valid access token keeps serving.",
        fix: "Usually nothing: check the IdP's status page; if it lasts longer than a token lifetime requests start getting 503 credential_unavailable.",
    },
    Entry {
        anchor: "store-unavailable",
        title: "Store unavailable",
        keys: &["store_unavailable", "lease_renew_failed"],
        severity: Severity::Warning,
        cause: "The token store could not be read or locked: the file store's directory is missing, read-only or full, or the postgres store (fleet mode) is unreachable.",
        did: "Kept serving the cached access token; started no refresh without the store (a refresh that cannot be recorded could lose a rotation).",
        fix: "File store: check store.path, its directory's permissions and free space. Postgres: check store.url, the database and its credentials (`tokenproxy doctor -c FILE`).",
    },
    Entry {
        anchor: "store-write-failed",
        title: "Store write failed",
        keys: &["store_write_failed", "high_water_write_failed"],
        severity: Severity::Warning,
        cause: "A rotated refresh token could not be saved to the store (disk full, permissions, database error).",
        did: "Served the new access token from memory and started no further refresh until the write succeeds (retrying it).",
        fix: "Free space or fix permissions of store.path (or the database); do not restart the process before `store_write_recovered` is logged, or the only copy of the new refresh token is lost.",
    },
    Entry {
        anchor: "store-rolled-back",
        title: "Store rolled back",
        keys: &["store_rolled_back"],
        severity: Severity::Dead,
        cause: "The store holds an older generation of the token family than one already written: it was restored from a backup or edited, and its refresh token is already spent.",
        did: "Did not present the old refresh token (that would be a reuse); marked the credential dead.",
        fix: "Run `tokenproxy login -c FILE {credential}`; never restore a token store from a backup over a live one.",
    },
    Entry {
        anchor: "seed-already-used",
        title: "Seed already used",
        keys: &["seed_already_used"],
        severity: Severity::Dead,
        cause: "The refresh_token in the config was already consumed by this store (for another token_url spelling or client_id); a consumed seed is never presented again.",
        did: "Did not present the seed; marked the credential dead.",
        fix: "If the IdP did not change, restore the previous token_url/client_id; otherwise run `tokenproxy login -c FILE {credential}` or put a new refresh_token seed in the config and reload.",
    },
    Entry {
        anchor: "no-refresh-token",
        title: "No refresh token",
        keys: &["no_refresh_token"],
        severity: Severity::Dead,
        cause: "The credential has no refresh token: none in the config, none in the store (a new store, or another store path), or the IdP returned none at login.",
        did: "Marked the credential dead; requests on its routes get 503 credential_unavailable.",
        fix: "Run `tokenproxy login -c FILE {credential}` or set refresh_token in the config; if the IdP returns no refresh token, request offline access (e.g. scope offline_access, or access_type=offline in extra_params).",
    },
    Entry {
        anchor: "token-set-migrated",
        title: "Token set migrated",
        keys: &["migrated"],
        severity: Severity::Dead,
        cause: "This token set was moved out of this store (`tokenproxy store migrate` or `store export`), and the store marks it so that nothing still using it presents the refresh token.",
        did: "Stopped refreshing from this store.",
        fix: "Point this process at the store the token set went to (store.path / store.url), or run `tokenproxy login -c FILE {credential}`.",
    },
    Entry {
        anchor: "refreshed-elsewhere",
        title: "Refreshed elsewhere",
        keys: &["lost_race", "rotation_superseded", "store_changed", "lease_lost"],
        severity: Severity::Note,
        cause: "Another process or replica (or a login) refreshed this credential first, so this process adopted the newer token set from the store instead of calling the IdP. This is the single flight working, not a failure.",
        did: "Adopted the stored token set; presented nothing.",
        fix: "Nothing. Many of these with a file store on several replicas means they share a volume: use fleet mode for several replicas.",
    },
    Entry {
        anchor: "dpop-proof-refused",
        title: "DPoP proof refused",
        keys: &["invalid_dpop_proof"],
        severity: Severity::Dead,
        cause: "The IdP refused the DPoP proof of a token request (RFC 9449): most often its htu differs from the URL the IdP sees (token_url spelt differently, a gateway rewriting the host), the key's algorithm is not one the IdP accepts, or the local clock is off.",
        did: "Sent nothing else: the refresh token was not used; marked the credential dead as a configuration error, retried every 5 minutes and at once on a config change.",
        fix: "Set token_url to the IdP's own spelling of its token endpoint (as its discovery document names it), use a key the IdP lists in dpop_signing_alg_values_supported (`tokenproxy doctor -c FILE {credential}`), and check NTP.",
    },
    Entry {
        anchor: "dpop-nonce-or-binding",
        title: "DPoP nonce or binding",
        keys: &["use_dpop_nonce", "dpop_not_bound"],
        severity: Severity::Warning,
        cause: "The IdP or an upstream asks for a DPoP nonce again after tokenproxy retried with the one it gave (use_dpop_nonce), or the IdP answered token_type Bearer to a DPoP request (dpop_not_bound): it does not bind this client's tokens.",
        did: "Kept the newest nonce and retries with backoff; a Bearer answer is used as a bearer token (refusing it would lose a rotation the IdP already made).",
        fix: "A repeated nonce challenge usually clears by itself; if it lasts, check the IdP's DPoP nonce settings. For dpop_not_bound, enable DPoP-bound tokens for the client at the IdP, or remove dpop = true for {credential}.",
    },
    Entry {
        anchor: "clock-skew",
        title: "Clock skew",
        keys: &["clock_skew"],
        severity: Severity::Warning,
        cause: "The IdP's Date header differs from the local clock by over a minute; tokens may be rejected as expired or not yet valid.",
        did: "Kept computing expiry from the local send time, and warned.",
        fix: "Fix NTP (chrony, systemd-timesyncd) on the host or node.",
    },
    Entry {
        anchor: "access-token-not-usable-as-a-header",
        title: "Access token not usable as a header",
        keys: &["token_not_a_header"],
        severity: Severity::Warning,
        cause: "The IdP issued an access token with bytes that HTTP header values cannot carry (control characters or non-ASCII), so it cannot be injected.",
        did: "Forwarded nothing for this route; answered 503 until a usable token arrives.",
        fix: "Check the token endpoint's response with the IdP (a proxy or gateway in front of it may be mangling the body), then refresh: `curl -X POST ADMIN/credentials/{credential}/refresh`.",
    },
    Entry {
        anchor: "route-upstream-value-missing",
        title: "Route upstream value missing",
        keys: &["token_field_missing", "token_field_rejected"],
        severity: Severity::Warning,
        cause: "The route's upstream comes from the token response (`{token.instance_url}`), and no response has sent a valid value yet: the field was absent, it was not a bare https origin (http only on loopback), or its host is outside the credential's token_field_hosts (by default the profile's: Salesforce's .salesforce.com and .force.com), so it was not trusted with the traffic.",
        did: "Kept the grant and the token; answered 503 on this route until a token response sends a valid value, and logged token_field_rejected for a value that failed its check.",
        fix: "Check that the provider sends the value (Salesforce: instance_url), that it is an https origin and that its host is allowed (set token_field_hosts for a suffix the profile does not list), then refresh: `curl -X POST ADMIN/credentials/{credential}/refresh` (or `tokenproxy login` again).",
    },
    Entry {
        anchor: "access-token-lifetime-unknown",
        title: "Access token lifetime unknown",
        keys: &["lifetime_introspection_failed"],
        severity: Severity::Warning,
        cause: "The token response had no `expires_in` and the access token is not a JWT, and the introspection endpoint (`introspection_url`) could not be asked or did not answer with an `exp`.",
        did: "Kept the rotation and the new token (introspection is asked only once the rotation is saved), and assumed `default_lifetime`; a 401 from the upstream still refreshes early.",
        fix: "Check `introspection_url` and that this client may introspect its own tokens at the IdP; or set `default_lifetime` to the IdP's access-token lifetime (Salesforce: the session timeout).",
    },
    Entry {
        anchor: "unsupported-token-type",
        title: "Unsupported token type",
        keys: &["token_type_unsupported"],
        severity: Severity::Dead,
        cause: "The token endpoint answered a grant whose `token_type` is neither `Bearer` nor one of the credential's `token_types` (a DPoP, MAC or vendor type), so its access token is not injected.",
        did: "Saved the rotated refresh token the answer carried (no rotation is lost), stored no access token, and marked the credential dead as a configuration error: retried every 5 minutes and at once on a config change.",
        fix: "If the upstream takes that token as a bearer token, add the type to the credential's `token_types` and reload; otherwise fix the client at the IdP so it issues Bearer tokens.",
    },
    Entry {
        anchor: "shutting-down",
        title: "Shutting down",
        keys: &["shutting_down"],
        severity: Severity::Note,
        cause: "tokenproxy was stopping (SIGTERM) and started no new refresh.",
        did: "Waited for a refresh in flight to finish and be written, then exited.",
        fix: "Nothing; clients should retry against another instance.",
    },
    Entry {
        anchor: "login-failed",
        title: "Login failed",
        keys: &["denied", "state_missing", "state_unknown", "no_code", "wrong_issuer", "family_still_works", "install_failed", "setup", "unavailable"],
        severity: Severity::Warning,
        cause: "`tokenproxy login` did not complete: the IdP denied the authorization, the callback did not match a login in progress, or the token set could not be installed.",
        did: "Installed nothing; the credential keeps its previous state.",
        fix: "Read the error of the login_failed line, then run `tokenproxy login -c FILE {credential}` again (add --force to replace a family that still works).",
    },
    Entry {
        anchor: "device-login-expired-or-failed",
        title: "Device login expired or failed",
        keys: &["device_expired", "device_failed"],
        severity: Severity::Warning,
        cause: "`tokenproxy login --device` (or POST /credentials/NAME/device) did not complete: nobody entered the user code before it expired, or the device authorization or a poll was refused (the client is not allowed the device grant, a wrong client secret or key, a device code already used).",
        did: "Installed nothing; the credential keeps its previous state.",
        fix: "Read the error of the login_failed line; allow the device grant for this client at the IdP if it was refused, then run `tokenproxy login --device -c FILE {credential}` again and enter the code before it expires.",
    },
];

/// The entries a `reason`, `outcome`, code, event or anchor names.
pub(crate) fn lookup(key: &str) -> Vec<&'static Entry> {
    ENTRIES
        .iter()
        .filter(|e| e.anchor == key || e.keys.contains(&key))
        .collect()
}

fn by_anchor(anchor: &str) -> &'static Entry {
    ENTRIES
        .iter()
        .find(|e| e.anchor == anchor)
        .expect("anchor in ENTRIES")
}

/// Text the engine puts in a failure's `hint`, for reasons the
/// `token_refresh` event carries only there (its `error` is then empty).
/// A test checks each still occurs in src/token.
pub(crate) const HINT_SIGNATURES: &[(&str, &str)] = &[
    (
        "The configured refresh_token was already consumed",
        "seed_already_used",
    ),
    (
        "There is no refresh token for this credential",
        "no_refresh_token",
    ),
    (
        "The stored token set has no refresh token",
        "no_refresh_token",
    ),
    (
        "but a newer generation was already written",
        "store_rolled_back",
    ),
    ("This token set was moved out of this store", "migrated"),
    ("This token set was marked lost", "lost_rotation"),
    ("store could not be used", "store_unavailable"),
    (
        "introspection endpoint could not confirm",
        "lost_rotation_unverified",
    ),
    (
        "Another replica presented this refresh token moments ago",
        "refresh_in_flight_elsewhere",
    ),
    (
        "The stored record changed during the refresh",
        "store_changed",
    ),
    ("without an OAuth error body", "gateway_5xx"),
];

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Tokens and secrets never leave: any run of token characters that looks
/// like a token (the rule of `grant::scrub`, on a finer split so that
/// `refresh_token:abc…` is caught too) becomes `[redacted]`; then capped.
pub(crate) fn scrub(text: &str) -> String {
    let is_tok = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        let trimmed = run.trim_matches('.');
        if crate::token::grant::scrub(trimmed, &[]) != trimmed {
            out.push_str(&run.replace(trimmed, "[redacted]"));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if is_tok(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(if c.is_control() { ' ' } else { c });
        }
    }
    flush(&mut run, &mut out);
    crate::token::grant::sanitize(&out, 240)
}

/// A log line as tokenproxy wrote it, or `None` for anything else. A prefix
/// before the JSON (`kubectl logs --timestamps` or `--prefix`) is allowed.
fn parse_line(line: &str) -> Option<Map<String, Value>> {
    let start = line.find('{')?;
    let Value::Object(m) = serde_json::from_str::<Value>(line[start..].trim_end()).ok()? else {
        return None;
    };
    let ours = m
        .get("target")
        .and_then(Value::as_str)
        .is_some_and(|t| t == "tokenproxy" || t.starts_with("tokenproxy::"))
        || (m.contains_key("timestamp")
            && m.contains_key("level")
            && m.get("event").and_then(Value::as_str).is_some_and(|e| {
                e == "token_refresh" || ENTRIES.iter().any(|x| x.keys.contains(&e))
            }));
    ours.then_some(m)
}

fn s<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str).filter(|v| !v.is_empty())
}

/// The cause a line points to, and the reason to show, or `None` for
/// lines that are not failures (a successful refresh, a request).
pub(crate) fn classify(m: &Map<String, Value>) -> Option<(&'static Entry, String)> {
    let event = s(m, "event")?;
    let error = s(m, "error").unwrap_or("");
    let hint = s(m, "hint").unwrap_or("");
    let desc = s(m, "error_description").unwrap_or("").to_ascii_lowercase();
    let status = m.get("status").and_then(Value::as_u64);
    let signed = HINT_SIGNATURES
        .iter()
        .find(|(sig, _)| hint.contains(sig) || error.contains(sig))
        .map(|(_, r)| *r);
    let known = |k: &str| ENTRIES.iter().any(|e| e.keys.contains(&k));
    match event {
        "token_refresh" => {
            let outcome = s(m, "outcome")?;
            // A reason the event carries (an OAuth code, an engine reason)
            // wins; else one recognised by its hint; else one from the status.
            let reason = if known(error) && error != "invalid_grant" {
                error.to_owned()
            } else if let Some(r) = signed {
                r.to_owned()
            } else {
                match (outcome, status) {
                    ("ok", _) => return None,
                    ("invalid_grant" | "lost_rotation" | "lost_race", _) => outcome.to_owned(),
                    (_, Some(429)) => "rate_limited".into(),
                    ("config_error", Some(404)) => "not_found".into(),
                    ("transient", Some(_)) => "idp_error".into(),
                    ("transient", None) => "idp_unreachable".into(),
                    _ => outcome.to_owned(),
                }
            };
            let entry = match reason.as_str() {
                "invalid_grant" | "bad_refresh_token" | "expired_token" => {
                    by_anchor(refresh_cause(&desc, hint))
                }
                r => *lookup(r).first()?,
            };
            Some((entry, reason))
        }
        "login_failed" => {
            let reason = s(m, "reason").unwrap_or("exchange_failed");
            let e = error.to_ascii_lowercase();
            let anchor = if reason != "exchange_failed" {
                return Some((*lookup(reason).first()?, reason.to_owned()));
            } else if e.contains("redirect_uri mismatch") || e.contains("pkce mismatch") {
                "redirect_uri-or-pkce-mismatch"
            } else if e.contains("code reused")
                || e.contains("expired code")
                || e.contains("code expired")
            {
                "authorization-code-reused-or-expired"
            } else if e.contains("invalid_client")
                || e.contains("client credentials")
                || e.contains("client authentication")
            {
                "wrong-client-credentials-or-auth-method"
            } else {
                "authorization-code-reused-or-expired"
            };
            Some((by_anchor(anchor), reason.to_owned()))
        }
        // One per outage, beside the token_refresh lines of the attempts.
        e if known(e) => Some((*lookup(e).first()?, e.to_owned())),
        _ => None,
    }
}

/// Which `invalid_grant` this is, from the IdP's description and our hint
/// (the same reading as `token::hints`).
fn refresh_cause(desc: &str, hint: &str) -> &'static str {
    let reused = [
        "reuse",
        "already used",
        "already been used",
        "spent",
        "replay",
    ];
    if reused.iter().any(|w| desc.contains(w))
        || hint.starts_with("The refresh token was already used")
    {
        "refresh-token-reused-after-rotation"
    } else if ["expired", "idle", "inactive"]
        .iter()
        .any(|w| desc.contains(w))
        || hint.starts_with("The refresh token expired at the IdP")
    {
        "refresh-token-idle-expired"
    } else {
        "refresh-token-revoked-or-expired"
    }
}

/// Failures of one cause for one credential.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub count: u64,
    pub first: Option<String>,
    pub last: Option<String>,
    pub reasons: Vec<String>,
    pub statuses: Vec<u64>,
    /// The IdP's latest description or error text, scrubbed.
    pub detail: Option<String>,
}

#[derive(Debug, Default)]
pub(crate) struct Credential {
    pub ok: u64,
    pub last_ok: Option<String>,
    /// When the last dead-level failure happened.
    pub last_dead: Option<String>,
    pub last_failure: Option<String>,
    /// The cause of that last dead-level failure.
    pub dead_cause: Option<&'static str>,
    /// Keyed by anchor; refresh attempts and one-off events count apart
    /// (an outage logs both), attempts win when there are any.
    pub groups: BTreeMap<&'static str, (Group, Group)>,
}

#[derive(Debug, Default)]
pub(crate) struct Report {
    pub lines: u64,
    pub ours: u64,
    pub skipped: u64,
    pub credentials: BTreeMap<String, Credential>,
}

impl Report {
    pub(crate) fn read(input: impl BufRead) -> std::io::Result<Report> {
        let mut r = Report::default();
        for line in input.split(b'\n') {
            let line = line?;
            let line = String::from_utf8_lossy(&line);
            if line.trim().is_empty() {
                continue;
            }
            r.lines += 1;
            match parse_line(&line) {
                Some(m) => {
                    r.ours += 1;
                    r.add(&m);
                }
                None => r.skipped += 1,
            }
        }
        Ok(r)
    }

    fn add(&mut self, m: &Map<String, Value>) {
        let name = s(m, "credential").map(scrub).unwrap_or_default();
        let at = s(m, "timestamp").map(scrub);
        let is_refresh = s(m, "event") == Some("token_refresh");
        if is_refresh && s(m, "outcome") == Some("ok") {
            let c = self.credentials.entry(name).or_default();
            c.ok += 1;
            c.last_ok = at;
            return;
        }
        let Some((entry, reason)) = classify(m) else {
            return;
        };
        let c = self.credentials.entry(name).or_default();
        let (attempts, events) = c.groups.entry(entry.anchor).or_default();
        let g = if is_refresh { attempts } else { events };
        g.count += 1;
        if g.first.is_none() {
            g.first.clone_from(&at);
        }
        g.last.clone_from(&at);
        if !g.reasons.contains(&reason) {
            g.reasons.push(reason);
        }
        if let Some(st) = m.get("status").and_then(Value::as_u64) {
            if !g.statuses.contains(&st) {
                g.statuses.push(st);
            }
        }
        let detail = s(m, "error_description").or_else(|| s(m, "error"));
        if let Some(d) = detail {
            g.detail = Some(scrub(d));
        }
        if entry.severity != Severity::Note {
            c.last_failure.clone_from(&at);
        }
        let dead_level = s(m, "level").is_some_and(|l| l.eq_ignore_ascii_case("error"));
        if is_refresh && dead_level && entry.severity == Severity::Dead {
            c.last_dead = at;
            c.dead_cause = Some(entry.title);
        }
    }
}

impl Credential {
    /// In one sentence: where the credential ended up, by the last lines.
    fn verdict(&self) -> String {
        match (&self.last_dead, &self.last_ok, &self.last_failure) {
            (Some(d), ok, _) if ok.as_ref().is_none_or(|o| o < d) => {
                format!(
                    "DEAD since {d} ({}): no successful refresh after it; needs the fix below",
                    self.dead_cause.unwrap_or("see below")
                )
            }
            (_, Some(o), Some(f)) if o > f => {
                format!("recovered: last refresh OK at {o} ({} OK in all)", self.ok)
            }
            (_, o, Some(f)) => format!(
                "failing: last failure at {f}, last OK refresh {}",
                o.as_deref().unwrap_or("none in these lines")
            ),
            (_, Some(o), None) => format!("healthy: {} refreshes OK, last at {o}", self.ok),
            _ => "no refresh in these lines".to_owned(),
        }
    }

    fn merged(&self) -> Vec<(&'static Entry, &Group)> {
        let mut v: Vec<(&'static Entry, &Group)> = self
            .groups
            .iter()
            .map(|(a, (att, ev))| (by_anchor(a), if att.count > 0 { att } else { ev }))
            .collect();
        // What needs a human first; then the latest (the current cause).
        v.sort_by(|a, b| {
            (a.0.severity, &b.1.last, b.1.count).cmp(&(b.0.severity, &a.1.last, a.1.count))
        });
        v
    }
}

fn fix_for(e: &Entry, credential: &str) -> String {
    let name = if credential.is_empty() {
        "NAME"
    } else {
        credential
    };
    e.fix.replace("{credential}", name)
}

fn entry_text(e: &Entry, credential: &str, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(out, "    cause: {}", e.cause);
    let _ = writeln!(out, "    tokenproxy: {}", e.did);
    let _ = writeln!(out, "    fix: {}", fix_for(e, credential));
    let _ = writeln!(out, "    see: {DOC}#{}", e.anchor);
}

pub(crate) fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "read {} lines: {} from tokenproxy, {} skipped (not tokenproxy JSON)",
        r.lines, r.ours, r.skipped
    );
    if r.credentials.is_empty() {
        let _ = writeln!(
            out,
            "no token events found; are these the logs of `tokenproxy run` with [log] format = \"json\"?"
        );
    }
    for (name, c) in &r.credentials {
        let shown = if name.is_empty() {
            "(no credential)"
        } else {
            name
        };
        let _ = writeln!(out, "\ncredential {shown}: {}", c.verdict());
        for (e, g) in c.merged() {
            let status = if g.statuses.is_empty() {
                String::new()
            } else {
                let v: Vec<String> = g.statuses.iter().map(u64::to_string).collect();
                format!(", HTTP {}", v.join("/"))
            };
            let _ = writeln!(
                out,
                "  [{}] {} x{} (first {}, last {}; reason {}{status})",
                e.severity.as_str(),
                e.title,
                g.count,
                g.first.as_deref().unwrap_or("?"),
                g.last.as_deref().unwrap_or("?"),
                g.reasons.join(", "),
            );
            if let Some(d) = &g.detail {
                let _ = writeln!(out, "    the log said: {d}");
            }
            entry_text(e, name, &mut out);
        }
    }
    out
}

fn entry_json(e: &Entry, credential: &str) -> Value {
    json!({
        "anchor": e.anchor,
        "title": e.title,
        "severity": e.severity.as_str(),
        "keys": e.keys,
        "cause": e.cause,
        "did": e.did,
        "fix": fix_for(e, credential),
        "doc": format!("{DOC}#{}", e.anchor),
    })
}

pub(crate) fn render_json(r: &Report) -> Value {
    let creds: Vec<Value> = r
        .credentials
        .iter()
        .map(|(name, c)| {
            let causes: Vec<Value> = c
                .merged()
                .into_iter()
                .map(|(e, g)| {
                    let mut v = entry_json(e, name);
                    v["count"] = json!(g.count);
                    v["first"] = json!(g.first);
                    v["last"] = json!(g.last);
                    v["reasons"] = json!(g.reasons);
                    v["statuses"] = json!(g.statuses);
                    v["detail"] = json!(g.detail);
                    v
                })
                .collect();
            json!({
                "credential": name,
                "verdict": c.verdict(),
                "dead": c.last_dead.is_some() && c.last_ok.as_ref().is_none_or(|o| Some(o) < c.last_dead.as_ref()),
                "refreshes_ok": c.ok,
                "last_ok": c.last_ok,
                "causes": causes,
            })
        })
        .collect();
    json!({
        "lines": r.lines,
        "ours": r.ours,
        "skipped": r.skipped,
        "credentials": creds,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Text,
    Json,
}

/// `tokenproxy explain [REASON] [-f FILE] [--format json]`.
pub(crate) fn run(
    reason: Option<&str>,
    file: Option<&std::path::Path>,
    format: Format,
) -> ExitCode {
    if let Some(reason) = reason {
        let found = lookup(reason);
        if found.is_empty() {
            let mut keys: Vec<&str> = ENTRIES
                .iter()
                .flat_map(|e| e.keys.iter().copied())
                .collect();
            keys.sort_unstable();
            keys.dedup();
            eprintln!(
                "tokenproxy explain: unknown reason {:?}; known: {}",
                scrub(reason),
                keys.join(", ")
            );
            return ExitCode::from(EXIT_USAGE);
        }
        match format {
            Format::Json => {
                let v: Vec<Value> = found.iter().map(|e| entry_json(e, "")).collect();
                println!("{}", Value::Array(v));
            }
            Format::Text => {
                let mut out = String::new();
                if found.len() > 1 {
                    out.push_str(&format!("{reason} has {} possible causes:\n", found.len()));
                }
                for e in found {
                    out.push_str(&format!("\n{} [{}]\n", e.title, e.severity.as_str()));
                    entry_text(e, "", &mut out);
                }
                print!("{out}");
            }
        }
        return ExitCode::SUCCESS;
    }
    let report = match file {
        Some(path) if path != std::path::Path::new("-") => match std::fs::File::open(path) {
            Ok(f) => Report::read(std::io::BufReader::new(f)),
            Err(e) => {
                eprintln!("tokenproxy explain: {}: {e}", path.display());
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => Report::read(std::io::stdin().lock()),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokenproxy explain: reading the log: {e}");
            return ExitCode::FAILURE;
        }
    };
    match format {
        Format::Json => println!("{}", render_json(&report)),
        Format::Text => print!("{}", render_text(&report)),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(fields: Value) -> String {
        let mut v = json!({
            "timestamp": "2026-12-06T02:00:00.000000Z",
            "level": "WARN",
            "target": "tokenproxy::token::engine::refresh",
        });
        for (k, x) in fields.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    }

    fn read(lines: &[String]) -> Report {
        Report::read(lines.join("\n").as_bytes()).unwrap()
    }

    #[test]
    fn groups_failures_by_cause_with_counts_and_times() {
        let mut lines = vec![];
        for (i, desc) in ["refresh token revoked", "token was already used"]
            .iter()
            .enumerate()
        {
            for n in 0..2 {
                lines.push(line(json!({
                    "timestamp": format!("2026-12-06T02:0{i}:0{n}Z"),
                    "level": "ERROR", "event": "token_refresh", "credential": "github",
                    "outcome": "invalid_grant", "error": "invalid_grant", "status": 400,
                    "error_description": desc,
                })));
            }
        }
        lines.push(line(
            json!({"event": "token_refresh", "credential": "github",
            "outcome": "transient", "status": 429, "error": "token endpoint answered 429"}),
        ));
        lines.push(line(
            json!({"event": "token_refresh", "credential": "other", "outcome": "ok",
            "level": "INFO"}),
        ));
        let r = read(&lines);
        assert_eq!((r.lines, r.ours, r.skipped), (6, 6, 0));
        let gh = &r.credentials["github"];
        let (revoked, _) = &gh.groups["refresh-token-revoked-or-expired"];
        assert_eq!(revoked.count, 2);
        assert_eq!(revoked.first.as_deref(), Some("2026-12-06T02:00:00Z"));
        assert_eq!(revoked.last.as_deref(), Some("2026-12-06T02:00:01Z"));
        assert_eq!(gh.groups["refresh-token-reused-after-rotation"].0.count, 2);
        assert_eq!(gh.groups["rate-limited"].0.reasons, ["rate_limited"]);
        assert_eq!(r.credentials["other"].ok, 1);
        let text = render_text(&r);
        assert!(text.contains("credential github: DEAD since"), "{text}");
        assert!(
            text.contains("Refresh token reused after rotation x2"),
            "{text}"
        );
        assert!(text.contains("tokenproxy login -c FILE github"), "{text}");
    }

    #[test]
    fn skips_and_counts_foreign_lines() {
        let lines = vec![
            "plain text from a shell script".to_owned(),
            r#"{"level":"info","msg":"from another app","event":"whatever"}"#.to_owned(),
            r#"{"timestamp":"x","level":"INFO","target":"hyper::proto","message":"hi"}"#.to_owned(),
            "[1, 2, 3]".to_owned(),
            "{not json".to_owned(),
            // kubectl logs --prefix --timestamps: the JSON after a prefix is ours.
            format!(
                "[pod/app-1/tokenproxy] 2026-12-06T02:00:00Z {}",
                line(json!({"event": "token_refresh", "credential": "c", "outcome": "ok"}))
            ),
        ];
        let r = read(&lines);
        assert_eq!((r.lines, r.ours, r.skipped), (6, 1, 5));
        assert_eq!(r.credentials["c"].ok, 1);
        assert!(render_text(&r).contains("5 skipped"));
    }

    #[test]
    fn never_prints_a_token_a_line_carries() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let opaque = "rt_4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c";
        let r = read(&[line(json!({
            "level": "ERROR", "event": "token_refresh", "credential": "c",
            "outcome": "invalid_grant", "error": "invalid_grant", "access_token": jwt,
            "refresh_token": opaque,
            "error_description": format!("refresh_token:{opaque} is revoked (Bearer {jwt})"),
        }))]);
        let text = render_text(&r);
        let js = render_json(&r).to_string();
        for out in [&text, &js] {
            assert!(!out.contains(opaque) && !out.contains(jwt), "{out}");
            assert!(
                !out.contains("4f9a8b7c6d5e") && !out.contains("dozjgNryP4"),
                "{out}"
            );
        }
        assert!(
            text.contains("refresh_token:[redacted] is revoked"),
            "{text}"
        );
    }

    #[test]
    fn reasons_carried_only_by_the_hint_are_recognised() {
        let hint = crate::token::hints::dead_on_disk(&crate::token::reason::Reason::Migrated);
        let r = read(&[line(json!({"level": "ERROR", "event": "token_refresh",
            "credential": "c", "outcome": "invalid_grant", "hint": hint}))]);
        assert!(r.credentials["c"].groups.contains_key("token-set-migrated"));
        let hint = crate::token::hints::lost_rotation(
            &crate::config::parse(
                "[credentials.c]\ngrant = \"client_credentials\"\ntoken_url = \"https://idp.example/t\"\nclient_id = \"x\"\nclient_secret = \"y\"\n",
                std::path::Path::new("t.toml"),
                &|_| None,
            )
            .map(|c| c.credentials["c"].clone())
            .unwrap(),
            Some(502),
        );
        let r = read(&[line(json!({"level": "ERROR", "event": "token_refresh",
            "credential": "c", "outcome": "lost_rotation", "hint": hint}))]);
        assert!(r.credentials["c"]
            .groups
            .contains_key("lost-rotation-behind-a-gateway-5xx"));
    }

    /// The engine's sources, read at compile time: a reason added there
    /// without an entry here fails the tests below.
    const ENGINE: &[&str] = &[
        include_str!("token/engine/mod.rs"),
        include_str!("token/engine/refresh.rs"),
        include_str!("token/engine/refresher.rs"),
        include_str!("token/engine/family.rs"),
        include_str!("token/hints.rs"),
        include_str!("token/grant.rs"),
        include_str!("token/store.rs"),
        include_str!("token/pg.rs"),
        include_str!("token/transfer.rs"),
        include_str!("login.rs"),
    ];

    /// The first snake_case string literal after each `marker`.
    fn literals_after(marker: &str) -> Vec<String> {
        let mut found = vec![];
        for src in ENGINE {
            for (at, _) in src.match_indices(marker) {
                let rest = &src[at + marker.len()..];
                let rest = &rest[..rest.len().min(100)];
                let mut parts = rest.split('"');
                let lit = parts.nth(1).unwrap_or("");
                // A whole literal in the window, not a cut one.
                if parts.next().is_some()
                    && !lit.is_empty()
                    && lit.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                {
                    found.push(lit.to_owned());
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }

    #[test]
    fn every_reason_and_outcome_the_engine_emits_has_an_entry() {
        use crate::token::engine::Outcome;
        let mut keys: Vec<String> = [
            Outcome::InvalidGrant,
            Outcome::LostRotation,
            Outcome::LostRace,
            Outcome::ConfigError,
            Outcome::Transient,
        ]
        .iter()
        .map(|o| o.as_str().to_owned())
        .collect();
        keys.extend(
            crate::token::reason::Reason::ENGINE
                .iter()
                .map(|r| r.as_str().to_owned()),
        );
        // Event names and reasons outside the engine's type (admin, login).
        for marker in [
            "failure_simple(",
            "dead_failure(",
            "generic_unavailable(",
            "reason = \"",
            "reason: \"",
            "f.reason = ",
            "warn!(event = ",
            "error!(event = ",
            "event = \"",
        ] {
            let m = marker.trim_end_matches('"');
            keys.extend(literals_after(m));
        }
        // The OAuth codes the grant parser knows by name (RFC 6749 §5.2 and
        // vendor equivalents), and the login's codes.
        let grant = include_str!("token/grant.rs");
        let parse = &grant[grant.find("pub fn parse(code").unwrap()..];
        let parse = &parse[..parse.find("other =>").unwrap()];
        keys.extend(parse.split('"').skip(1).step_by(2).map(str::to_owned));
        let login = include_str!("login.rs");
        let codes = &login[login.find("pub fn code(&self)").unwrap()..];
        let codes = &codes[..codes.find("pub fn fix(").unwrap()];
        keys.extend(codes.split('"').skip(1).step_by(2).map(str::to_owned));
        // Not failures: successes, progress and requests.
        let routine = [
            "access",
            "config_changed",
            "login_installed",
            "login_started",
            "reloaded",
            "seed_adopted",
            "shutdown_drain",
            "store_migrated",
            "store_recovered",
            "store_write_recovered",
            "token_refresh",
            "token_rejected",
            "no_token",
            "lost_race_adopted",
            "login_failed",
            "other",
            "reload_partial",
            "reload_rejected",
            "shutdown_drain_timeout",
            "shutdown_forced",
            "store_listen_failed",
            "store_tls_unverified",
            "store_changed_adopted",
        ];
        keys.sort();
        keys.dedup();
        let missing: Vec<&String> = keys
            .iter()
            .filter(|k| !routine.contains(&k.as_str()) && lookup(k).is_empty())
            .collect();
        assert!(
            missing.is_empty(),
            "reasons without an explain entry: {missing:?}"
        );
        assert!(keys.len() > 30, "the scan found too little: {keys:?}");
    }

    #[test]
    fn hint_signatures_still_occur_in_the_engine() {
        for (sig, reason) in HINT_SIGNATURES {
            assert!(
                ENGINE.iter().any(|src| src.contains(sig)),
                "the hint for {reason} changed: {sig:?} is gone from src/token"
            );
            assert!(!lookup(reason).is_empty(), "{reason}");
        }
        for sig in [
            "The refresh token was already used",
            "The refresh token expired at the IdP",
        ] {
            assert!(include_str!("token/hints.rs").contains(sig), "{sig}");
        }
        // login_failed lines are told apart by the cause the code-exchange
        // hint names.
        for sig in [
            "redirect_uri mismatch:",
            "PKCE mismatch:",
            "code reused:",
            "code expired:",
            "an expired code",
            "authorization code expired",
            "rejected the client authentication",
        ] {
            assert!(include_str!("token/hints.rs").contains(sig), "{sig}");
        }
    }

    /// docs/troubleshooting.md and this table say the same: a section per
    /// entry under its anchor, with its keys, cause, action and fix, and a
    /// log line that `explain` recognises as that very cause.
    #[test]
    fn troubleshooting_page_and_table_agree() {
        let page = include_str!("../docs/troubleshooting.md");
        let mut seen = vec![];
        for section in page.split("\n## ").skip(1) {
            let title = section.lines().next().unwrap();
            if title == "Causes" {
                continue;
            }
            let anchor = slug(title);
            let e = ENTRIES
                .iter()
                .find(|e| e.anchor == anchor)
                .unwrap_or_else(|| panic!("section {title:?} has no entry in explain's table"));
            seen.push(e.anchor);
            let keys: Vec<String> = e.keys.iter().map(|k| format!("`{k}`")).collect();
            let reasons = format!("Reasons: {}\n", keys.join(", "));
            assert!(section.contains(&reasons), "{title}: expected {reasons:?}");
            for (label, text) in [
                ("Cause", e.cause.to_owned()),
                ("What tokenproxy does", e.did.to_owned()),
                ("Fix", e.fix.replace("{credential}", "NAME")),
            ] {
                let want = format!("**{label}.** {text}\n");
                assert!(
                    section.contains(&want),
                    "{title}: {label} differs from the table"
                );
            }
            let block = section
                .split("```json\n")
                .nth(1)
                .and_then(|b| b.split("\n```").next())
                .unwrap_or_else(|| panic!("{title}: no log line"));
            match parse_line(block) {
                Some(m) => {
                    let (got, _) = classify(&m).unwrap_or_else(|| panic!("{title}: not a failure"));
                    assert_eq!(
                        got.anchor, e.anchor,
                        "{title}: its log line explains as another cause"
                    );
                }
                None => {
                    // A 503 body: its reason names this entry.
                    let v: Value = serde_json::from_str(block).expect("the block is JSON");
                    assert_eq!(v["error"], "credential_unavailable", "{title}");
                    let reason = v["reason"].as_str().unwrap_or("");
                    assert!(e.keys.contains(&reason), "{title}: {reason}");
                }
            }
            let link = format!("- [{title}](#{anchor})");
            assert!(page.contains(&link), "{title}: not in the list of causes");
        }
        for e in ENTRIES {
            assert!(
                seen.contains(&e.anchor),
                "no section for {} in {DOC}",
                e.anchor
            );
        }
        assert_eq!(seen.len(), ENTRIES.len(), "a section appears twice");
    }

    #[test]
    fn every_anchor_is_the_slug_of_its_title_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for e in ENTRIES {
            assert_eq!(slug(e.title), e.anchor);
            assert!(seen.insert(e.anchor), "{}", e.anchor);
        }
    }

    /// GitHub's and mdBook's heading anchors: lowercase, spaces to `-`,
    /// punctuation other than `-` and `_` dropped.
    pub(crate) fn slug(title: &str) -> String {
        title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect()
    }
}
