//! Encryption at rest for both stores: AES-256-GCM under the current
//! `store.encryption_key`, and a key id in every sealed value so a read can
//! pick the right key among `store.previous_encryption_keys` while keys
//! rotate. Values sealed before key ids existed (`tpv1:`, XChaCha20-Poly1305)
//! are still read, with each configured key in turn; their next write seals
//! them in the current format.
//!
//! Knows nothing of files, rows or records: strings in, sealed strings out,
//! and back.

use crate::secret::Secret;
use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// `tpv2:<key id>:<base64 of nonce ‖ AES-256-GCM ciphertext>`.
const PREFIX_V2: &str = "tpv2:";
/// `tpv1:<base64 of nonce ‖ XChaCha20-Poly1305 ciphertext>`: read only.
const PREFIX_V1: &str = "tpv1:";
const AES_NONCE_LEN: usize = 12;
const XCHACHA_NONCE_LEN: usize = 24;

/// The configured keys: the current one seals, any of them opens. Cheap to
/// clone.
#[derive(Clone)]
pub struct Keyring(Arc<Keys>);

struct Keys {
    current: Key,
    previous: Vec<Key>,
}

struct Key {
    id: String,
    aes: Aes256Gcm,
    legacy: XChaCha20Poly1305,
}

impl Key {
    fn new(secret: &Secret) -> Key {
        // Any string works as a key: SHA-256 stretches it to 32 bytes (a
        // random 32-byte value, e.g. `openssl rand -base64 32`, is best).
        let derived = Sha256::digest(secret.expose().as_bytes());
        Key {
            id: key_id(&derived),
            aes: Aes256Gcm::new(&derived),
            legacy: XChaCha20Poly1305::new(&derived),
        }
    }
}

/// Names a key without revealing it: a domain-separated hash of the derived
/// key, so it is neither the key nor its plain SHA-256 fingerprint.
fn key_id(derived: &[u8]) -> String {
    let mut input = b"tokenproxy-key-id\0".to_vec();
    input.extend_from_slice(derived);
    crate::secret::fingerprint(&input)
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.0.current.id)
            .field(
                "previous",
                &self.0.previous.iter().map(|k| &k.id).collect::<Vec<_>>(),
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

impl Keyring {
    pub fn new(current: &Secret, previous: &[Secret]) -> Keyring {
        Keyring(Arc::new(Keys {
            current: Key::new(current),
            previous: previous.iter().map(Key::new).collect(),
        }))
    }

    /// The store config's keys; `None` without `encryption_key`.
    pub fn from_config(config: &crate::config::StoreConfig) -> Option<Keyring> {
        let current = config.encryption_key.as_ref()?;
        Some(Keyring::new(current, &config.previous_encryption_keys))
    }

    pub fn current_id(&self) -> &str {
        &self.0.current.id
    }

    /// Seals under the current key with a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> String {
        let key = &self.0.current;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for in-memory data.
        let sealed = key.aes.encrypt(&nonce, plain).unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!(
            "{PREFIX_V2}{}:{}",
            key.id,
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    /// Opens a value sealed under any configured key, or in the old format.
    pub fn unseal(&self, sealed: &str) -> Result<Vec<u8>, UnsealError> {
        if let Some(rest) = sealed.strip_prefix(PREFIX_V2) {
            let (kid, blob) = split_v2(rest)?;
            let keys = &self.0;
            let key = std::iter::once(&keys.current)
                .chain(&keys.previous)
                .find(|k| k.id == kid)
                .ok_or_else(|| UnsealError::UnknownKey {
                    kid: kid.to_owned(),
                    current: keys.current.id.clone(),
                })?;
            let (nonce, ct) = blob.split_at(AES_NONCE_LEN);
            return key.aes.decrypt(Nonce::from_slice(nonce), ct).map_err(|_| {
                UnsealError::Damaged {
                    kid: kid.to_owned(),
                }
            });
        }
        let blob = legacy_blob(sealed)?;
        let (nonce, ct) = blob.split_at(XCHACHA_NONCE_LEN);
        std::iter::once(&self.0.current)
            .chain(&self.0.previous)
            .find_map(|k| k.legacy.decrypt(XNonce::from_slice(nonce), ct).ok())
            .ok_or(UnsealError::NoLegacyKey)
    }

    /// Sealed under the current key: `rekey` has nothing to do for it.
    pub fn is_current(&self, sealed: &str) -> bool {
        sealed_key_id(sealed) == Some(self.current_id())
    }
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

/// Whether `v` is a sealed value (either format) rather than plaintext
/// written before a key was configured.
pub fn is_sealed(v: &str) -> bool {
    v.starts_with(PREFIX_V2) || v.starts_with(PREFIX_V1)
}

/// The key id a value was sealed with (`None`: old format or not sealed).
pub fn sealed_key_id(sealed: &str) -> Option<&str> {
    let rest = sealed.strip_prefix(PREFIX_V2)?;
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
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| UnsealError::Malformed)?;
    if blob.len() < AES_NONCE_LEN {
        return Err(UnsealError::Malformed);
    }
    Ok((kid, blob))
}

fn legacy_blob(sealed: &str) -> Result<Vec<u8>, UnsealError> {
    let b64 = sealed
        .strip_prefix(PREFIX_V1)
        .ok_or(UnsealError::Malformed)?;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| UnsealError::Malformed)?;
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

    #[test]
    fn round_trips_with_a_fresh_nonce_and_the_key_id() {
        let k = ring("key-a", &[]);
        let sealed = k.seal(b"refresh-token-value");
        assert!(sealed.starts_with(&format!("tpv2:{}:", k.current_id())));
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
