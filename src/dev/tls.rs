//! A fixed test PKI for TLS upstreams: a CA and a leaf for `127.0.0.1` and
//! `localhost` (valid until 2125), generated once with openssl. The key is
//! public on purpose: it protects nothing but loopback tests.
//!
//! Also the client side of the tests of client authentication (also made
//! with openssl, valid for a century): a client CA and a certificate it
//! signed for `client.tokenproxy.test` (`tls_client_auth`), and RSA and
//! P-256 assertion keys (`private_key_jwt`), the RSA one with a self-signed
//! certificate (`x5t`, `self_signed_tls_client_auth`). Paths are in
//! [`testdata`].

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

/// A server config like [`test_server_config`] that asks for a client
/// certificate and accepts any (or none): the dev IdP judges it per client
/// (RFC 8705 §2.1 chains and names, §2.2 self-signed certificates).
pub fn test_server_config_mtls() -> Arc<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(LEAF_PEM.as_bytes())
        .collect::<Result<_, _>>()
        .expect("embedded test certificate parses");
    let key =
        PrivateKeyDer::from_pem_slice(LEAF_KEY_PEM.as_bytes()).expect("embedded test key parses");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_client_cert_verifier(Arc::new(AnyClientCert(provider)))
        .with_single_cert(certs, key)
        .expect("embedded test certificate and key match");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Proves the client holds the certificate's key (the handshake signature)
/// and leaves trust to the application.
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Client-authentication test files (see the module docs).
pub mod testdata {
    /// The CA that signed [`MTLS_CLIENT_CERT`].
    pub const MTLS_CA: &str = include_str!("testdata/mtls-ca.pem");
    /// For `client.tokenproxy.test`, extendedKeyUsage clientAuth.
    pub const MTLS_CLIENT_CERT: &str = include_str!("testdata/mtls-client.pem");
    pub const MTLS_CLIENT_KEY: &str = include_str!("testdata/mtls-client.key");
    /// RSA 2048, PKCS#8.
    pub const RSA_KEY: &str = include_str!("testdata/client-rsa.key");
    pub const RSA_PUBLIC: &str = include_str!("testdata/client-rsa.pub");
    /// Self-signed, for [`RSA_KEY`] (`self.client.tokenproxy.test`).
    pub const RSA_CERT: &str = include_str!("testdata/client-rsa.pem");
    /// P-256, PKCS#8.
    pub const EC_KEY: &str = include_str!("testdata/client-ec.key");
    pub const EC_PUBLIC: &str = include_str!("testdata/client-ec.pub");
    /// P-384: a key private_key_jwt cannot use.
    pub const EC384_KEY: &str = include_str!("testdata/client-ec384.key");
    /// [`EC_KEY`] encrypted (passphrase `test`): cannot be used.
    pub const ENCRYPTED_KEY: &str = include_str!("testdata/client-encrypted.key");
}
