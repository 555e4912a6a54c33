//! `tokenproxy doctor`: a checklist, one line per check (✓ ok, ! warning,
//! ✗ failure, with the fix), that never spends a refresh token. It reads
//! the config and the store, talks to the IdP (metadata, endpoints, a
//! client-authentication probe with a deliberately invalid refresh token, a
//! real client_credentials grant), the upstreams and the running proxy's
//! admin API. Writes nothing but a probe file beside the store.

use crate::config::{
    self, AssertionSource, Config, CredentialConfig, DpopSource, GrantType, StoreKind,
};
use crate::discovery::{self, Fetched};
use crate::net::Unreachable;
use crate::secret::Secret;
use crate::token::grant::{self, Grant, GrantClient, GrantError};
use crate::token::store::{FileStore, Store};
use http::{Method, Uri};
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Ok,
    Warn,
    Fail,
}

impl Mark {
    fn symbol(self) -> &'static str {
        match self {
            Mark::Ok => "✓",
            Mark::Warn => "!",
            Mark::Fail => "✗",
        }
    }
}

/// The checklist so far; printed as it goes.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<(Mark, String)>,
}

impl Report {
    fn add(&mut self, mark: Mark, what: impl Into<String>, fix: &str) {
        let mut line = what.into();
        if !fix.is_empty() {
            line.push_str(" — fix: ");
            line.push_str(fix);
        }
        println!("{} {line}", mark.symbol());
        self.lines.push((mark, line));
    }

    fn ok(&mut self, what: impl Into<String>) {
        self.add(Mark::Ok, what, "");
    }

    pub fn failed(&self) -> bool {
        self.lines.iter().any(|(m, _)| *m == Mark::Fail)
    }
}

/// Runs the checklist; returns the exit code (0, 1 when anything is ✗, 64
/// for an invalid config or an unknown credential).
pub async fn run(path: &Path, name: Option<&str>) -> u8 {
    let mut r = Report::default();
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            r.add(
                Mark::Fail,
                format!("config {} is invalid:\n{errors}", path.display()),
                "correct the lines above (`tokenproxy check -c FILE` shows the same)",
            );
            return crate::process::EXIT_USAGE;
        }
    };
    r.ok(format!("config {} is valid", path.display()));
    r.ok("secrets resolvable (every ${VAR} and *_file was read)");
    let creds: Vec<_> = match name {
        Some(n) => match config.credentials.get(n) {
            Some(c) => vec![c.clone()],
            None => {
                r.add(
                    Mark::Fail,
                    format!("no credential named {n:?}"),
                    &format!(
                        "use one of: {}",
                        config
                            .credentials
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                return crate::process::EXIT_USAGE;
            }
        },
        None => config.credentials.values().cloned().collect(),
    };
    if creds.iter().any(|c| c.grant == GrantType::RefreshToken) {
        match config.store.kind {
            StoreKind::File => check_store(&mut r, &config.store.path),
            StoreKind::Postgres => match Store::open_config(&config.store).await {
                Ok(_) => r.ok("store postgres reachable, schema current".to_owned()),
                Err(e) => r.add(
                    Mark::Fail,
                    format!("store postgres unusable: {}", crate::error_chain(&e)),
                    "check store.url (host, credentials, sslmode) and that the database answers; behind PgBouncer use session pooling",
                ),
            },
        }
    }
    for cred in &creds {
        check_credential(&mut r, &config, cred).await;
    }
    check_upstreams(&mut r, &config, name).await;
    check_running(&mut r, &config, name).await;
    if r.failed() {
        println!("\nSome checks failed (✗): see the fixes above.");
        crate::process::EXIT_FAILURE
    } else {
        println!("\nAll checks passed.");
        0
    }
}

fn check_store(r: &mut Report, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                r.add(
                    Mark::Fail,
                    format!("store {shown} has mode {mode:04o}: other users can read tokens"),
                    &format!("chmod 600 {shown}"),
                );
            } else {
                r.ok(format!("store {shown} mode {mode:04o}"));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.ok(format!(
                "store {shown} does not exist yet (created 0600 on the first write)"
            ));
        }
        Err(e) => r.add(
            Mark::Fail,
            format!("store {shown} cannot be inspected: {e}"),
            "check the path and the permissions of its directory",
        ),
    }
    check_records_dir(r, path);
    match FileStore::open(path).and_then(|s| s.verify()) {
        Ok(n) => r.ok(format!("store {shown} readable ({n} credentials)")),
        Err(e) => r.add(
            Mark::Fail,
            format!("store {shown} unreadable: {}", crate::error_chain(&e)),
            "fix the permissions, or move the corrupt file away and run `tokenproxy login`",
        ),
    }
    // Writes are atomic renames within the directory: probe that directory.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let probe = dir.join(format!(".tokenproxy-doctor-{}", std::process::id()));
    match std::fs::write(&probe, b"") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            r.ok(format!("store directory {} writable", dir.display()));
        }
        Err(e) => r.add(
            Mark::Fail,
            format!("store directory {} is not writable: {e}", dir.display()),
            "make the directory exist and be writable by tokenproxy's user, or change store.path",
        ),
    }
}

