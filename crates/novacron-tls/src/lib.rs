//! TLS for NovaCron: the cluster CA that issues server and agent
//! certificates, rustls configurations (TLS 1.3 only) that follow renewals,
//! revocations and CA rotations while they run, HTTP(S) serving with limits
//! against slow and greedy clients (reporting the peer's certificate), and
//! HTTP clients that present one.

pub use rustls;
pub use tokio_rustls;

pub mod der;
mod live;
mod serve;
pub use live::{LiveTls, TrustSet};
pub use serve::{serve, ServeLimits};

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read or write {path}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("Invalid PEM in {what}")]
    Pem { what: String },
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
    #[error("Client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("HTTP client")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Der(#[from] der::DerError),
    #[error("{0}")]
    Rotation(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("key_pem", &"<redacted>").finish()
    }
}

impl Identity {
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        Ok(Identity {
            cert_pem: std::fs::read_to_string(cert).map_err(io_err(cert))?,
            key_pem: std::fs::read_to_string(key).map_err(io_err(key))?,
        })
    }

    /// Writes the certificate and the key (mode 0600).
    pub fn save(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        std::fs::write(cert, &self.cert_pem).map_err(io_err(cert))?;
        write_private(key, &self.key_pem)
    }

    /// SHA-256 of the (first) certificate's DER, hex: how the server recognises an agent.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&first_cert(&self.cert_pem, "certificate")?))
    }

    /// When the (first) certificate becomes valid and when it expires.
    pub fn validity(&self) -> Result<(std::time::SystemTime, std::time::SystemTime), TlsError> {
        Ok(der::validity(first_cert(&self.cert_pem, "certificate")?.as_ref())?)
    }

    fn der(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = certs(&self.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|_| TlsError::Pem {
            what: "private key".into(),
        })?;
        Ok((certs, key))
    }
}

/// Writes a file only its owner can read (keys, tokens), atomically.
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::Pem { what: what.into() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what: what.into() });
    }
    Ok(certs)
}

fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    certs(pem, what)?
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::Pem { what: what.into() })
}

pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(ca_pem, "CA certificate")? {
        store.add(c)?;
    }
    Ok(Arc::new(store))
}

/// The cluster's certificate authority, created at the server's first start.
///
/// A rotation makes a new CA the issuer while the previous one stays
/// trusted: certificates from the new CA carry the new CA's certificate
/// signed by the previous one, so that parties which trust only the
/// previous CA still accept them. Finishing the rotation drops the previous
/// CA.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The issuing CA's certificate.
    pub cert_pem: String,
    /// The issuing CA signed by the previous CA, during a rotation.
    cross_pem: Option<String>,
    /// The previous CA, trusted until the rotation is finished.
    previous_pem: Option<String>,
    dir: PathBuf,
}

const CA_NAME: &str = "NovaCron cluster CA";

/// Allowed clock skew between the server and the parties checking what it
/// issues: a certificate is valid from this long before it was issued, or a
/// tenth of its lifetime if that is less (so that two thirds into its
/// validity, when agents renew, is still well after it was issued).
const NOT_BEFORE_SKEW: Duration = Duration::from_secs(300);

