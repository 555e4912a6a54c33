//! DPoP (RFC 9449): the key a credential's tokens are bound to, the proof
//! JWT sent with every token request and every upstream request, the
//! server nonces learnt per origin, and the proof verification the dev IdP
//! and echo upstream use (docs/dpop.md).
//!
//! A key is `dpop_key` (PKCS#8 PEM, P-256 → ES256, Ed25519 → EdDSA), proven
//! able to sign when the config loads, or a P-256 key generated once and
//! kept in the store with the token set. Signing is ring's; a proof is a
//! compact JWS around it. Nothing here logs; a key's `Debug` shows its
//! algorithm and public thumbprint only, a proof is a [`Secret`].

use crate::assertion::{self, KeyError};
use crate::secret::Secret;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use parking_lot::Mutex;
use ring::signature::{self, KeyPair as _};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// RFC 9449 §4.1: the request header carrying the proof.
pub static DPOP: HeaderName = HeaderName::from_static("dpop");
/// RFC 9449 §8: the header a server names its nonce in.
pub static DPOP_NONCE: HeaderName = HeaderName::from_static("dpop-nonce");
/// RFC 9449 §4.2.
pub const PROOF_TYP: &str = "dpop+jwt";
/// What tokenproxy signs with when no `dpop_key` is given.
pub const DEFAULT_ALG: &str = "ES256";

enum Pair {
    P256(signature::EcdsaKeyPair),
    Ed25519(signature::Ed25519KeyPair),
}

/// A key that has signed once already (at load or generation).
pub struct DpopKey {
    pair: Pair,
    /// The proof header, base64url, built once: it only names the key.
    header_b64: String,
    thumbprint: String,
    /// SHA-256 of the PKCS#8 key: a reload that changed it differs.
    digest: [u8; 32],
}

impl PartialEq for DpopKey {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("alg", &self.alg())
            .field("jkt", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// Why a `dpop_key` (or a stored key) cannot sign. Display names no key
/// material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopKeyError {
    #[error(transparent)]
    Pem(#[from] KeyError),
    #[error("is not a P-256 or Ed25519 key; DPoP proofs are signed with ES256 (P-256, what providers accept most widely) or EdDSA (Ed25519)")]
    Unsupported,
    #[error("the stored DPoP key is not a base64url PKCS#8 key")]
    Stored,
    #[error("the key could not sign a test proof")]
    CannotSign,
}

/// Why no proof could be made (never for a key that loaded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot sign the DPoP proof")]
pub struct ProofError;

impl DpopKey {
    /// Loads a `dpop_key` file: PKCS#8 PEM, P-256 or Ed25519.
    pub fn from_pem(pem: &[u8]) -> Result<DpopKey, DpopKeyError> {
        let der = assertion::pkcs8_der(pem)?;
        Self::from_pkcs8(&der)
    }

    /// A new P-256 key, and its PKCS#8 form (base64url) to store with the
    /// token set.
    pub fn generate() -> Result<(DpopKey, Secret), DpopKeyError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = signature::EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| DpopKeyError::CannotSign)?;
        let key = Self::from_pkcs8(doc.as_ref())?;
        Ok((key, Secret::new(URL_SAFE_NO_PAD.encode(doc.as_ref()))))
    }

    /// A key kept in the store by [`DpopKey::generate`].
    pub fn from_stored(stored: &Secret) -> Result<DpopKey, DpopKeyError> {
        let der = URL_SAFE_NO_PAD
            .decode(stored.expose())
            .map_err(|_| DpopKeyError::Stored)?;
        Self::from_pkcs8(&der)
    }

