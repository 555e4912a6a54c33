//! Encryption at rest for both stores: AES-256-GCM under the current
//! `store.encryption_key`, and a key id in every sealed value so a read can
//! pick the right key among `store.previous_encryption_keys` while keys
//! rotate.
//!
//! A key that is 32 random bytes (64 hex digits, or base64) is used as is;
//! any other string is a passphrase and goes through Argon2id, whose
//! parameters and salt are written into each sealed value (`tpv3`), so a
//! store keeps opening if the defaults change. A key id is a hash of the
//! derived key, so for a passphrase it costs an Argon2id run per guess, like
//! the ciphertext itself. Values sealed before (`tpv2`: AES-256-GCM under
//! SHA-256 of the string; `tpv1`: XChaCha20-Poly1305, no key id) are still
//! read; their next write seals them as `tpv3`.
//!
//! Knows nothing of files, rows or records: strings in, sealed strings out,
//! and back.

use crate::secret::Secret;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use parking_lot::Mutex;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// `tpv3:<key id>:<kdf>:<base64 of nonce ‖ AES-256-GCM ciphertext>`, where
/// `<kdf>` is `raw` or `argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>`.
const PREFIX_V3: &str = "tpv3:";
/// `tpv2:<key id>:<base64 of nonce ‖ AES-256-GCM ciphertext>`: read only.
const PREFIX_V2: &str = "tpv2:";
/// `tpv1:<base64 of nonce ‖ XChaCha20-Poly1305 ciphertext>`: read only.
const PREFIX_V1: &str = "tpv1:";
const AES_NONCE_LEN: usize = 12;
const XCHACHA_NONCE_LEN: usize = 24;
const SALT_LEN: usize = 16;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64_NO_PAD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD_NO_PAD;

/// Argon2id cost. OWASP's minimum (19 MiB, 2 passes, 1 lane): tens of
/// milliseconds once per process and key, while every guess at a
/// passphrase costs as much.
const KDF: Kdf = Kdf {
    m: 19 * 1024,
    t: 2,
    p: 1,
};

/// Argon2id parameters as written in a sealed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Kdf {
    /// Memory in KiB.
    m: u32,
    t: u32,
    p: u32,
}

impl Kdf {
    /// Bounds for values read from a store: a damaged or hostile one must
    /// not make a read take gigabytes or minutes.
    fn plausible(&self) -> bool {
        (1..=16).contains(&self.p)
            && (8 * self.p..=256 * 1024).contains(&self.m)
            && (1..=16).contains(&self.t)
    }
}

/// The configured keys: the current one seals, any of them opens. Cheap to
/// clone.
#[derive(Clone)]
pub struct Keyring(Arc<Keys>);

struct Keys {
    current: Key,
    previous: Vec<Key>,
    /// The salt the current passphrase seals with: the first one read from
    /// the store (so a store keeps one salt and one key id per key), else a
    /// fresh random one at the first seal. A sync mutex, never held across
    /// an await.
    salt: Mutex<Option<[u8; SALT_LEN]>>,
}

/// An AES key and its id.
struct Derived {
    id: String,
    aes: Aes256Gcm,
}

impl Derived {
    fn new(key: &[u8; 32]) -> Derived {
        Derived {
            id: key_id(key),
            aes: Aes256Gcm::new(aes_gcm::Key::<Aes256Gcm>::from_slice(key)),
        }
    }
}

/// Derived keys by (parameters, salt).
type DerivedCache = HashMap<(Kdf, Vec<u8>), Arc<Derived>>;

enum Material {
    /// 32 random bytes, used as is.
    Raw(Arc<Derived>),
    /// Derived with Argon2id per (parameters, salt), each once: the lock is
    /// held while deriving so concurrent readers wait instead of deriving
    /// again.
    Passphrase {
        secret: Secret,
        derived: Mutex<DerivedCache>,
    },
}

struct Key {
    material: Material,
    /// What tpv2 and tpv1 values were sealed under: SHA-256 of the string.
    legacy: Derived,
    legacy_x: XChaCha20Poly1305,
}

