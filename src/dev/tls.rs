//! A fixed test PKI for TLS upstreams: a CA and a leaf for `127.0.0.1` and
//! `localhost` (valid until 2125), generated once with openssl. The key is
//! public on purpose: it protects nothing but loopback tests.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// The CA that signed [`test_server_config`]'s certificate: trust this in
/// clients (e.g. the proxy's upstream `ca_file`).
pub const TEST_CA_PEM: &str = include_str!("testdata/test-ca.pem");
const LEAF_PEM: &str = include_str!("testdata/test-leaf.pem");
const LEAF_KEY_PEM: &str = include_str!("testdata/test-leaf.key");

/// A server config for `127.0.0.1`/`localhost` with ALPN `h2, http/1.1`.
pub fn test_server_config() -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(LEAF_PEM.as_bytes())
        .collect::<Result<_, _>>()
        .expect("embedded test certificate parses");
    let key =
        PrivateKeyDer::from_pem_slice(LEAF_KEY_PEM.as_bytes()).expect("embedded test key parses");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("embedded test certificate and key match");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A root store holding only [`TEST_CA_PEM`].
pub fn test_root_store() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(TEST_CA_PEM.as_bytes()) {
        roots
            .add(cert.expect("embedded test CA parses"))
            .expect("embedded test CA is valid");
    }
    roots
}
