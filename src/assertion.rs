//! Client assertions for the token endpoint (RFC 7523 §2.2, OIDC Core §9):
//! `private_key_jwt` keys (loaded and proven able to sign when the config
//! is loaded), the per-request JWT, `client_secret_jwt`'s HS256 variant, and
//! `client_assertion_file` (a JWT someone else signs, such as a Kubernetes
//! projected service-account token).
//!
//! Signing is jsonwebtoken's (ring underneath). Owns no state: every token
//! request gets a fresh assertion with its own `jti`. Nothing here logs; a
//! key's `Debug` shows its algorithm, `kid` and public thumbprint only.

use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{self, KeyPair as _};
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 7523 §2.2.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion we sign is valid: long enough for a slow token
/// endpoint, short enough that a captured one is soon useless.
pub const LIFETIME: Duration = Duration::from_secs(60);

/// An assertion read from `client_assertion_file` must outlive the request
/// by this much, so it does not expire in flight.
const FILE_MARGIN: Duration = Duration::from_secs(5);

/// A private key that has signed once already (at load), with what its
/// header carries.
#[derive(Clone)]
pub struct SigningKey {
    encoding: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
    x5t: Option<String>,
    x5t_s256: Option<String>,
    thumbprint: String,
    /// SHA-256 over the key and certificate files: a reload that changed
    /// either makes the credential's config differ.
    digest: [u8; 32],
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.alg == other.alg && self.kid == other.kid
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// `RS256`, `PS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        alg_name(self.alg)
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// RFC 7638 JWK thumbprint (SHA-256) of the public key: safe to print,
    /// and what most IdPs show next to a registered key.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// The certificate's `x5t#S256`, when `client_assertion_cert` is set.
    pub fn cert_thumbprint(&self) -> Option<&str> {
        self.x5t_s256.as_deref()
    }
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::RS256 => "RS256",
        Algorithm::PS256 => "PS256",
        Algorithm::ES256 => "ES256",
        Algorithm::HS256 => "HS256",
        _ => "other",
    }
}

/// Why a key file cannot sign. Display names no key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is encrypted; tokenproxy needs an unencrypted PKCS#8 PEM key (openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8), kept readable only by the proxy")]
    Encrypted,
    #[error("holds a {0} key; expected a PKCS#8 PEM key (\"BEGIN PRIVATE KEY\"); convert it with openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8")]
    NotPkcs8(&'static str),
    #[error("holds no PEM private key; expected a PKCS#8 PEM key (\"BEGIN PRIVATE KEY\")")]
    NoKey,
    #[error("is not an RSA (2048 bits or more) or P-256 key ({0}); private_key_jwt signs with RS256, PS256 or ES256")]
    Unsupported(String),
    #[error("client_assertion_alg {alg:?} does not fit this {key} key; expected {expected}")]
    AlgMismatch {
        alg: String,
        key: &'static str,
        expected: &'static str,
    },
    #[error(
        "client_assertion_alg {0:?} is not supported; expected \"RS256\", \"PS256\" or \"ES256\""
    )]
    UnknownAlg(String),
    #[error("the key could not sign a test assertion: {0}")]
    CannotSign(String),
}

/// Why `client_assertion_cert` cannot be used with the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("holds no PEM certificate (\"BEGIN CERTIFICATE\")")]
    NoCert,
    #[error("is not a certificate tokenproxy can read: {0}")]
    Unreadable(String),
    #[error("does not belong to client_assertion_key (its public key differs); the IdP would find the wrong key by x5t")]
    WrongKey,
}

enum KeyKind {
    Rsa(signature::RsaKeyPair),
    P256(signature::EcdsaKeyPair),
}

/// A key or certificate file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Cert(#[from] CertError),
}