impl Key {
    fn new(secret: &Secret) -> Key {
        let sha: [u8; 32] = Sha256::digest(secret.expose().as_bytes()).into();
        let material = match random_key(secret.expose()) {
            Some(raw) => Material::Raw(Arc::new(Derived::new(&raw))),
            None => Material::Passphrase {
                secret: secret.clone(),
                derived: Mutex::new(HashMap::new()),
            },
        };
        Key {
            material,
            legacy: Derived::new(&sha),
            legacy_x: XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&sha)),
        }
    }

    /// The AES key for a value sealed with `kdf` (`None`: raw) and `salt`;
    /// `None` when this key is of the other kind.
    fn derived(&self, kdf: Option<(Kdf, &[u8])>) -> Option<Arc<Derived>> {
        match (&self.material, kdf) {
            (Material::Raw(d), None) => Some(d.clone()),
            (Material::Passphrase { secret, derived }, Some((kdf, salt))) => {
                let mut cache = derived.lock();
                if let Some(d) = cache.get(&(kdf, salt.to_vec())) {
                    return Some(d.clone());
                }
                let d = Arc::new(Derived::new(&argon2id(secret, kdf, salt)?));
                cache.insert((kdf, salt.to_vec()), d.clone());
                Some(d)
            }
            _ => None,
        }
    }

    #[cfg(test)]
    fn derivations(&self) -> usize {
        match &self.material {
            Material::Raw(_) => 0,
            Material::Passphrase { derived, .. } => derived.lock().len(),
        }
    }
}

/// 64 hex digits or base64 of exactly 32 bytes: a random key, used as is.
fn random_key(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        return Some(out);
    }
    if !(43..=44).contains(&s.len()) {
        return None;
    }
    // `openssl rand -base64 32`, or its URL-safe spelling; padding optional.
    const LENIENT: base64::engine::GeneralPurposeConfig =
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    [&base64::alphabet::STANDARD, &base64::alphabet::URL_SAFE]
        .into_iter()
        .find_map(|a| {
            let engine = base64::engine::GeneralPurpose::new(a, LENIENT);
            engine.decode(s).ok()?.try_into().ok()
        })
}

fn argon2id(secret: &Secret, kdf: Kdf, salt: &[u8]) -> Option<[u8; 32]> {
    let params = argon2::Params::new(kdf.m, kdf.t, kdf.p, Some(32)).ok()?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(secret.expose().as_bytes(), salt, &mut out)
        .ok()?;
    Some(out)
}

/// Names a key without revealing it: a domain-separated hash of the derived
/// key, so it is neither the key nor its plain SHA-256 fingerprint (and for
/// a passphrase, no cheaper to guess from than the ciphertext).
fn key_id(derived: &[u8]) -> String {
    let mut input = b"tokenproxy-key-id\0".to_vec();
    input.extend_from_slice(derived);
    crate::secret::fingerprint(&input)
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // No derivation here: a passphrase is named by its kind only.
        let name = |k: &Key| match &k.material {
            Material::Raw(d) => d.id.clone(),
            Material::Passphrase { .. } => "passphrase".to_owned(),
        };
        f.debug_struct("Keyring")
            .field("current", &name(&self.0.current))
            .field(
                "previous",
                &self.0.previous.iter().map(name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why a sealed value could not be opened. Names key ids, never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsealError {
    #[error("it is sealed with key id {kid} and no store.encryption_key is configured")]
    NoKey { kid: String },
    #[error("it is sealed with key id {kid}, which is neither store.encryption_key (key id {current}) nor one of store.previous_encryption_keys")]
    UnknownKey { kid: String, current: String },
    #[error(
        "it is sealed with key id {kid} but does not decrypt under that key (damaged or altered)"
    )]
    Damaged { kid: String },
    #[error("it is sealed in the old format (tpv1, no key id) and no configured key opens it")]
    NoLegacyKey,
    #[error("it is not a valid sealed value")]
    Malformed,
}

/// A parsed `tpv3` value.
struct V3<'a> {
    kid: &'a str,
    /// `None`: a raw key.
    kdf: Option<(Kdf, Vec<u8>)>,
    blob: Vec<u8>,
}