/// The records beside the manifest (`<store.path>.d/`): the directory and
/// every file in it private to tokenproxy's user.
fn check_records_dir(r: &mut Report, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = path.as_os_str().to_owned();
    dir.push(".d");
    let dir = std::path::PathBuf::from(dir);
    let Ok(m) = std::fs::metadata(&dir) else {
        return;
    };
    let mode = m.permissions().mode() & 0o777;
    let shown = dir.display();
    if mode & 0o077 != 0 {
        r.add(
            Mark::Fail,
            format!("store records {shown} have mode {mode:04o}: other users can list them"),
            &format!("chmod 700 {shown}"),
        );
    }
    let open: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.metadata()
                .is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if !open.is_empty() {
        r.add(
            Mark::Fail,
            format!(
                "store records {} in {shown} can be read by other users",
                open.join(", ")
            ),
            &format!("chmod 600 {shown}/*"),
        );
    }
}

/// Why a connection failed, and what to do, from its error chain.
fn reach_fix(why: Unreachable) -> &'static str {
    match why {
        Unreachable::CertificateExpired => {
            "the server's certificate is expired or not yet valid: renew it (or fix this machine's clock)"
        }
        Unreachable::CertificateUntrusted => {
            "the server's certificate is not trusted: set ca_file to the CA that issued it"
        }
        Unreachable::CertificateWrongName => {
            "the server's certificate is for other names: use the host name it was issued for"
        }
        Unreachable::NotTls => "the server does not speak TLS there: check the scheme and port",
        Unreachable::NoSuchHost => {
            "the host name does not resolve: check the URL and DNS (and egress_proxy)"
        }
        Unreachable::Refused => "nothing listens there: check the URL's host and port",
        Unreachable::TimedOut | Unreachable::Other => {
            "check the URL, the network path and any egress proxy"
        }
    }
}

async fn probe(
    r: &mut Report,
    what: &str,
    tls: &rustls::ClientConfig,
    uri: &Uri,
    egress: Option<&Uri>,
) -> Option<Fetched> {
    match discovery::fetch(tls.clone(), Method::GET, uri, egress).await {
        Ok(f) => {
            r.ok(format!("{what} {uri} answers ({})", f.status));
            Some(f)
        }
        Err(e) => {
            r.add(
                Mark::Fail,
                format!("{what} {uri} unreachable: {}", crate::error_chain(&e)),
                reach_fix(e.unreachable()),
            );
            None
        }
    }
}

fn check_clock(r: &mut Report, cred: &str, f: &Fetched) {
    let Some(date) = grant::response_date(&f.headers) else {
        return;
    };
    let now = SystemTime::now();
    let skew = match now.duration_since(date) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    // Date has one-second resolution.
    if skew > Duration::from_secs(60) {
        r.add(
            Mark::Warn,
            format!(
                "{cred}: this clock differs from the IdP's by {}s",
                skew.as_secs()
            ),
            "sync the clock (NTP): expiry maths and JWT validation depend on it",
        );
    } else {
        r.ok(format!(
            "{cred}: clock within {}s of the IdP's",
            skew.as_secs()
        ));
    }
}