fn ca_params(common_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

struct CaFiles {
    cert: PathBuf,
    key: PathBuf,
    cross: PathBuf,
    previous: PathBuf,
}

impl CaFiles {
    fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            cert: dir.join("ca.crt"),
            key: dir.join("ca.key"),
            cross: dir.join("ca-cross.crt"),
            previous: dir.join("ca-previous.crt"),
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, TlsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes a public file atomically.
pub fn write_public(path: &Path, text: &str) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

impl ClusterCa {
    /// Loads the CA from `dir`, creating it the first time.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, TlsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let files = CaFiles::in_dir(dir);
        if files.key.exists() && files.cert.exists() {
            let key_pem = std::fs::read_to_string(&files.key).map_err(io_err(&files.key))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let cert_pem = std::fs::read_to_string(&files.cert).map_err(io_err(&files.cert))?;
            let name = der::subject_common_name(first_cert(&cert_pem, "CA certificate")?.as_ref())?;
            // The same name and key as the stored certificate, so what this
            // signs verifies against it.
            let cert = ca_params(&name)?.self_signed(&key)?;
            return Ok(ClusterCa {
                cert,
                key,
                cert_pem,
                cross_pem: read_optional(&files.cross)?,
                previous_pem: read_optional(&files.previous)?,
                dir: dir.to_path_buf(),
            });
        }
        let key = KeyPair::generate()?;
        let cert = ca_params(CA_NAME)?.self_signed(&key)?;
        let cert_pem = cert.pem();
        write_private(&files.key, &key.serialize_pem())?;
        write_public(&files.cert, &cert_pem)?;
        tracing::info!(dir = %dir.display(), "created the cluster CA");
        Ok(ClusterCa {
            cert,
            key,
            cert_pem,
            cross_pem: None,
            previous_pem: None,
            dir: dir.to_path_buf(),
        })
    }

    /// Every CA certificate to trust: the issuing CA, and the previous one
    /// during a rotation.
    pub fn trusted_pem(&self) -> String {
        match &self.previous_pem {
            Some(previous) => format!("{}\n{}", self.cert_pem.trim_end(), previous),
            None => self.cert_pem.clone(),
        }
    }

    /// Whether a rotation is under way (two CAs trusted).
    pub fn rotating(&self) -> bool {
        self.previous_pem.is_some()
    }

    /// The issuing CA's common name.
    pub fn name(&self) -> Result<String, TlsError> {
        Ok(der::subject_common_name(
            first_cert(&self.cert_pem, "CA certificate")?.as_ref(),
        )?)
    }

    /// A certificate for `common_name`, valid for TLS server and client use
    /// at `sans` (IP addresses or DNS names), for `lifetime` (unlimited when
    /// `None`). Its PEM carries the cross-signed CA during a rotation.
    pub fn issue(&self, common_name: &str, sans: &[String], lifetime: Option<Duration>) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if let Some(lifetime) = lifetime {
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - NOT_BEFORE_SKEW.min(lifetime / 10);
            params.not_after = now + lifetime;
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let mut cert_pem = cert.pem();
        if let Some(cross) = &self.cross_pem {
            cert_pem.push_str(cross);
        }
        Ok(Identity {
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Makes a new CA the issuer; the current one stays trusted until
    /// [`ClusterCa::finish_rotation`].
    pub fn rotate(&mut self) -> Result<(), TlsError> {
        if self.rotating() {
            return Err(TlsError::Rotation(
                "a CA rotation is under way: finish it before starting another".into(),
            ));
        }
        let generation = self
            .name()?
            .strip_prefix(CA_NAME)
            .and_then(|rest| rest.trim().parse::<u32>().ok())
            .unwrap_or(1);
        let name = format!("{CA_NAME} {}", generation + 1);
        let key = KeyPair::generate()?;
        let cert = ca_params(&name)?.self_signed(&key)?;
        let cross = ca_params(&name)?.signed_by(&key, &self.cert, &self.key)?;
        let files = CaFiles::in_dir(&self.dir);
        // The previous CA and the cross certificate first: a crash before
        // the new key lands leaves the old CA issuing, with a spare trust.
        write_public(&files.previous, &self.cert_pem)?;
        write_public(&files.cross, &cross.pem())?;
        write_private(&files.key, &key.serialize_pem())?;
        write_public(&files.cert, &cert.pem())?;
        tracing::info!(ca = %name, "the cluster CA rotated; the previous CA stays trusted");
        self.previous_pem = Some(std::mem::take(&mut self.cert_pem));
        self.cert_pem = cert.pem();
        self.cross_pem = Some(cross.pem());
        self.cert = cert;
        self.key = key;
        Ok(())
    }

    /// Stops trusting the previous CA.
    pub fn finish_rotation(&mut self) -> Result<(), TlsError> {
        if !self.rotating() {
            return Err(TlsError::Rotation("no CA rotation is under way".into()));
        }
        let files = CaFiles::in_dir(&self.dir);
        for path in [&files.previous, &files.cross] {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path)(e)),
            }
        }
        tracing::info!("the CA rotation is finished; the previous CA is no longer trusted");
        self.previous_pem = None;
        self.cross_pem = None;
        Ok(())
    }
}

/// Whether a listener asks connecting clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Clients may present a certificate from the CA (agents) or none (API users with tokens).
    Optional,
    /// Only clients with a certificate from the CA get in.
    Required,
}

/// TLS 1.3 server configuration; client certificates are checked against `ca_pem`.
pub fn server_config(identity: &Identity, ca_pem: &str, auth: ClientAuth) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider());
    let verifier = match auth {
        ClientAuth::Optional => builder.allow_unauthenticated().build()?,
        ClientAuth::Required => builder.build()?,
    };
    let (certs, key) = identity.der()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS 1.3 client configuration trusting only `ca_pem`, presenting `identity` if given.