impl<'a> V3<'a> {
    fn parse(rest: &'a str) -> Result<V3<'a>, UnsealError> {
        let mut it = rest.splitn(3, ':');
        let (Some(kid), Some(kdf), Some(b64)) = (it.next(), it.next(), it.next()) else {
            return Err(UnsealError::Malformed);
        };
        let kdf = if kdf == "raw" {
            None
        } else {
            Some(parse_kdf(kdf).ok_or(UnsealError::Malformed)?)
        };
        let blob = B64.decode(b64).map_err(|_| UnsealError::Malformed)?;
        if blob.len() < AES_NONCE_LEN {
            return Err(UnsealError::Malformed);
        }
        Ok(V3 { kid, kdf, blob })
    }

    fn kdf(&self) -> Option<(Kdf, &[u8])> {
        self.kdf.as_ref().map(|(k, s)| (*k, s.as_slice()))
    }
}

/// `argon2id$v=19$m=19456,t=2,p=1$<salt>`.
fn parse_kdf(s: &str) -> Option<(Kdf, Vec<u8>)> {
    let mut it = s.split('$');
    if (it.next()?, it.next()?) != ("argon2id", "v=19") {
        return None;
    }
    let mut kdf = Kdf { m: 0, t: 0, p: 0 };
    for kv in it.next()?.split(',') {
        let (k, v) = kv.split_once('=')?;
        let v: u32 = v.parse().ok()?;
        match k {
            "m" => kdf.m = v,
            "t" => kdf.t = v,
            "p" => kdf.p = v,
            _ => return None,
        }
    }
    let salt = B64_NO_PAD.decode(it.next()?).ok()?;
    let ok = kdf.plausible() && (8..=64).contains(&salt.len()) && it.next().is_none();
    ok.then_some((kdf, salt))
}

fn format_kdf(kdf: Kdf, salt: &[u8]) -> String {
    format!(
        "argon2id$v=19$m={},t={},p={}${}",
        kdf.m,
        kdf.t,
        kdf.p,
        B64_NO_PAD.encode(salt)
    )
}

impl Keyring {
    pub fn new(current: &Secret, previous: &[Secret]) -> Keyring {
        Keyring(Arc::new(Keys {
            current: Key::new(current),
            previous: previous.iter().map(Key::new).collect(),
            salt: Mutex::new(None),
        }))
    }

    /// The store config's keys; `None` without `encryption_key`.
    pub fn from_config(config: &crate::config::StoreConfig) -> Option<Keyring> {
        let current = config.encryption_key.as_ref()?;
        Some(Keyring::new(current, &config.previous_encryption_keys))
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.0.current).chain(&self.0.previous)
    }

    /// The salt the current key seals with (see [`Keys::salt`]).
    fn seal_salt(&self) -> [u8; SALT_LEN] {
        *self.0.salt.lock().get_or_insert_with(|| {
            let mut salt = [0u8; SALT_LEN];
            rand::rngs::OsRng.fill_bytes(&mut salt);
            salt
        })
    }

    /// The current key as it seals now: its AES key and the `<kdf>` field.
    fn sealing(&self) -> Option<(Arc<Derived>, String)> {
        let key = &self.0.current;
        match &key.material {
            Material::Raw(_) => Some((key.derived(None)?, "raw".to_owned())),
            Material::Passphrase { .. } => {
                let salt = self.seal_salt();
                Some((key.derived(Some((KDF, &salt)))?, format_kdf(KDF, &salt)))
            }
        }
    }

    /// The id the current key seals under. For a passphrase it depends on
    /// the store's salt, so it is known once the store was read.
    pub fn current_id(&self) -> String {
        self.sealing()
            .map_or_else(|| self.0.current.legacy.id.clone(), |(d, _)| d.id.clone())
    }