async fn check_credential(r: &mut Report, config: &Config, cred: &CredentialConfig) {
    let n = &cred.name;
    let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
    let egress = egress.as_ref();
    let tls = match discovery::tls_for(cred) {
        Ok(t) => t,
        Err(e) => {
            r.add(
                Mark::Fail,
                format!("{n}: {}", crate::error_chain(&e)),
                "fix ca_file / client_cert / client_key",
            );
            return;
        }
    };
    check_client_credential(r, cred);
    check_profile(r, cred, egress).await;
    let mut token_url = cred.token_url.clone();
    let mut authorize_url = cred.authorize_url.clone();
    if let Some(issuer) = &cred.issuer {
        match discovery::discover(cred, issuer, egress).await {
            Ok(md) => {
                r.ok(format!("{n}: metadata at {} names issuer {}", md.url, md.issuer));
                check_metadata(r, cred, &md);
                if token_url.is_none() {
                    // RFC 8705 §5: certificate-bound clients use the alias.
                    let alias = md.mtls_token_endpoint.as_deref().filter(|_| cred.auth_method.is_mtls());
                    token_url = alias
                        .or(md.token_endpoint.as_deref())
                        .and_then(|u| u.parse().ok());
                }
                if authorize_url.is_none() {
                    authorize_url = md
                        .authorization_endpoint
                        .as_deref()
                        .and_then(|u| u.parse().ok());
                }
            }
            Err(e) => r.add(
                Mark::Fail,
                format!("{n}: discovery failed: {}", crate::error_chain(&e)),
                "check issuer (exactly as the IdP's metadata spells it), or set token_url and authorize_url",
            ),
        }
    }
    let Some(token_url) = token_url else {
        r.add(
            Mark::Fail,
            format!("{n}: no token endpoint"),
            "set token_url, or issuer for discovery",
        );
        return;
    };
    if let Some(f) = probe(r, &format!("{n}: token endpoint"), &tls, &token_url, egress).await {
        check_clock(r, n, &f);
    } else {
        return;
    }
    let client = GrantClient::new(tls.clone(), Duration::from_secs(15), egress);
    match cred.grant {
        GrantType::ClientCredentials => {
            let req = grant::build_token_request(
                cred,
                &token_url,
                &Grant::ClientCredentials {
                    scopes: &cred.scopes,
                    resource: cred.resource.as_deref(),
                },
            );
            let answer = match req {
                Ok(req) => send(&client, &req).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(set) => r.ok(format!(
                    "{n}: client_credentials grant works (token for {})",
                    set.expires_in
                        .map(|d| format!("{}s", d.as_secs()))
                        .unwrap_or_else(|| "an unstated time".into())
                )),
                Err(e) => r.add(
                    Mark::Fail,
                    format!("{n}: client_credentials grant failed: {}", describe(&e)),
                    &crate::token::hints::for_grant_error(cred, &e),
                ),
            }
        }
        GrantType::RefreshToken => {
            check_client_auth(r, cred, &client, &token_url).await;
            match &authorize_url {
                Some(a) => {
                    probe(r, &format!("{n}: authorize endpoint"), &tls, a, egress).await;
                }
                None => r.add(
                    Mark::Warn,
                    format!("{n}: no authorize_url"),
                    "set authorize_url (or issuer) so `tokenproxy login` can get a new refresh token",
                ),
            }
            if authorize_url.is_some() && cred.redirect_uri.is_none() {
                r.add(
                    Mark::Warn,
                    format!("{n}: no redirect_uri"),
                    &format!(
                        "set redirect_uri = \"http://{}/callback\" and register it at the IdP (login then uses the admin listener or that port)",
                        config.admin.listen
                    ),
                );
            }
            check_stored(r, config, cred, &token_url).await;
        }
    }
}

