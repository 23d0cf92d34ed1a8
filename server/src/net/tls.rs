//! The node's TLS identity: a self-signed certificate made from the node key, so that the
//! certificate's key is the node id that clients and peers pin.

use std::sync::Arc;

use ed25519_dalek::pkcs8::EncodePrivateKey;
use kappakv_protocol::Keypair;
use kappakv_protocol::tls::{NodeClientVerifier, SERVER_NAME, provider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The TLS identity could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    /// The key could not be encoded or used for a certificate.
    #[error("cannot make the node certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and key derived from the node key.
pub struct TlsIdentity {
    /// The self-signed certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// The node's ed25519 key in PKCS#8.
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    /// Makes the self-signed certificate for `keypair`.
    pub fn new(keypair: &Keypair) -> Result<Self, TlsSetupError> {
        let der = keypair
            .signing_key()
            .to_pkcs8_der()
            .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
        let rc_key = rcgen::KeyPair::try_from(&key)
            .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .and_then(|params| params.self_signed(&rc_key))
            .map_err(|e| TlsSetupError::Certificate(e.to_string()))?;
        Ok(Self {
            chain: vec![cert.der().clone()],
            key,
        })
    }

    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The server side: TLS 1.3, client and peer ALPNs, optional client certificates (peers
    /// present one, plain clients do not).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsSetupError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(NodeClientVerifier))
            .with_single_cert(self.chain.clone(), self.key_der())?;
        config.alpn_protocols = vec![
            kappakv_protocol::ALPN_CLIENT.to_vec(),
            kappakv_protocol::ALPN_PEER.to_vec(),
        ];
        Ok(config)
    }

    /// The client side for dialling a peer: pins `peer` and presents this node's certificate.
    pub fn peer_client_config(
        &self,
        peer: kappakv_protocol::NodeId,
    ) -> Result<rustls::ClientConfig, TlsSetupError> {
        Ok(kappakv_protocol::tls::client_config(
            peer,
            kappakv_protocol::ALPN_PEER,
            Some((self.chain.clone(), self.key_der())),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_node_id() {
        let kp = Keypair::from_secret([5; 32]);
        let id = TlsIdentity::new(&kp).unwrap();
        let carried = kappakv_protocol::tls::node_id_of_cert(&id.chain[0]).unwrap();
        assert_eq!(carried, kp.node_id());
        id.server_config().unwrap();
    }
}
