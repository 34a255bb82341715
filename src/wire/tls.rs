//! rustls configuration for both ends: the listener's certificate, and the roots trusted for
//! an https upstream.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::wire::error::SetupError;

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, SetupError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| SetupError::Read { path: shown.clone(), source: std::io::Error::other(e.to_string()) })?;
    if certs.is_empty() {
        return Err(SetupError::EmptyPem { what: "certificate", path: shown });
    }
    Ok(certs)
}

/// The listener's TLS: the given chain and key, offering h2 and HTTP/1.1 by ALPN.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, SetupError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| SetupError::Read {
        path: key.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream client's TLS: the system roots, plus `extra_ca` when given.
pub(crate) fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, SetupError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A broken system certificate should not stop the proxy; the rest still work.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in read_certs(path)? {
            roots.add(cert)?;
        }
    }
    Ok(ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