/// What the credential's provider profile knows to look for: the scope or
/// login parameter without which no refresh token comes back, and a
/// `domain` whose host does not resolve (a typo there otherwise shows only
/// as an unreachable endpoint).
async fn check_profile(r: &mut Report, cred: &CredentialConfig, egress: Option<&Uri>) {
    let Some(p) = cred.provider else {
        return;
    };
    let n = &cred.name;
    if cred.grant == GrantType::RefreshToken {
        if let Some(scope) = p.offline_scope {
            if cred.scopes.iter().any(|s| s == scope) {
                r.ok(format!("{n}: scopes include {scope} ({})", p.display));
            } else {
                r.add(
                    Mark::Warn,
                    format!(
                        "{n}: scopes lack {scope}: {} issues no refresh token without it",
                        p.display
                    ),
                    &format!("add \"{scope}\" to scopes, then run `tokenproxy login` again"),
                );
            }
        }
        for (k, v) in p.login_params {
            if !cred.login_params.iter().any(|(ck, cv)| ck == k && cv == v) {
                r.add(
                    Mark::Warn,
                    format!(
                        "{n}: login does not send {k}={v}: {} issues no refresh token without it",
                        p.display
                    ),
                    "remove the override of the profile's login parameters",
                );
            }
        }
    }
    // Behind an egress proxy, the proxy resolves names.
    if !p.params.contains(&crate::providers::Param::Domain) || egress.is_some() {
        return;
    }
    let Some(host) = cred
        .token_url
        .as_ref()
        .and_then(|u| u.host())
        .map(str::to_owned)
    else {
        return;
    };
    let port = cred
        .token_url
        .as_ref()
        .and_then(Uri::port_u16)
        .unwrap_or(443);
    let resolves = tokio::net::lookup_host((host.as_str(), port))
        .await
        .is_ok_and(|mut a| a.next().is_some());
    if resolves {
        r.ok(format!("{n}: domain {host} resolves"));
    } else {
        r.add(
            Mark::Fail,
            format!("{n}: domain {host} does not resolve"),
            &format!(
                "check domain (the {} server's host name) and DNS",
                p.display
            ),
        );
    }
}

/// Presents a deliberately invalid refresh token: the answer tells whether
/// the endpoint and client authentication are right, and spends nothing.
async fn check_client_auth(
    r: &mut Report,
    cred: &CredentialConfig,
    client: &GrantClient,
    url: &Uri,
) {
    let n = &cred.name;
    let dummy = Secret::new("tokenproxy-doctor-probe-not-a-token");
    let answer = match grant::build_token_request(cred, url, &Grant::RefreshToken(&dummy)) {
        Ok(req) => send(client, &req).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(_) => r.add(
            Mark::Warn,
            format!("{n}: the token endpoint accepted a made-up refresh token"),
            "check that token_url is the real IdP",
        ),
        Err(e) if e.code.as_deref().map(grant::OAuthCode::parse) == Some(grant::OAuthCode::InvalidGrant) => {
            r.ok(format!(
                "{n}: client authentication accepted ({}; probed with a made-up refresh token, nothing spent)",
                cred.auth_method.as_str()
            ))
        }
        Err(e) if e.code.as_deref() == Some("invalid_client") => {
            r.add(
                Mark::Fail,
                format!(
                    "{n}: the IdP rejected the client ({}), authenticated with auth_method = \"{}\"",
                    describe(&e),
                    cred.auth_method.as_str()
                ),
                &crate::token::hints::invalid_client(cred),
            );
        }
        // Microsoft: the tenant in the URL does not exist.
        Err(e) if e.vendor_code.as_deref() == Some("AADSTS90002") => r.add(
            Mark::Fail,
            format!("{n}: the tenant in token_url is unknown ({})", describe(&e)),
            &crate::token::hints::for_grant_error(cred, &e),
        ),
        Err(e) if e.status == Some(404) => r.add(
            Mark::Fail,
            format!("{n}: token endpoint {url} answered 404 to a token request"),
            "token_url is wrong: copy the token endpoint from the IdP's documentation or metadata",
        ),
        Err(e) => r.add(
            Mark::Warn,
            format!("{n}: client authentication probe inconclusive: {}", describe(&e)),
            &crate::token::hints::for_grant_error(cred, &e),
        ),
    }
}