    /// Seals under the current key with a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> String {
        // Argon2 with the constant parameters above cannot fail; should it,
        // SHA-256 of the key still seals (as tpv2), never plaintext.
        let Some((key, kdf)) = self.sealing() else {
            return self.seal_v2(plain);
        };
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for in-memory data.
        let sealed = key.aes.encrypt(&nonce, plain).unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{PREFIX_V3}{}:{kdf}:{}", key.id, B64.encode(blob))
    }

    fn seal_v2(&self, plain: &[u8]) -> String {
        let key = &self.0.current.legacy;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = key.aes.encrypt(&nonce, plain).unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{PREFIX_V2}{}:{}", key.id, B64.encode(blob))
    }

    /// Opens a value sealed under any configured key, in any format.
    pub fn unseal(&self, sealed: &str) -> Result<Vec<u8>, UnsealError> {
        if let Some(rest) = sealed.strip_prefix(PREFIX_V3) {
            let v = V3::parse(rest)?;
            let key = self
                .keys()
                .filter_map(|k| k.derived(v.kdf()))
                .find(|d| d.id == v.kid)
                .ok_or_else(|| UnsealError::UnknownKey {
                    kid: v.kid.to_owned(),
                    current: self.current_id_for(&v),
                })?;
            let (nonce, ct) = v.blob.split_at(AES_NONCE_LEN);
            let plain = key.aes.decrypt(Nonce::from_slice(nonce), ct).map_err(|_| {
                UnsealError::Damaged {
                    kid: v.kid.to_owned(),
                }
            })?;
            self.adopt_salt(&v);
            return Ok(plain);
        }
        if let Some(rest) = sealed.strip_prefix(PREFIX_V2) {
            let (kid, blob) = split_v2(rest)?;
            let key = self.keys().find(|k| k.legacy.id == kid).ok_or_else(|| {
                UnsealError::UnknownKey {
                    kid: kid.to_owned(),
                    current: self.0.current.legacy.id.clone(),
                }
            })?;
            let (nonce, ct) = blob.split_at(AES_NONCE_LEN);
            return key
                .legacy
                .aes
                .decrypt(Nonce::from_slice(nonce), ct)
                .map_err(|_| UnsealError::Damaged {
                    kid: kid.to_owned(),
                });
        }
        let blob = legacy_blob(sealed)?;
        let (nonce, ct) = blob.split_at(XCHACHA_NONCE_LEN);
        self.keys()
            .find_map(|k| k.legacy_x.decrypt(XNonce::from_slice(nonce), ct).ok())
            .ok_or(UnsealError::NoLegacyKey)
    }

    /// Seal with the salt the store already holds, unless one is chosen.
    fn adopt_salt(&self, v: &V3<'_>) {
        if let Some(Ok(salt)) = v.kdf().map(|(_, s)| <[u8; SALT_LEN]>::try_from(s)) {
            self.0.salt.lock().get_or_insert(salt);
        }
    }

    /// The current key's id as it would read in `v` (same salt), so an
    /// error compares like with like.
    fn current_id_for(&self, v: &V3<'_>) -> String {
        self.0
            .current
            .derived(v.kdf())
            .map_or_else(|| self.current_id(), |d| d.id.clone())
    }

    /// Sealed under the current key with the current format and cost:
    /// `rekey` has nothing to do for it.
    pub fn is_current(&self, sealed: &str) -> bool {
        let Some(Ok(v)) = sealed.strip_prefix(PREFIX_V3).map(V3::parse) else {
            return false;
        };
        let cost_ok = v.kdf.as_ref().is_none_or(|(k, _)| *k == KDF);
        let current = cost_ok
            && self
                .0
                .current
                .derived(v.kdf())
                .is_some_and(|d| d.id == v.kid);
        if current {
            self.adopt_salt(&v);
        }
        current
    }

    #[cfg(test)]
    fn derivations(&self) -> usize {
        self.keys().map(Key::derivations).sum()
    }
}

/// The id `key` has in `sealed` (a `tpv3` value or text holding one), for
/// tests and tools that must name a passphrase's id in a given store.
pub fn key_id_in(key: &Secret, sealed: &str) -> Option<String> {
    let start = sealed.find(PREFIX_V3)?;
    let value = &sealed[start..];
    let end = value
        .find(|c: char| c == '"' || c.is_whitespace())
        .unwrap_or(value.len());
    let v = V3::parse(value[..end].strip_prefix(PREFIX_V3)?).ok()?;
    Key::new(key).derived(v.kdf()).map(|d| d.id.clone())
}