    fn from_pkcs8(der: &[u8]) -> Result<DpopKey, DpopKeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = match signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &rng,
        ) {
            Ok(k) => Pair::P256(k),
            // openssl writes PKCS#8 v1 (no public key): "maybe unchecked"
            // accepts it and v2 alike.
            Err(_) => match signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                Ok(k) => Pair::Ed25519(k),
                Err(_) => return Err(DpopKeyError::Unsupported),
            },
        };
        let jwk = public_jwk(&pair);
        let alg = match pair {
            Pair::P256(_) => "ES256",
            Pair::Ed25519(_) => "EdDSA",
        };
        let header = json!({"typ": PROOF_TYP, "alg": alg, "jwk": jwk});
        let key = DpopKey {
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            thumbprint: jwk_thumbprint(&jwk).ok_or(DpopKeyError::Unsupported)?,
            pair,
            digest: Sha256::digest(der).into(),
        };
        key.sign(b"tokenproxy dpop_key check")
            .map_err(|_| DpopKeyError::CannotSign)?;
        Ok(key)
    }

    /// `ES256` or `EdDSA`.
    pub fn alg(&self) -> &'static str {
        match self.pair {
            Pair::P256(_) => "ES256",
            Pair::Ed25519(_) => "EdDSA",
        }
    }

    /// RFC 7638 thumbprint of the public key: the `jkt` tokens are bound to.
    /// Safe to print.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ProofError> {
        match &self.pair {
            Pair::P256(k) => k
                .sign(&ring::rand::SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| ProofError),
            Pair::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
        }
    }

    /// A proof for one request (RFC 9449 §4.2): `htm`, `htu` (see
    /// [`htu`]), `iat`, a fresh `jti`; `ath` for a resource request,
    /// `nonce` when the server gave one.
    pub fn proof(
        &self,
        htm: &str,
        htu: &str,
        ath: Option<&str>,
        nonce: Option<&str>,
        now: SystemTime,
    ) -> Result<Secret, ProofError> {
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut claims = json!({
            "jti": URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
            "htm": htm,
            "htu": htu,
            "iat": iat,
        });
        if let Some(ath) = ath {
            claims["ath"] = json!(ath);
        }
        if let Some(nonce) = nonce {
            claims["nonce"] = json!(nonce);
        }
        let mut jws = String::with_capacity(512);
        jws.push_str(&self.header_b64);
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = self.sign(jws.as_bytes())?;
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(Secret::new(jws))
    }

    /// The proof as a header value (marked sensitive).
    pub fn proof_header(
        &self,
        htm: &str,
        htu: &str,
        ath: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<HeaderValue, ProofError> {
        let proof = self.proof(htm, htu, ath, nonce, SystemTime::now())?;
        let mut v = HeaderValue::from_str(proof.expose()).map_err(|_| ProofError)?;
        v.set_sensitive(true);
        Ok(v)
    }
}

fn public_jwk(pair: &Pair) -> Value {
    match pair {
        Pair::P256(k) => {
            // Uncompressed point: 0x04 || x || y.
            let p = k.public_key().as_ref();
            json!({
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&p[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&p[33..65]),
            })
        }
        Pair::Ed25519(k) => json!({
            "kty": "OKP", "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(k.public_key().as_ref()),
        }),
    }
}

/// RFC 7638 §3.2 (RFC 8037 §2 for OKP): the required members only, in
/// lexicographic order, hashed with SHA-256. `None` for other key types.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    let canonical = match s("kty")? {
        "EC" => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            s("crv")?,
            s("x")?,
            s("y")?
        ),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv")?, s("x")?),
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e")?, s("n")?),
        _ => return None,
    };
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes())))
}

/// RFC 9449 §4.2: the target URI without query and fragment.
pub fn htu(uri: &Uri) -> String {
    let scheme = uri.scheme_str().unwrap_or("https");
    let authority = uri.authority().map_or("", |a| a.as_str());
    format!("{scheme}://{authority}{}", uri.path())
}

/// RFC 9449 §4.2: base64url SHA-256 of the access token.
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()))
}

/// Nonces are per server (RFC 9449 §8): keyed by scheme and authority.
fn origin(uri: &Uri) -> String {
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or("https"),
        uri.authority().map_or("", |a| a.as_str())
    )
}

/// The last nonce each origin gave. A sync mutex: held for a map lookup,
/// never across an await.
#[derive(Debug, Default)]
pub struct Nonces {
    by_origin: Mutex<HashMap<String, String>>,
}

impl Nonces {
    pub fn get(&self, uri: &Uri) -> Option<String> {
        self.by_origin.lock().get(&origin(uri)).cloned()
    }