async fn check_stored(r: &mut Report, config: &Config, cred: &CredentialConfig, token_url: &Uri) {
    let n = &cred.name;
    let store = match config.store.kind {
        StoreKind::File => FileStore::open(&config.store.path).map(Store::File),
        StoreKind::Postgres => Store::open_config(&config.store).await,
    };
    let Ok(store) = store else {
        return;
    };
    match store.read(n).await.ok().flatten() {
        Some(rec) if !rec.matches(&token_url.to_string(), &cred.client_id) => r.add(
            Mark::Warn,
            format!("{n}: the stored tokens belong to another token_url or client_id"),
            "run `tokenproxy login` for this client",
        ),
        Some(rec) if rec.dead.is_some() => r.add(
            Mark::Fail,
            format!(
                "{n}: the stored family is dead ({})",
                rec.dead.as_ref().map(|d| d.reason.as_str()).unwrap_or("")
            ),
            &format!("run `tokenproxy login -c FILE {n}`"),
        ),
        Some(rec) => r.ok(format!(
            "{n}: stored family {} generation {}",
            rec.family, rec.generation
        )),
        None if cred.refresh_token.is_some() => r.ok(format!(
            "{n}: no stored family yet; the configured seed will start one"
        )),
        None => r.add(
            Mark::Fail,
            format!("{n}: no refresh token (none stored, no seed)"),
            &format!("run `tokenproxy login -c FILE {n}`"),
        ),
    }
}

/// What the client authenticates with, named by public facts only: a key's
/// alg, kid and JWK thumbprint, a certificate's SHA-256 thumbprint, an
/// assertion file's expiry (never the key, the token or the secret).
fn check_client_credential(r: &mut Report, cred: &CredentialConfig) {
    let n = &cred.name;
    match &cred.client_assertion {
        Some(AssertionSource::Key { key, path, .. }) => r.ok(format!(
            "{n}: client_assertion_key {} signs {} (kid {}, JWK thumbprint {}{})",
            path.display(),
            key.alg(),
            key.kid().unwrap_or("not set"),
            key.thumbprint(),
            key.cert_thumbprint()
                .map(|t| format!(", certificate x5t#S256 {t}"))
                .unwrap_or_default(),
        )),
        Some(AssertionSource::File(path)) => {
            match crate::assertion::read_file(path, SystemTime::now()) {
                Ok(_) => r.ok(format!(
                    "{n}: client_assertion_file {} holds an unexpired JWT",
                    path.display()
                )),
                Err(e) => r.add(
                    Mark::Fail,
                    format!("{n}: {e}"),
                    "check the projected service-account token volume (path, audience, expirationSeconds)",
                ),
            }
        }
        None => {}
    }
    if let Some(DpopSource::File { key, path }) = &cred.dpop {
        r.ok(format!(
            "{n}: dpop_key {} signs {} proofs (JWK thumbprint {})",
            path.display(),
            key.alg(),
            key.thumbprint()
        ));
    }
    if cred.auth_method.is_mtls() {
        if let Some(cert) = &cred.client_cert {
            let thumb = std::fs::read(cert).ok().and_then(|pem| {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                    .next()?
                    .ok()
                    .map(|d| crate::assertion::cert_thumbprint(d.as_ref()))
            });
            match thumb {
                Some(t) => r.ok(format!(
                    "{n}: {} with client_cert {} (x5t#S256 {t})",
                    cred.auth_method.as_str(),
                    cert.display()
                )),
                None => r.add(
                    Mark::Fail,
                    format!(
                        "{n}: client_cert {} holds no readable certificate",
                        cert.display()
                    ),
                    "set client_cert to the PEM certificate registered at the IdP",
                ),
            }
        }
    }
}

