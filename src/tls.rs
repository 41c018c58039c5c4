//! Listener certificates: loaded and checked once at config load, swapped in place on reload.
//!
//! Pingora builds a listener's rustls config once, when the service starts. Giving it a
//! resolver instead of file paths lets a reload put a new certificate in front of the next
//! handshake while connections already open keep theirs, so nothing is dropped.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_rustls::sign::CertifiedKey;
use pingora_rustls::{ClientHello, CryptoProvider, ResolvesServerCert};

/// Reads a PEM certificate chain and its private key, and checks that they belong together
/// and that the key type is one rustls can sign with.
pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    pingora_rustls::install_default_crypto_provider();
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider is installed".to_string())?;
    let loaded =
        pingora_rustls::load_certs_and_key_files(&cert.to_string_lossy(), &key.to_string_lossy())
            .map_err(|e| format!("cannot read the certificate or key: {e}"))?;
    let Some((chain, key)) = loaded else {
        return Err("no certificate, or no PKCS#1/PKCS#8/SEC1 private key, found".to_string());
    };
    let chain = chain.into_iter().map(|c| c.into_owned()).collect();
    CertifiedKey::from_der(chain, key.clone_key(), provider)
        .map(Arc::new)
        .map_err(|e| format!("the key does not fit the certificate: {e}"))
}

/// The certificate a TLS listener presents, replaceable while it serves.
pub struct ListenerCert {
    current: ArcSwap<CertifiedKey>,
}

impl ListenerCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ListenerCert> {
        Arc::new(ListenerCert {
            current: ArcSwap::new(key),
        })
    }

    /// Presents `key` from the next handshake on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ListenerCert")
    }
}

impl ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}
