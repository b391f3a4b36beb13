//! TLS whose certificate and trust change while connections keep coming:
//! rustls configurations built once, whose certificate resolver and
//! verifiers read the current [`LiveTls`] at every handshake. An agent
//! renews its certificate, learns of a revoked peer or of a new cluster CA
//! without a restart, and without rebuilding the clients and listeners that
//! hold these configurations.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};

use crate::{fingerprint, provider, roots, ClientAuth, Identity, TlsError};

/// What a party trusts: CA certificates, minus revoked certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustSet {
    /// PEM of every trusted CA (during a CA rotation, the old and the new).
    pub ca_pem: String,
    /// SHA-256 (hex) of certificates refused although a trusted CA issued them.
    pub revoked: HashSet<String>,
}

struct Trust {
    set: TrustSet,
    clients: Arc<dyn ClientCertVerifier>,
    servers: Arc<WebPkiServerVerifier>,
}

impl Trust {
    fn build(set: TrustSet, extra_server_roots: Option<&str>) -> Result<Trust, TlsError> {
        let clients = WebPkiClientVerifier::builder_with_provider(roots(&set.ca_pem)?, provider())
            .allow_unauthenticated()
            .build()?;
        let mut server_roots = set.ca_pem.clone();
        if let Some(extra) = extra_server_roots {
            server_roots.push('\n');
            server_roots.push_str(extra);
        }
        let servers = WebPkiServerVerifier::builder_with_provider(roots(&server_roots)?, provider()).build()?;
        Ok(Trust { set, clients, servers })
    }

    fn check_revoked(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if self.set.revoked.contains(&fingerprint(end_entity.as_ref())) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }
}

/// The certificate a party presents and what it trusts, both replaceable.
pub struct LiveTls {
    identity: RwLock<Arc<CertifiedKey>>,
    /// The certificate's PEM, for renewal decisions and saving.
    identity_pem: RwLock<Identity>,
    trust: RwLock<Arc<Trust>>,
    /// A CA trusted for servers only (a server certificate from elsewhere).
    extra_server_roots: Option<String>,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls").finish_non_exhaustive()
    }
}

fn certified(identity: &Identity) -> Result<Arc<CertifiedKey>, TlsError> {
    let (certs, key) = identity.der()?;
    let key = provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

impl LiveTls {
    pub fn new(
        identity: Identity,
        trust: TrustSet,
        extra_server_roots: Option<String>,
    ) -> Result<Arc<LiveTls>, TlsError> {
        let trust = Trust::build(trust, extra_server_roots.as_deref())?;
        Ok(Arc::new(LiveTls {
            identity: RwLock::new(certified(&identity)?),
            identity_pem: RwLock::new(identity),
            trust: RwLock::new(Arc::new(trust)),
            extra_server_roots,
        }))
    }

    /// Presents `identity` from the next handshake on.
    pub fn set_identity(&self, identity: Identity) -> Result<(), TlsError> {
        let key = certified(&identity)?;
        *self.identity.write() = key;
        *self.identity_pem.write() = identity;
        Ok(())
    }

    pub fn identity(&self) -> Identity {
        self.identity_pem.read().clone()
    }

    /// Trusts `set` from the next handshake on. Unchanged trust is kept as is.
    pub fn set_trust(&self, set: TrustSet) -> Result<bool, TlsError> {
        if self.trust.read().set == set {
            return Ok(false);
        }
        let trust = Trust::build(set, self.extra_server_roots.as_deref())?;
        *self.trust.write() = Arc::new(trust);
        Ok(true)
    }

    pub fn trust(&self) -> TrustSet {
        self.trust.read().set.clone()
    }

    /// Whether the certificate with this SHA-256 has been revoked.
    pub fn is_revoked(&self, sha256: &str) -> bool {
        self.trust.read().set.revoked.contains(sha256)
    }

    /// Whether the presented certificate chains to `ca_pem` alone (without
    /// the cross-signed intermediate): false once the cluster issues from
    /// another CA, which is when an agent should renew.
    pub fn issued_by(&self, ca_pem: &str) -> Result<bool, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider()).build()?;
        let key = self.identity.read().clone();
        let Some(leaf) = key.cert.first() else {
            return Ok(false);
        };
        Ok(verifier.verify_client_cert(leaf, &[], UnixTime::now()).is_ok())
    }

    /// When the presented certificate became valid and when it expires.
    pub fn validity(&self) -> Result<(SystemTime, SystemTime), TlsError> {
        let key = self.identity.read().clone();
        let leaf = key.cert.first().ok_or_else(|| TlsError::Pem {
            what: "certificate".into(),
        })?;
        Ok(crate::der::validity(leaf.as_ref())?)
    }

    /// A TLS 1.3 server configuration presenting the current certificate and
    /// checking client certificates against the current trust.
    pub fn server_config(self: &Arc<Self>, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = Arc::new(LiveClientVerifier {
            live: self.clone(),
            mandatory: auth == ClientAuth::Required,
        });
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Presented(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// A TLS 1.3 client configuration presenting the current certificate and
    /// checking servers against the current trust.
    pub fn client_config(self: &Arc<Self>) -> Result<ClientConfig, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LiveServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(Presented(self.clone())));
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

/// Presents the current certificate, as a server and as a client.
#[derive(Debug)]
struct Presented(Arc<LiveTls>);

impl ResolvesServerCert for Presented {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.identity.read().clone())
    }
}

impl ResolvesClientCert for Presented {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.identity.read().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct LiveClientVerifier {
    live: Arc<LiveTls>,
    mandatory: bool,
}

impl ClientCertVerifier for LiveClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    /// No hints: the trusted CAs change, and our clients present their one
    /// certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let trust = self.live.trust.read().clone();
        let verified = trust.clients.verify_client_cert(end_entity, intermediates, now)?;
        trust.check_revoked(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature(rustls::crypto::verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature(rustls::crypto::verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct LiveServerVerifier(Arc<LiveTls>);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let trust = self.0.trust.read().clone();
        let verified = trust
            .servers
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        trust.check_revoked(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature(rustls::crypto::verify_tls12_signature, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signature(rustls::crypto::verify_tls13_signature, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

type VerifySignature = fn(
    &[u8],
    &CertificateDer<'_>,
    &DigitallySignedStruct,
    &rustls::crypto::WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error>;

/// A handshake signature checked with the provider's algorithms (the same
/// for both verifiers: only the certificates' trust is live).
fn signature(
    verify: VerifySignature,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify(message, cert, dss, &provider().signature_verification_algorithms)
}