/// Loads `key_pem` (PKCS#8), picks or checks `alg`, binds the certificate
/// in `cert_pem` when given (`x5t#S256`, and `x5t`, SHA-1, which Entra
/// requires), and signs once to prove the key works.
pub fn load_key(
    key_pem: &[u8],
    alg: Option<&str>,
    kid: Option<String>,
    cert_pem: Option<&[u8]>,
) -> Result<SigningKey, LoadError> {
    let der = pkcs8_der(key_pem)?;
    let rng = ring::rand::SystemRandom::new();
    let kind = match signature::RsaKeyPair::from_pkcs8(&der) {
        Ok(k) => KeyKind::Rsa(k),
        Err(rsa_err) => match signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &rng,
        ) {
            Ok(k) => KeyKind::P256(k),
            Err(_) => {
                // ring says why an RSA key failed (too small...); any other
                // key type gets the generic word.
                let why = match rsa_err.to_string().as_str() {
                    "WrongAlgorithm" | "InvalidEncoding" => "not RSA or P-256".to_owned(),
                    other => format!("RSA key rejected: {other}"),
                };
                return Err(KeyError::Unsupported(why).into());
            }
        },
    };
    let (key_type, expected, default) = match kind {
        KeyKind::Rsa(_) => ("RSA", "\"RS256\" or \"PS256\"", Algorithm::RS256),
        KeyKind::P256(_) => ("P-256", "\"ES256\"", Algorithm::ES256),
    };
    let alg = match alg {
        None => default,
        Some(a) => {
            let parsed = match a {
                "RS256" => Algorithm::RS256,
                "PS256" => Algorithm::PS256,
                "ES256" => Algorithm::ES256,
                other => return Err(KeyError::UnknownAlg(other.to_owned()).into()),
            };
            let fits = matches!(
                (&kind, parsed),
                (KeyKind::Rsa(_), Algorithm::RS256 | Algorithm::PS256)
                    | (KeyKind::P256(_), Algorithm::ES256)
            );
            if !fits {
                return Err(KeyError::AlgMismatch {
                    alg: a.to_owned(),
                    key: key_type,
                    expected,
                }
                .into());
            }
            parsed
        }
    };
    // jsonwebtoken reads PEM; hand it the one PKCS#8 section we checked.
    let pem = pem_wrap("PRIVATE KEY", &der);
    let encoding = match kind {
        KeyKind::Rsa(_) => EncodingKey::from_rsa_pem(pem.as_bytes()),
        KeyKind::P256(_) => EncodingKey::from_ec_pem(pem.as_bytes()),
    }
    .map_err(|e| KeyError::CannotSign(e.to_string()))?;
    jsonwebtoken::encode(&Header::new(alg), &serde_json::json!({}), &encoding)
        .map_err(|e| KeyError::CannotSign(e.to_string()))?;
    let mut digest = Sha256::new();
    digest.update(key_pem);
    let mut key = SigningKey {
        encoding,
        alg,
        kid,
        x5t: None,
        x5t_s256: None,
        thumbprint: jwk_thumbprint(&kind),
        digest: [0; 32],
    };
    if let Some(cert_pem) = cert_pem {
        let cert = cert_for(&kind, &der, cert_pem)?;
        key.x5t_s256 = Some(cert_thumbprint(cert.as_ref()));
        key.x5t = Some(URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            cert.as_ref(),
        )));
        digest.update(cert.as_ref());
    }
    key.digest = digest.finalize().into();
    Ok(key)
}

/// The one unencrypted PKCS#8 section of a PEM file (also `dpop_key`'s).
pub(crate) fn pkcs8_der(key_pem: &[u8]) -> Result<Vec<u8>, KeyError> {
    let text = String::from_utf8_lossy(key_pem);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(KeyError::Encrypted);
    }
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(key_pem) {
        match item {
            Ok((SectionKind::PrivateKey, der)) => return Ok(der),
            Ok((SectionKind::RsaPrivateKey, _)) => return Err(KeyError::NotPkcs8("PKCS#1 RSA")),
            Ok((SectionKind::EcPrivateKey, _)) => return Err(KeyError::NotPkcs8("SEC1 EC")),
            Ok(_) => {}
            Err(_) => return Err(KeyError::NoKey),
        }
    }
    Err(KeyError::NoKey)
}