pub fn client_config(ca_pem: &str, identity: Option<&Identity>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match identity {
        Some(id) => {
            let (certs, key) = id.der()?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A reqwest builder that trusts `ca_pem` (if given; else the system roots)
/// and presents `identity`.
pub fn http_client(
    builder: reqwest::ClientBuilder,
    ca_pem: Option<&str>,
    identity: Option<&Identity>,
) -> Result<reqwest::Client, TlsError> {
    let builder = match ca_pem {
        Some(ca) => builder.use_preconfigured_tls(client_config(ca, identity)?),
        None => builder.use_rustls_tls(),
    };
    Ok(builder.build()?)
}

/// Where a connection comes from, and the SHA-256 of the client certificate
/// it presented (TLS only).
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    pub cert_sha256: Option<String>,
    /// The client certificate's subject CN (e.g. `novacron-server`, `node:NAME`).
    pub cert_common_name: Option<String>,
}

/// A byte stream: plain TCP or TLS.
pub trait AsyncIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncIo for T {}

/// TLS 1.3 client configuration trusting the system's roots (for servers
/// with publicly issued certificates).
pub fn system_client_config() -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // Unusable system certificates are skipped, as browsers do.
        let _ = store.add(cert);
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A URL's host as sockets, name lookups and certificates want it: an IPv6
/// address without the brackets URLs put around it (`https://[::1]:8421` ->
/// `::1`). `None` for a URL without a host.
pub fn bare_host(url: &url::Url) -> Option<String> {
    match url.host()? {
        url::Host::Ipv6(addr) => Some(addr.to_string()),
        host => Some(host.to_string()),
    }
}

/// Opens a connection to an `http(s)://` URL's host (for WebSocket upgrades
/// done by hand): TLS with `tls` (or the system roots) for https.
pub async fn connect_url(url: &reqwest::Url, tls: Option<Arc<ClientConfig>>) -> io::Result<Box<dyn AsyncIo>> {
    let host = bare_host(url).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL has no host"))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    if !matches!(url.scheme(), "https" | "wss") {
        return Ok(Box::new(tcp));
    }
    let config = match tls {
        Some(c) => c,
        None => Arc::new(system_client_config().map_err(io::Error::other)?),
    };
    let name =
        rustls::pki_types::ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(Box::new(
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?,
    ))
}

/// The paths of an agent's credentials in its data directory.
pub struct AgentFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA.
    pub ca: PathBuf,
    /// The CA of a server certificate not issued by the cluster CA, if any.
    pub server_ca: PathBuf,
}

impl AgentFiles {
    pub fn in_dir(data_dir: &Path) -> AgentFiles {
        let dir = data_dir.join("tls");
        AgentFiles {
            cert: dir.join("agent.crt"),
            key: dir.join("agent.key"),
            ca: dir.join("ca.crt"),
            server_ca: dir.join("server-ca.crt"),
        }
    }

    pub fn exist(&self) -> bool {
        self.cert.exists() && self.key.exists() && self.ca.exists()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_hosts_of_urls() {
        let host = |s: &str| bare_host(&url::Url::parse(s).unwrap());
        assert_eq!(host("https://10.99.0.2:8421").as_deref(), Some("10.99.0.2"));
        assert_eq!(host("https://Node-1.example:8421/x").as_deref(), Some("node-1.example"));
        assert_eq!(host("https://[::1]:8421").as_deref(), Some("::1"));
        assert_eq!(host("http://[fd00::2]/").as_deref(), Some("fd00::2"));
        assert_eq!(host("unix:/run/x.sock"), None);
    }

    #[test]
    fn ca_reloaded_from_disk_issues_certificates_that_verify() {
        let dir = tempfile::tempdir().unwrap();
        let first = ClusterCa::load_or_create(dir.path()).unwrap();
        let again = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem, again.cert_pem);
        let leaf = again
            .issue("node:a", &["127.0.0.1".into(), "localhost".into()], None)
            .unwrap();
        // A server config with the leaf and the original CA builds, and the
        // leaf chains to that CA.
        server_config(&leaf, &first.cert_pem, ClientAuth::Required).unwrap();
        let end = first_cert(&leaf.cert_pem, "leaf").unwrap();
        let roots = roots(&first.cert_pem).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        verifier
            .verify_server_cert(&end, &[], &name, &[], rustls::pki_types::UnixTime::now())
            .unwrap();
        let wrong = rustls::pki_types::ServerName::try_from("10.9.9.9").unwrap();
        assert!(verifier
            .verify_server_cert(&end, &[], &wrong, &[], rustls::pki_types::UnixTime::now())
            .is_err());
        let key_mode = std::fs::metadata(dir.path().join("ca.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key_mode.permissions().mode() & 0o777, 0o600);
    }

    fn chains_to(identity: &Identity, ca_pem: &str) -> bool {
        let all = certs(&identity.cert_pem, "chain").unwrap();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem).unwrap(), provider())
            .build()
            .unwrap();
        verifier
            .verify_client_cert(&all[0], &all[1..], rustls::pki_types::UnixTime::now())
            .is_ok()
    }