    /// Keeps the `DPoP-Nonce` of any answer from `uri`'s origin (§8.2: a
    /// server may hand out the next nonce on any response). Returns whether
    /// there was one.
    pub fn learn(&self, uri: &Uri, headers: &HeaderMap) -> bool {
        let Some(n) = headers
            .get(&DPOP_NONCE)
            .and_then(|v| v.to_str().ok())
            .filter(|n| valid_nonce(n))
        else {
            return false;
        };
        self.by_origin.lock().insert(origin(uri), n.to_owned());
        true
    }
}

/// RFC 9449 §8.1: a nonce is 1*NQCHAR (printable, no quote or backslash).
fn valid_nonce(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 512
        && n.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// RFC 9449 §8: the token endpoint asks for a nonce with a 400 (some
/// servers 401) `use_dpop_nonce` and a `DPoP-Nonce` header.
pub fn token_endpoint_wants_nonce(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> bool {
    if !(status == StatusCode::BAD_REQUEST || status == StatusCode::UNAUTHORIZED)
        || !headers.contains_key(&DPOP_NONCE)
    {
        return false;
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .is_some_and(|e| e == "use_dpop_nonce")
}

/// RFC 9449 §9: a resource server asks with a 401, `WWW-Authenticate:
/// DPoP error="use_dpop_nonce"` and a `DPoP-Nonce` header.
pub fn upstream_wants_nonce(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::UNAUTHORIZED
        && headers.contains_key(&DPOP_NONCE)
        && headers
            .get_all(http::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                let l = v.to_ascii_lowercase();
                l.trim_start().starts_with("dpop") && l.contains("use_dpop_nonce")
            })
}

/// What a verified proof says (dev IdP and echo upstream).
#[derive(Debug, Clone)]
pub struct Verified {
    /// The thumbprint of the proof's key.
    pub jkt: String,
    pub jti: String,
    pub iat: u64,
    pub nonce: Option<String>,
    pub ath: Option<String>,
}

/// How far a proof's `iat` may be from the verifier's clock.
pub const IAT_WINDOW_SECS: u64 = 60;

/// Verifies a proof strictly (RFC 9449 §4.3): one proof, `typ`, an
/// asymmetric `alg` matching a public-only `jwk`, the signature, `htm`,
/// `htu` (compared without query), `iat` within [`IAT_WINDOW_SECS`], a
/// `jti`. The caller checks `jti` replay, `nonce`, `ath` and the binding.
/// Errors are short sentences for `error_description`.
pub fn verify(proof: &str, htm: &str, htu: &str, now_unix: u64) -> Result<Verified, String> {
    let mut parts = proof.split('.');
    let header_b64 = parts.next().unwrap_or("");
    let header: Value = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("DPoP proof is not a JWT")?;
    if header.get("typ").and_then(Value::as_str) != Some(PROOF_TYP) {
        return Err("DPoP proof typ is not dpop+jwt".into());
    }
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("ES256") => jsonwebtoken::Algorithm::ES256,
        Some("EdDSA") => jsonwebtoken::Algorithm::EdDSA,
        other => return Err(format!("DPoP proof alg {other:?} is not supported")),
    };
    let jwk = header
        .get("jwk")
        .filter(|j| j.is_object())
        .ok_or("DPoP proof header has no jwk")?;
    const PRIVATE: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];
    if PRIVATE.iter().any(|m| jwk.get(m).is_some()) {
        return Err("DPoP proof jwk contains a private key".into());
    }
    let fits = match (alg, jwk.get("kty").and_then(Value::as_str)) {
        (jsonwebtoken::Algorithm::ES256, Some("EC")) => jwk["crv"] == "P-256",
        (jsonwebtoken::Algorithm::EdDSA, Some("OKP")) => jwk["crv"] == "Ed25519",
        _ => false,
    };
    if !fits {
        return Err("DPoP proof jwk does not fit its alg".into());
    }
    let parsed: jsonwebtoken::jwk::Jwk =
        serde_json::from_value(jwk.clone()).map_err(|_| "DPoP proof jwk is malformed")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(&parsed)
        .map_err(|_| "DPoP proof jwk is not a usable key")?;
    let mut validation = jsonwebtoken::Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(proof, &key, &validation)
        .map_err(|_| "DPoP proof signature does not verify")?
        .claims;
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let jti = s("jti")
        .filter(|j| !j.is_empty())
        .ok_or("DPoP proof has no jti")?;
    if s("htm").as_deref() != Some(htm) {
        return Err(format!("DPoP proof htm does not match {htm}"));
    }
    match s("htu") {
        Some(u) if strip_query(&u) == strip_query(htu) => {}
        _ => {
            return Err(format!(
                "DPoP proof htu does not match {}",
                strip_query(htu)
            ))
        }
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_u64)
        .ok_or("DPoP proof has no iat")?;
    if iat + IAT_WINDOW_SECS < now_unix || iat > now_unix + IAT_WINDOW_SECS {
        return Err("DPoP proof iat is outside the accepted window".into());
    }
    Ok(Verified {
        jkt: jwk_thumbprint(jwk).ok_or("DPoP proof jwk has no thumbprint")?,
        jti,
        iat,
        nonce: s("nonce"),
        ath: s("ath"),
    })
}