/// The first certificate in `cert_pem`, once it has verified a signature
/// made with the key (so `x5t` names this key, not another).
fn cert_for(
    kind: &KeyKind,
    pkcs8: &[u8],
    cert_pem: &[u8],
) -> Result<CertificateDer<'static>, CertError> {
    let der: CertificateDer<'static> = CertificateDer::pem_slice_iter(cert_pem)
        .next()
        .ok_or(CertError::NoCert)?
        .map_err(|e| CertError::Unreadable(e.to_string()))?;
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| CertError::Unreadable(format!("{e:?}")))?;
    let msg = b"tokenproxy client_assertion_cert check";
    let rng = ring::rand::SystemRandom::new();
    let verified = match kind {
        KeyKind::Rsa(pair) => {
            let mut sig = vec![0; pair.public().modulus_len()];
            pair.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                .map_err(|_| CertError::WrongKey)?;
            ee.verify_signature(webpki::ring::RSA_PKCS1_2048_8192_SHA256, msg, &sig)
        }
        KeyKind::P256(_) => {
            // X.509 verifiers take ASN.1 ECDSA signatures; JWS uses fixed.
            let pair = signature::EcdsaKeyPair::from_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                pkcs8,
                &rng,
            )
            .map_err(|_| CertError::WrongKey)?;
            let sig = pair.sign(&rng, msg).map_err(|_| CertError::WrongKey)?;
            ee.verify_signature(webpki::ring::ECDSA_P256_SHA256, msg, sig.as_ref())
        }
    };
    verified.map_err(|_| CertError::WrongKey)?;
    Ok(der)
}

/// `x5t#S256` of a DER certificate (RFC 7515 §4.1.8): safe to print.
pub fn cert_thumbprint(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(der))
}

fn jwk_thumbprint(kind: &KeyKind) -> String {
    // RFC 7638 §3.2: required members only, in lexicographic order.
    let json = match kind {
        KeyKind::Rsa(pair) => {
            let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
            format!(
                r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(&c.e),
                URL_SAFE_NO_PAD.encode(&c.n)
            )
        }
        KeyKind::P256(pair) => {
            let p = pair.public_key().as_ref();
            format!(
                r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
                URL_SAFE_NO_PAD.encode(&p[1..33]),
                URL_SAFE_NO_PAD.encode(&p[33..65])
            )
        }
    };
    URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes()))
}

fn pem_wrap(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Why no assertion could be made for a request. Display names the file,
/// never its content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("cannot read client_assertion_file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("client_assertion_file {path} does not hold a JWT")]
    NotJwt { path: PathBuf },
    #[error("client_assertion_file {path} holds a JWT without exp; tokenproxy will not present an assertion it cannot date")]
    NoExp { path: PathBuf },
    #[error("client_assertion_file {path} holds a JWT that expired {ago}s ago; whatever writes it (the kubelet, for a projected service-account token) has stopped renewing it")]
    Expired { path: PathBuf, ago: u64 },
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
}

/// The claims of an assertion we sign (RFC 7523 §3).
#[derive(Debug, serde::Serialize)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a str,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

impl<'a> Claims<'a> {
    /// iss = sub = client_id; a fresh 128-bit jti; exp [`LIFETIME`] after iat.
    pub fn new(client_id: &'a str, aud: &'a str, now: SystemTime) -> Claims<'a> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Claims {
            iss: client_id,
            sub: client_id,
            aud,
            jti: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
            iat,
            exp: iat + LIFETIME.as_secs(),
        }
    }
}

/// A `private_key_jwt` assertion.
pub fn sign(key: &SigningKey, claims: &Claims<'_>) -> Result<Secret, AssertionError> {
    let mut header = Header::new(key.alg);
    header.kid = key.kid.clone();
    header.x5t = key.x5t.clone();
    header.x5t_s256 = key.x5t_s256.clone();
    jsonwebtoken::encode(&header, claims, &key.encoding)
        .map(Secret::new)
        .map_err(|e| AssertionError::Sign(e.to_string()))
}

/// A `client_secret_jwt` assertion: HS256 keyed with the client secret.
pub fn sign_hs256(secret: &Secret, claims: &Claims<'_>) -> Result<Secret, AssertionError> {
    let key = EncodingKey::from_secret(secret.expose().as_bytes());
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)
        .map(Secret::new)
        .map_err(|e| AssertionError::Sign(e.to_string()))
}