fn check_metadata(r: &mut Report, cred: &CredentialConfig, md: &discovery::Metadata) {
    let n = &cred.name;
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    let meta_token = md
        .mtls_token_endpoint
        .as_ref()
        .filter(|_| cred.auth_method.is_mtls())
        .or(md.token_endpoint.as_ref());
    if let (Some(cfg), Some(meta)) = (&cred.token_url, meta_token) {
        if !same(&cfg.to_string(), meta) {
            r.add(
                Mark::Fail,
                format!("{n}: token_url {cfg} differs from the metadata's token_endpoint {meta}"),
                "set token_url to the metadata's value, or remove it to use discovery",
            );
        } else {
            r.ok(format!("{n}: token_url matches the metadata"));
        }
    }
    if let (Some(cfg), Some(meta)) = (&cred.authorize_url, &md.authorization_endpoint) {
        if !same(&cfg.to_string(), meta) {
            r.add(
                Mark::Fail,
                format!("{n}: authorize_url {cfg} differs from the metadata's authorization_endpoint {meta}"),
                "set authorize_url to the metadata's value, or remove it to use discovery",
            );
        }
    }
    let mut needed = vec![cred.grant.as_str()];
    if cred.grant == GrantType::RefreshToken {
        needed.push("authorization_code");
    }
    // RFC 8414 §2: absent grant_types_supported means ["authorization_code", "implicit"].
    let grants = md
        .grant_types_supported
        .clone()
        .unwrap_or_else(|| vec!["authorization_code".into(), "implicit".into()]);
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|g| !grants.iter().any(|x| x == g))
        .collect();
    if missing.is_empty() {
        r.ok(format!("{n}: the IdP supports the grants used"));
    } else {
        r.add(
            Mark::Fail,
            format!(
                "{n}: the metadata's grant_types_supported ({}) lacks {}",
                grants.join(", "),
                missing.join(", ")
            ),
            "enable the grant at the IdP, or change `grant`",
        );
    }
    // RFC 8414 §2: absent means client_secret_basic.
    let methods = md
        .token_endpoint_auth_methods_supported
        .clone()
        .unwrap_or_else(|| vec!["client_secret_basic".into()]);
    if methods.iter().any(|m| m == cred.auth_method.as_str()) {
        r.ok(format!(
            "{n}: auth_method {} is supported",
            cred.auth_method.as_str()
        ));
    } else {
        r.add(
            Mark::Fail,
            format!(
                "{n}: auth_method {} is not in token_endpoint_auth_methods_supported ({})",
                cred.auth_method.as_str(),
                methods.join(", ")
            ),
            &format!("set auth_method to one of: {}", methods.join(", ")),
        );
    }
    if let Some(cfg) = &cred.device_authorization_url {
        check_device_metadata(r, n, &cfg.to_string(), md, &grants);
    }
    if let Some(source) = &cred.dpop {
        // RFC 9449 §5.1: absent means the IdP does not say it does DPoP.
        let alg = match source {
            DpopSource::File { key, .. } => key.alg(),
            DpopSource::Generated => crate::dpop::DEFAULT_ALG,
        };
        match &md.dpop_signing_alg_values_supported {
            Some(algs) if algs.iter().any(|a| a == alg) => {
                r.ok(format!("{n}: the IdP accepts DPoP proofs signed {alg}"))
            }
            Some(algs) => r.add(
                Mark::Warn,
                format!(
                    "{n}: dpop_signing_alg_values_supported ({}) lacks {alg}, the DPoP key's algorithm",
                    algs.join(", ")
                ),
                &format!(
                    "set dpop_key to a key of one of: {} (P-256 for ES256, Ed25519 for EdDSA)",
                    algs.join(", ")
                ),
            ),
            None => r.add(
                Mark::Warn,
                format!("{n}: the metadata has no dpop_signing_alg_values_supported; the IdP may not support DPoP"),
                "check that the IdP issues DPoP-bound tokens to this client, or remove dpop = true",
            ),
        }
    }
    if cred.grant == GrantType::RefreshToken {
        match &md.code_challenge_methods_supported {
            Some(m) if m.iter().any(|x| x == "S256") => r.ok(format!("{n}: PKCE S256 supported")),
            Some(m) => r.add(
                Mark::Fail,
                format!(
                    "{n}: code_challenge_methods_supported ({}) lacks S256",
                    m.join(", ")
                ),
                "enable PKCE S256 for the client at the IdP (login requires it)",
            ),
            None => r.add(
                Mark::Warn,
                format!("{n}: the metadata does not advertise PKCE S256"),
                "login sends S256 anyway; if it fails, enable PKCE at the IdP",
            ),
        }
    }
}