fn strip_query(u: &str) -> &str {
    u.split(['?', '#']).next().unwrap_or(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256: &str = include_str!("dev/testdata/dpop-p256.key");
    const ED25519: &str = include_str!("dev/testdata/dpop-ed25519.key");
    const EC384: &str = include_str!("dev/testdata/client-ec384.key");
    const RSA: &str = include_str!("dev/testdata/client-rsa.key");
    const ENCRYPTED: &str = include_str!("dev/testdata/client-encrypted.key");

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn parts(jwt: &str) -> (Value, Value) {
        let mut it = jwt.split('.');
        let mut dec = || -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap()).unwrap()
        };
        (dec(), dec())
    }

    #[test]
    fn proofs_from_each_key_kind_verify_and_carry_the_claims() {
        let (generated, stored) = DpopKey::generate().unwrap();
        let keys = [
            DpopKey::from_pem(P256.as_bytes()).unwrap(),
            DpopKey::from_pem(ED25519.as_bytes()).unwrap(),
            generated,
        ];
        for key in &keys {
            let url = "https://api.example/v1/items?page=2#frag";
            let htu = htu(&url.parse().unwrap());
            assert_eq!(htu, "https://api.example/v1/items");
            let proof = key
                .proof(
                    "GET",
                    &htu,
                    Some(&ath("tok")),
                    Some("n-1"),
                    SystemTime::now(),
                )
                .unwrap();
            let (h, c) = parts(proof.expose());
            assert_eq!(h["typ"], "dpop+jwt");
            assert_eq!(h["alg"], key.alg());
            assert!(h["jwk"].get("d").is_none(), "public key only");
            assert_eq!(c["htm"], "GET");
            assert_eq!(c["nonce"], "n-1");
            let v = verify(proof.expose(), "GET", url, now()).unwrap();
            assert_eq!(v.jkt, key.thumbprint());
            assert_eq!(v.ath.as_deref(), Some(ath("tok").as_str()));
            assert!(!format!("{key:?}").contains("PRIVATE"));
        }
        assert_eq!(keys[1].alg(), "EdDSA");
        // A stored key comes back as the same key.
        let again = DpopKey::from_stored(&stored).unwrap();
        assert_eq!(again.thumbprint(), keys[2].thumbprint());
    }

    #[test]
    fn each_proof_has_its_own_jti() {
        let key = DpopKey::from_pem(P256.as_bytes()).unwrap();
        let a = key.proof("POST", "https://x/t", None, None, SystemTime::now());
        let b = key.proof("POST", "https://x/t", None, None, SystemTime::now());
        assert_ne!(
            parts(a.unwrap().expose()).1["jti"],
            parts(b.unwrap().expose()).1["jti"]
        );
    }

    #[test]
    fn unusable_keys_say_why() {
        assert_eq!(
            DpopKey::from_pem(EC384.as_bytes()).unwrap_err(),
            DpopKeyError::Unsupported
        );
        assert_eq!(
            DpopKey::from_pem(RSA.as_bytes()).unwrap_err(),
            DpopKeyError::Unsupported
        );
        assert_eq!(
            DpopKey::from_pem(ENCRYPTED.as_bytes()).unwrap_err(),
            DpopKeyError::Pem(KeyError::Encrypted)
        );
        assert_eq!(
            DpopKey::from_pem(b"nope").unwrap_err(),
            DpopKeyError::Pem(KeyError::NoKey)
        );
        assert_eq!(
            DpopKey::from_stored(&Secret::new("!!")).unwrap_err(),
            DpopKeyError::Stored
        );
    }

    #[test]
    fn thumbprint_follows_rfc_7638() {
        // RFC 7638 §3.1's example key and thumbprint.
        let jwk = json!({"kty":"RSA","e":"AQAB","alg":"RS256","kid":"2011-04-29","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        assert_eq!(jwk_thumbprint(&json!({"kty":"oct","k":"x"})), None);
    }

    #[test]
    fn verification_refuses_each_defect_with_its_message() {
        let key = DpopKey::from_pem(P256.as_bytes()).unwrap();
        let t = now();
        let good = |htm: &str, htu: &str, iat: u64| {
            key.proof(
                htm,
                htu,
                None,
                None,
                UNIX_EPOCH + std::time::Duration::from_secs(iat),
            )
            .unwrap()
        };
        let u = "https://idp.example/token";
        let e = verify(good("GET", u, t).expose(), "POST", u, t).unwrap_err();
        assert!(e.contains("htm"), "{e}");
        let e = verify(
            good("POST", "https://idp.example/other", t).expose(),
            "POST",
            u,
            t,
        )
        .unwrap_err();
        assert!(e.contains("htu"), "{e}");
        let e = verify(good("POST", u, t - 600).expose(), "POST", u, t).unwrap_err();
        assert!(e.contains("iat"), "{e}");
        // Tampered claims: the signature no longer verifies.
        let p = good("POST", u, t);
        let mut segs: Vec<String> = p.expose().split('.').map(str::to_owned).collect();
        let (_, mut c) = parts(p.expose());
        c["htm"] = json!("POST ");
        segs[1] = URL_SAFE_NO_PAD.encode(c.to_string());
        let e = verify(&segs.join("."), "POST", u, t).unwrap_err();
        assert!(e.contains("signature"), "{e}");
        // A header with the private key in its jwk.
        let mut h = parts(p.expose()).0;
        h["jwk"]["d"] = json!("secret");
        segs[0] = URL_SAFE_NO_PAD.encode(h.to_string());
        let e = verify(&segs.join("."), "POST", u, t).unwrap_err();
        assert!(e.contains("private"), "{e}");
        h["typ"] = json!("JWT");
        segs[0] = URL_SAFE_NO_PAD.encode(h.to_string());
        let e = verify(&segs.join("."), "POST", u, t).unwrap_err();
        assert!(e.contains("typ"), "{e}");
    }

    #[test]
    fn nonces_are_kept_per_origin_and_challenges_recognised() {
        let n = Nonces::default();
        let a: Uri = "https://a.example/token".parse().unwrap();
        let b: Uri = "https://b.example/x".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(&DPOP_NONCE, HeaderValue::from_static("n1"));
        assert!(n.learn(&a, &h));
        assert_eq!(
            n.get(&"https://a.example/other?q".parse().unwrap())
                .as_deref(),
            Some("n1")
        );
        assert_eq!(n.get(&b), None);
        h.insert(&DPOP_NONCE, HeaderValue::from_static("bad\"nonce"));
        assert!(!n.learn(&a, &h));
        h.insert(&DPOP_NONCE, HeaderValue::from_static("n2"));
        assert!(token_endpoint_wants_nonce(
            StatusCode::BAD_REQUEST,
            &h,
            br#"{"error":"use_dpop_nonce"}"#
        ));
        assert!(!token_endpoint_wants_nonce(
            StatusCode::BAD_REQUEST,
            &h,
            br#"{"error":"invalid_grant"}"#
        ));
        assert!(!token_endpoint_wants_nonce(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error":"use_dpop_nonce"}"#
        ));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="use_dpop_nonce", error_description="x""#),
        );
        assert!(upstream_wants_nonce(StatusCode::UNAUTHORIZED, &h));
        assert!(!upstream_wants_nonce(StatusCode::FORBIDDEN, &h));
        h.insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"DPoP error="invalid_token""#),
        );
        assert!(!upstream_wants_nonce(StatusCode::UNAUTHORIZED, &h));
    }
}
