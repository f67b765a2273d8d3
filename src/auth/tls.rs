//! HTTPS serving: the rustls server configuration (ring provider, TLS 1.2 and 1.3, ALPN `h2` and
//! `http/1.1`) from a PEM certificate chain and a PEM private key (`--tls-cert`, `--tls-key`).
//! Passkeys need a secure context, so a phone reaching the server over the local network needs
//! HTTPS with a certificate it trusts for a domain name (see docs/passkeys.md).
//!
//! Owns only loading the certificate and key into an acceptor; the handshake runs in the
//! connection front (`conns`), which must stay the only place that accepts sockets.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A TLS acceptor for the connection front.
pub type Acceptor = tokio_rustls::TlsAcceptor;

/// Load `cert` (a PEM chain, leaf first) and `key` (PEM: PKCS#8, PKCS#1 or SEC1) into an
/// acceptor. Errors name the file and what is wrong with it.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<Acceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("the TLS certificate {} is not valid PEM", cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the TLS certificate {} holds no CERTIFICATE block",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| {
        format!(
            "reading the TLS private key {} (a PEM PRIVATE KEY block)",
            key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and private key do not fit together")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Load the acceptor when both files are set; an error when only one is.
pub fn from_settings(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<Option<Acceptor>> {
    match (cert, key) {
        (Some(c), Some(k)) => acceptor(c, k).map(Some),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--tls-cert and --tls-key go together: set both to serve HTTPS, or neither"),
    }
}