/// Opens `sealed` with `keys`, or says why not (also when there are none).
pub fn unseal_with(keys: Option<&Keyring>, sealed: &str) -> Result<Vec<u8>, UnsealError> {
    match keys {
        Some(k) => k.unseal(sealed),
        None => Err(match sealed_key_id(sealed) {
            Some(kid) => UnsealError::NoKey {
                kid: kid.to_owned(),
            },
            None => UnsealError::NoLegacyKey,
        }),
    }
}

/// Whether `v` is a sealed value (any format) rather than plaintext
/// written before a key was configured.
pub fn is_sealed(v: &str) -> bool {
    v.starts_with(PREFIX_V3) || v.starts_with(PREFIX_V2) || v.starts_with(PREFIX_V1)
}

/// The key id a value was sealed with (`None`: tpv1 or not sealed).
pub fn sealed_key_id(sealed: &str) -> Option<&str> {
    let rest = sealed
        .strip_prefix(PREFIX_V3)
        .or_else(|| sealed.strip_prefix(PREFIX_V2))?;
    rest.split_once(':').map(|(kid, _)| kid)
}

/// Before key ids, the file store kept its sealed blob without a prefix.
pub fn legacy_file_blob(sealed: &str) -> String {
    if is_sealed(sealed) {
        sealed.to_owned()
    } else {
        format!("{PREFIX_V1}{sealed}")
    }
}

fn split_v2(rest: &str) -> Result<(&str, Vec<u8>), UnsealError> {
    let (kid, b64) = rest.split_once(':').ok_or(UnsealError::Malformed)?;
    let blob = B64.decode(b64).map_err(|_| UnsealError::Malformed)?;
    if blob.len() < AES_NONCE_LEN {
        return Err(UnsealError::Malformed);
    }
    Ok((kid, blob))
}