/// Reads `client_assertion_file` now (it is rotated behind our back) and
/// refuses a token that is expired or about to be.
pub fn read_file(path: &Path, now: SystemTime) -> Result<Secret, AssertionError> {
    let text = std::fs::read_to_string(path).map_err(|e| AssertionError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    check_file_token(path, text.trim(), now).map(|()| Secret::new(text.trim()))
}

/// Sans-IO part of [`read_file`].
pub fn check_file_token(path: &Path, token: &str, now: SystemTime) -> Result<(), AssertionError> {
    let not_jwt = || AssertionError::NotJwt {
        path: path.to_path_buf(),
    };
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(not_jwt());
    }
    let raw = URL_SAFE_NO_PAD
        .decode(parts[1].trim_end_matches('='))
        .map_err(|_| not_jwt())?;
    let claims: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| not_jwt())?;
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| AssertionError::NoExp {
            path: path.to_path_buf(),
        })?;
    let exp = UNIX_EPOCH + Duration::from_secs(exp);
    if exp <= now + FILE_MARGIN {
        return Err(AssertionError::Expired {
            path: path.to_path_buf(),
            ago: now.duration_since(exp).map(|d| d.as_secs()).unwrap_or(0),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    const RSA: &str = include_str!("dev/testdata/client-rsa.key");
    const RSA_PUB: &str = include_str!("dev/testdata/client-rsa.pub");
    const RSA_CERT: &str = include_str!("dev/testdata/client-rsa.pem");
    const EC: &str = include_str!("dev/testdata/client-ec.key");
    const EC_PUB: &str = include_str!("dev/testdata/client-ec.pub");
    const EC384: &str = include_str!("dev/testdata/client-ec384.key");
    const ENCRYPTED: &str = include_str!("dev/testdata/client-encrypted.key");
    const MTLS_CERT: &str = include_str!("dev/testdata/mtls-client.pem");
    const MTLS_KEY: &str = include_str!("dev/testdata/mtls-client.key");

    fn verify(token: &str, alg: Algorithm, key: &DecodingKey) -> serde_json::Value {
        let mut v = Validation::new(alg);
        v.set_audience(&["https://idp.example/token"]);
        v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<serde_json::Value>(token, key, &v)
            .unwrap()
            .claims
    }

    #[test]
    fn rsa_and_p256_keys_sign_verifiable_assertions() {
        let now = SystemTime::now();
        for (pem, alg, public) in [
            (
                RSA,
                None,
                DecodingKey::from_rsa_pem(RSA_PUB.as_bytes()).unwrap(),
            ),
            (
                RSA,
                Some("PS256"),
                DecodingKey::from_rsa_pem(RSA_PUB.as_bytes()).unwrap(),
            ),
            (
                EC,
                None,
                DecodingKey::from_ec_pem(EC_PUB.as_bytes()).unwrap(),
            ),
        ] {
            let key = load_key(pem.as_bytes(), alg, Some("k1".into()), None).unwrap();
            let claims = Claims::new("my-client", "https://idp.example/token", now);
            let jwt = sign(&key, &claims).unwrap();
            let header = jsonwebtoken::decode_header(jwt.expose()).unwrap();
            assert_eq!(alg_name(header.alg), key.alg());
            assert_eq!(header.kid.as_deref(), Some("k1"));
            let c = verify(jwt.expose(), header.alg, &public);
            assert_eq!(c["iss"], "my-client");
            assert_eq!(c["sub"], "my-client");
            assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 60);
            assert!(!format!("{key:?}").contains("PRIVATE"));
        }
    }

    #[test]
    fn each_assertion_has_its_own_jti() {
        let now = SystemTime::now();
        let a = Claims::new("c", "a", now);
        let b = Claims::new("c", "a", now);
        assert_ne!(a.jti, b.jti);
        assert!(a.jti.len() >= 22);
    }

    fn key_err(pem: &str, alg: Option<&str>) -> KeyError {
        match load_key(pem.as_bytes(), alg, None, None).unwrap_err() {
            LoadError::Key(k) => k,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unusable_keys_say_why() {
        assert_eq!(key_err(ENCRYPTED, None), KeyError::Encrypted);
        assert!(matches!(key_err(EC384, None), KeyError::Unsupported(_)));
        assert!(matches!(
            key_err(EC, Some("RS256")),
            KeyError::AlgMismatch { key: "P-256", .. }
        ));
        assert!(matches!(
            key_err(RSA, Some("ES256")),
            KeyError::AlgMismatch { key: "RSA", .. }
        ));
        assert!(matches!(
            key_err(RSA, Some("HS256")),
            KeyError::UnknownAlg(_)
        ));
        assert_eq!(key_err(RSA_CERT, None), KeyError::NoKey);
        assert_eq!(key_err("hello", None), KeyError::NoKey);
    }

    #[test]
    fn a_cert_adds_x5t_and_must_hold_the_key() {
        let key = load_key(RSA.as_bytes(), None, None, Some(RSA_CERT.as_bytes())).unwrap();
        let jwt = sign(&key, &Claims::new("c", "a", SystemTime::now())).unwrap();
        let h = jsonwebtoken::decode_header(jwt.expose()).unwrap();
        let der = CertificateDer::from_pem_slice(RSA_CERT.as_bytes()).unwrap();
        assert_eq!(
            h.x5t_s256.as_deref(),
            Some(
                URL_SAFE_NO_PAD
                    .encode(Sha256::digest(der.as_ref()))
                    .as_str()
            )
        );
        assert_eq!(
            h.x5t.as_ref().map(String::len),
            Some(27),
            "SHA-1, base64url"
        );
        let cert_err = |key: &str, cert: &str| {
            load_key(key.as_bytes(), None, None, Some(cert.as_bytes())).unwrap_err()
        };
        assert_eq!(
            cert_err(RSA, MTLS_CERT),
            LoadError::Cert(CertError::WrongKey)
        );
        assert!(load_key(MTLS_KEY.as_bytes(), None, None, Some(MTLS_CERT.as_bytes())).is_ok());
        assert_eq!(
            cert_err(EC, MTLS_CERT),
            LoadError::Cert(CertError::WrongKey)
        );
        assert_eq!(cert_err(EC, "nope"), LoadError::Cert(CertError::NoCert));
    }

    #[test]
    fn thumbprints_are_stable_and_public() {
        let a = load_key(EC.as_bytes(), None, None, None).unwrap();
        let b = load_key(EC.as_bytes(), None, None, None).unwrap();
        assert_eq!(a.thumbprint(), b.thumbprint());
        assert_eq!(a, b);
        assert_eq!(a.thumbprint().len(), 43);
        let c = load_key(RSA.as_bytes(), None, None, None).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn hs256_uses_the_client_secret() {
        let claims = Claims::new("c", "https://idp.example/token", SystemTime::now());
        let jwt = sign_hs256(&Secret::new("s3cret-s3cret-s3cret-s3cret-s3cret"), &claims).unwrap();
        verify(
            jwt.expose(),
            Algorithm::HS256,
            &DecodingKey::from_secret(b"s3cret-s3cret-s3cret-s3cret-s3cret"),
        );
    }

    #[test]
    fn file_tokens_are_refused_when_expired_or_not_jwts() {
        let p = Path::new("/var/run/secrets/token");
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let jwt = |claims: &str| {
            format!(
                "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
                URL_SAFE_NO_PAD.encode(claims)
            )
        };
        assert!(check_file_token(p, &jwt(r#"{"exp":1000600}"#), now).is_ok());
        let e = check_file_token(p, &jwt(r#"{"exp":999000}"#), now).unwrap_err();
        assert_eq!(
            e,
            AssertionError::Expired {
                path: p.into(),
                ago: 1000
            }
        );
        assert!(e.to_string().contains("/var/run/secrets/token"));
        // Within the margin counts as expired: it would die in flight.
        assert!(check_file_token(p, &jwt(r#"{"exp":1000003}"#), now).is_err());
        assert!(matches!(
            check_file_token(p, &jwt(r#"{"sub":"x"}"#), now),
            Err(AssertionError::NoExp { .. })
        ));
        assert!(matches!(
            check_file_token(p, "not-a-jwt", now),
            Err(AssertionError::NotJwt { .. })
        ));
    }
}