    #[test]
    fn a_rotated_ca_is_trusted_by_parties_that_know_only_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let old_ca = ca.cert_pem.clone();
        let hour = Duration::from_secs(3600);
        let before = ca.issue("node:a", &["127.0.0.1".into()], Some(hour)).unwrap();
        let (not_before, not_after) = before.validity().unwrap();
        let lifetime = not_after.duration_since(not_before).unwrap();
        assert_eq!(lifetime, hour + NOT_BEFORE_SKEW);
        let short = ca.issue("node:a", &[], Some(Duration::from_secs(30))).unwrap();
        let (from, until) = short.validity().unwrap();
        assert_eq!(until.duration_since(from).unwrap(), Duration::from_secs(33));

        ca.rotate().unwrap();
        assert!(matches!(ca.rotate(), Err(TlsError::Rotation(_))));
        assert_eq!(ca.name().unwrap(), "NovaCron cluster CA 2");
        let new_ca = ca.cert_pem.clone();
        let after = ca.issue("node:b", &["127.0.0.1".into()], Some(hour)).unwrap();
        // The new certificate carries the cross-signed CA: the old CA alone accepts it.
        assert!(chains_to(&after, &old_ca));
        assert!(chains_to(&after, &new_ca));
        assert!(chains_to(&before, &ca.trusted_pem()));
        assert!(!chains_to(&before, &new_ca));

        // A restart in the middle of the rotation finds the same state.
        let again = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(
            (again.cert_pem.clone(), again.trusted_pem()),
            (new_ca.clone(), ca.trusted_pem())
        );
        assert!(chains_to(&again.issue("node:c", &[], None).unwrap(), &old_ca));

        ca.finish_rotation().unwrap();
        assert!(matches!(ca.finish_rotation(), Err(TlsError::Rotation(_))));
        assert_eq!(ca.trusted_pem(), new_ca);
        assert!(!chains_to(&before, &ca.trusted_pem()));
        let later = ca.issue("node:d", &[], None).unwrap();
        assert_eq!(certs(&later.cert_pem, "chain").unwrap().len(), 1);
        let reloaded = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(reloaded.trusted_pem(), new_ca);
        assert!(!reloaded.rotating());
        // A second rotation names the third generation.
        let mut reloaded = reloaded;
        reloaded.rotate().unwrap();
        assert_eq!(reloaded.name().unwrap(), "NovaCron cluster CA 3");
    }

    /// A TLS handshake over an in-memory pipe: whether both sides accepted.
    async fn handshake(server: Arc<ServerConfig>, client: ClientConfig) -> bool {
        let (a, b) = tokio::io::duplex(64 << 10);
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a);
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(b);
        let (c, s) = tokio::join!(connect, accept);
        // TLS 1.3: the server judges the client's certificate after the
        // client has finished; a refusal shows on the server side.
        c.is_ok() && s.is_ok()
    }

    #[tokio::test]
    async fn live_tls_renews_and_revokes_without_new_configs() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let sans = ["127.0.0.1".to_string()];
        let trust = || TrustSet {
            ca_pem: ca.trusted_pem(),
            revoked: Default::default(),
        };
        let server = LiveTls::new(ca.issue("server", &sans, None).unwrap(), trust(), None).unwrap();
        let agent_cert = ca.issue("node:a", &sans, None).unwrap();
        let agent = LiveTls::new(agent_cert.clone(), trust(), None).unwrap();
        let server_config = server.server_config(ClientAuth::Required).unwrap();
        let client_config = agent.client_config().unwrap();
        assert!(handshake(server_config.clone(), client_config.clone()).await);

        // Revoked at the server: the same configurations now refuse the agent.
        let mut revoked = trust();
        revoked.revoked.insert(agent_cert.fingerprint().unwrap());
        assert!(server.set_trust(revoked.clone()).unwrap());
        assert!(!server.set_trust(revoked).unwrap(), "unchanged trust is not rebuilt");
        assert!(server.is_revoked(&agent_cert.fingerprint().unwrap()));
        assert!(!handshake(server_config.clone(), client_config.clone()).await);

        // A renewed certificate gets in again, through the same client configuration.
        agent.set_identity(ca.issue("node:a", &sans, None).unwrap()).unwrap();
        assert!(handshake(server_config.clone(), client_config.clone()).await);
        assert!(agent.issued_by(&ca.cert_pem).unwrap());

        // The agent refuses a server whose certificate it learns is revoked.
        let mut refuse_server = trust();
        refuse_server.revoked.insert(server.identity().fingerprint().unwrap());
        agent.set_trust(refuse_server).unwrap();
        assert!(!handshake(server_config, client_config).await);
    }
}