fn legacy_blob(sealed: &str) -> Result<Vec<u8>, UnsealError> {
    let b64 = sealed
        .strip_prefix(PREFIX_V1)
        .ok_or(UnsealError::Malformed)?;
    let blob = B64.decode(b64).map_err(|_| UnsealError::Malformed)?;
    if blob.len() < XCHACHA_NONCE_LEN {
        return Err(UnsealError::Malformed);
    }
    Ok(blob)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A value sealed the way tokenproxy did before key ids (tpv1).
    pub(crate) fn seal_v1(key: &str, plain: &[u8]) -> String {
        let derived = Sha256::digest(key.as_bytes());
        let cipher = XChaCha20Poly1305::new(&derived);
        let nonce = [7u8; XCHACHA_NONCE_LEN];
        let mut blob = nonce.to_vec();
        blob.extend(cipher.encrypt(XNonce::from_slice(&nonce), plain).unwrap());
        format!(
            "{PREFIX_V1}{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    fn ring(current: &str, previous: &[&str]) -> Keyring {
        let prev: Vec<Secret> = previous.iter().map(|p| Secret::new(*p)).collect();
        Keyring::new(&Secret::new(current), &prev)
    }

    /// A value sealed the way tokenproxy did before the KDF (tpv2: AES-256-GCM
    /// under SHA-256 of the configured string).
    pub(crate) fn seal_v2(key: &str, plain: &[u8]) -> String {
        let derived = Sha256::digest(key.as_bytes());
        let mut input = b"tokenproxy-key-id\0".to_vec();
        input.extend_from_slice(&derived);
        let kid = crate::secret::fingerprint(&input);
        let nonce = [9u8; AES_NONCE_LEN];
        let mut blob = nonce.to_vec();
        blob.extend(
            Aes256Gcm::new(&derived)
                .encrypt(Nonce::from_slice(&nonce), plain)
                .unwrap(),
        );
        format!(
            "tpv2:{kid}:{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    const PASSPHRASE: &str = "correct horse battery staple";

    #[test]
    fn a_passphrase_goes_through_argon2id_recorded_in_the_value() {
        let sealed = ring(PASSPHRASE, &[]).seal(b"refresh-token-value");
        let kid = sealed_key_id(&sealed).unwrap().to_owned();
        assert!(
            sealed.starts_with(&format!("tpv3:{kid}:argon2id$v=19$m=19456,t=2,p=1$")),
            "{sealed}"
        );
        assert!(!sealed.contains(PASSPHRASE) && !sealed.contains("refresh-token-value"));
        // Another process with the same passphrase opens it; a wrong one does not.
        assert_eq!(
            ring(PASSPHRASE, &[]).unseal(&sealed).unwrap(),
            b"refresh-token-value"
        );
        let err = ring("correct horse battery stapler", &[])
            .unseal(&sealed)
            .unwrap_err();
        assert!(
            matches!(&err, UnsealError::UnknownKey { kid: k, .. } if *k == kid),
            "{err}"
        );
        assert!(!err.to_string().contains(PASSPHRASE));
    }

    #[test]
    fn the_key_id_of_a_passphrase_is_no_fast_hash_of_it() {
        let k = ring(PASSPHRASE, &[]);
        let sealed = k.seal(b"x");
        let kid = sealed_key_id(&sealed).unwrap();
        let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let sha = hex(&Sha256::digest(PASSPHRASE.as_bytes()));
        assert!(!sha.starts_with(kid), "not sha256(passphrase)[..n]");
        assert_ne!(kid, Secret::new(PASSPHRASE).fingerprint());
        let v2 = seal_v2(PASSPHRASE, b"x");
        assert_ne!(Some(kid), sealed_key_id(&v2), "not the old fast key id");
        // The same passphrase under another store's salt has another id.
        let other = ring(PASSPHRASE, &[]).seal(b"x");
        assert_ne!(Some(kid), sealed_key_id(&other));
    }

    #[test]
    fn a_random_32_byte_key_is_used_as_is() {
        let raw: Vec<u8> = (0u8..32)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        assert_eq!((hex.len(), b64.len()), (64, 44));
        for key in [hex.as_str(), b64.as_str(), &hex.to_uppercase()] {
            let sealed = ring(key, &[]).seal(b"as is");
            let kid = sealed_key_id(&sealed).unwrap();
            let b = sealed
                .strip_prefix(&format!("tpv3:{kid}:raw:"))
                .unwrap_or_else(|| panic!("{sealed}"));
            let blob = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
            let (nonce, ct) = blob.split_at(AES_NONCE_LEN);
            let aes = Aes256Gcm::new_from_slice(&raw).unwrap();
            assert_eq!(aes.decrypt(Nonce::from_slice(nonce), ct).unwrap(), b"as is");
            assert_eq!(ring(&hex, &[]).unseal(&sealed).unwrap(), b"as is");
        }
    }

    #[test]
    fn the_tpv2_format_still_opens_and_is_resealed() {
        let v2 = seal_v2("key-a", b"older");
        assert_eq!(ring("key-a", &[]).unseal(&v2).unwrap(), b"older");
        assert_eq!(ring("key-b", &["key-a"]).unseal(&v2).unwrap(), b"older");
        assert!(!ring("key-a", &[]).is_current(&v2), "rekey reseals it");
        assert!(matches!(
            ring("key-b", &[]).unseal(&v2),
            Err(UnsealError::UnknownKey { .. })
        ));
        let random = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let v2 = seal_v2(random, b"older");
        assert_eq!(ring(random, &[]).unseal(&v2).unwrap(), b"older");
    }

    #[test]
    fn a_passphrase_is_derived_once_per_store_salt_not_per_value() {
        let writer = ring(PASSPHRASE, &[]);
        let values: Vec<String> = (0..20).map(|i| writer.seal(&[i])).collect();
        assert_eq!(writer.derivations(), 1);
        let reader = ring(PASSPHRASE, &["an older passphrase"]);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(reader.unseal(v).unwrap(), [i as u8]);
        }
        // It seals with the salt it read: one derivation, one key id.
        let again = reader.seal(b"next write");
        assert_eq!(reader.derivations(), 1);
        assert_eq!(sealed_key_id(&again), sealed_key_id(&values[0]));
        assert!(reader.is_current(&values[0]) && reader.is_current(&again));
        assert_eq!(
            key_id_in(
                &Secret::new(PASSPHRASE),
                &format!("{{\"sealed\":\"{again}\"}}")
            ),
            Some(reader.current_id())
        );
    }

    #[test]
    fn implausible_kdf_parameters_are_refused_before_deriving() {
        let sealed = ring(PASSPHRASE, &[]).seal(b"x");
        for (from, to) in [("m=19456", "m=4194304"), ("t=2", "t=1000"), ("p=1", "p=0")] {
            let bad = sealed.replace(from, to);
            assert_eq!(
                ring(PASSPHRASE, &[]).unseal(&bad),
                Err(UnsealError::Malformed)
            );
        }
    }

    #[test]
    fn round_trips_with_a_fresh_nonce_and_the_key_id() {
        let k = ring("key-a", &[]);
        let sealed = k.seal(b"refresh-token-value");
        assert!(sealed.starts_with(&format!("tpv3:{}:", k.current_id())));
        assert!(!sealed.contains("refresh-token-value"));
        assert_ne!(sealed, k.seal(b"refresh-token-value"), "fresh nonce");
        assert_eq!(k.unseal(&sealed).unwrap(), b"refresh-token-value");
        assert!(k.is_current(&sealed) && is_sealed(&sealed));
    }

    #[test]
    fn the_key_id_reveals_nothing_of_the_key() {
        let secret = "0123456789abcdef-secret-key";
        let k = ring(secret, &[]);
        let derived = Sha256::digest(secret.as_bytes());
        let derived_hex: String = derived.iter().map(|b| format!("{b:02x}")).collect();
        let sealed = k.seal(b"x");
        let kid = sealed_key_id(&sealed).unwrap();
        assert_eq!(kid.len(), 8);
        assert!(!sealed.contains(secret));
        assert!(!derived_hex.starts_with(kid), "not the derived key");
        assert_ne!(kid, Secret::new(secret).fingerprint(), "not SHA-256(key)");
        assert_ne!(kid, ring("another key", &[]).current_id());
    }

    #[test]
    fn a_wrong_or_missing_key_fails_naming_the_key_id_only() {
        let sealed = ring("key-a", &[]).seal(b"secret");
        let kid = sealed_key_id(&sealed).unwrap().to_owned();
        let err = ring("key-b", &[]).unseal(&sealed).unwrap_err();
        assert!(matches!(&err, UnsealError::UnknownKey { kid: k, .. } if *k == kid));
        let text = err.to_string();
        assert!(text.contains(&kid) && !text.contains("key-a") && !text.contains("key-b"));
        assert_eq!(
            unseal_with(None, &sealed),
            Err(UnsealError::NoKey { kid: kid.clone() })
        );
        let mut tampered = sealed.clone();
        tampered.replace_range(sealed.len() - 4.., "AAAA");
        assert!(matches!(
            ring("key-a", &[]).unseal(&tampered),
            Err(UnsealError::Damaged { .. } | UnsealError::Malformed)
        ));
        assert_eq!(
            ring("key-a", &[]).unseal("tpv2:nokid"),
            Err(UnsealError::Malformed)
        );
    }

    #[test]
    fn previous_keys_open_and_the_current_one_seals() {
        let old = ring("key-a", &[]).seal(b"old");
        let rotated = ring("key-b", &["key-a"]);
        assert_eq!(rotated.unseal(&old).unwrap(), b"old");
        assert!(!rotated.is_current(&old));
        let new = rotated.seal(b"new");
        assert!(rotated.is_current(&new));
        assert_eq!(ring("key-b", &[]).unseal(&new).unwrap(), b"new");
        assert!(ring("key-a", &[]).unseal(&new).is_err());
    }

    #[test]
    fn the_old_xchacha_format_is_still_read_with_any_configured_key() {
        let v1 = seal_v1("key-a", b"legacy");
        assert!(is_sealed(&v1) && sealed_key_id(&v1).is_none());
        assert_eq!(ring("key-a", &[]).unseal(&v1).unwrap(), b"legacy");
        assert_eq!(ring("key-b", &["key-a"]).unseal(&v1).unwrap(), b"legacy");
        assert_eq!(
            ring("key-b", &[]).unseal(&v1),
            Err(UnsealError::NoLegacyKey)
        );
        let file_blob = v1.strip_prefix("tpv1:").unwrap();
        assert_eq!(
            ring("key-a", &[])
                .unseal(&legacy_file_blob(file_blob))
                .unwrap(),
            b"legacy"
        );
    }
}