/// `device_authorization_url` (login --device) against RFC 8628 §4 metadata.
fn check_device_metadata(
    r: &mut Report,
    n: &str,
    cfg: &str,
    md: &discovery::Metadata,
    grants: &[String],
) {
    let same = |a: &str, b: &str| a.trim_end_matches('/') == b.trim_end_matches('/');
    match &md.device_authorization_endpoint {
        Some(meta) if same(cfg, meta) => {
            r.ok(format!("{n}: device_authorization_url matches the metadata"))
        }
        Some(meta) => r.add(
            Mark::Fail,
            format!("{n}: device_authorization_url {cfg} differs from the metadata's device_authorization_endpoint {meta}"),
            "set device_authorization_url to the metadata's value, or remove it to use discovery",
        ),
        None => r.add(
            Mark::Warn,
            format!("{n}: the metadata has no device_authorization_endpoint"),
            "check that the IdP offers the device grant (RFC 8628) for this client",
        ),
    }
    if grants.iter().any(|g| g == grant::DEVICE_CODE_GRANT) {
        r.ok(format!("{n}: the IdP supports the device_code grant"));
    } else {
        r.add(
            Mark::Warn,
            format!("{n}: the metadata's grant_types_supported lacks the device_code grant"),
            "enable the device authorization grant for the client at the IdP (login --device needs it)",
        );
    }
}

async fn send(
    client: &GrantClient,
    req: &grant::PreparedRequest,
) -> Result<grant::TokenSet, GrantError> {
    let raw = client.send(req).await?;
    grant::parse_token_response(&raw, SystemTime::now())
}

fn describe(e: &GrantError) -> String {
    let mut s = crate::error_chain(e);
    if let Some(d) = &e.description {
        s.push_str(&format!(" ({d})"));
    }
    s
}

async fn check_upstreams(r: &mut Report, config: &Config, name: Option<&str>) {
    let egress = crate::egress::proxy_from(config.server.egress_proxy.as_ref());
    let egress = egress.as_ref();
    let mut seen = Vec::new();
    for route in &config.routes {
        if name.is_some_and(|n| n != route.credential) {
            continue;
        }
        if let Some(field) = route.upstream_from {
            r.ok(format!(
                "route {}: upstream comes from {} of the token response (checked when it arrives)",
                route.path_prefix,
                field.placeholder()
            ));
            continue;
        }
        let key = (route.upstream.to_string(), route.ca_file.clone());
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let tls = match crate::tls::client_config(route.ca_file.as_deref(), None, &[]) {
            Ok(t) => t,
            Err(e) => {
                r.add(
                    Mark::Fail,
                    format!("route {}: {}", route.path_prefix, crate::error_chain(&e)),
                    "fix the route's ca_file",
                );
                continue;
            }
        };
        probe(
            r,
            &format!("route {}: upstream", route.path_prefix),
            &tls,
            &route.upstream,
            egress,
        )
        .await;
    }
}

async fn check_running(r: &mut Report, config: &Config, name: Option<&str>) {
    let Some(admin) = crate::admin_client::AdminClient::new(config, None) else {
        return;
    };
    let base = admin.base();
    let Ok((status, body)) = admin.get("/credentials").await else {
        r.add(
            Mark::Warn,
            format!("no running proxy answers at {base}"),
            "start it with `tokenproxy run -c FILE` (the checks above do not need it)",
        );
        return;
    };
    if !status.is_success() {
        r.add(
            Mark::Warn,
            format!("the running proxy at {base} answered {status} to /credentials"),
            "check that admin.token matches the running proxy's",
        );
        return;
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap_or_default();
    for s in list {
        let cred = s["credential"].as_str().unwrap_or("?");
        if name.is_some_and(|n| n != cred) {
            continue;
        }
        let state = s["state"].as_str().unwrap_or("?");
        let what = format!(
            "running proxy: {cred} is {state} (family {}, generation {})",
            s["family"].as_str().unwrap_or("-"),
            s["generation"]
        );
        if state == "dead" {
            let hint = s["last_error"]["hint"]
                .as_str()
                .unwrap_or("run `tokenproxy login`");
            r.add(Mark::Fail, what, hint);
        } else {
            r.ok(what);
        }
    }
}
