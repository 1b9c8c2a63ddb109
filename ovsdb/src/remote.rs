//! Where a server is (`unix:PATH`, `tcp:IP:PORT`, `ssl:IP:PORT`) and how to open a byte
//! stream to it, TLS included.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};
use tokio_rustls::TlsConnector;

use crate::error::Error;

/// One server address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Remote {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// Plain TCP.
    Tcp(Endpoint),
    /// TCP with TLS (needs [`TlsFiles`]).
    Ssl(Endpoint),
}

/// A TCP endpoint: an IP address, or a host name resolved at each connection attempt (so a
/// Kubernetes service name follows the service), and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// An address and port.
    Addr(SocketAddr),
    /// A DNS name and port.
    Name(String, u16),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Addr(a) => write!(f, "{a}"),
            Endpoint::Name(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

impl Remote {
    /// Parses one remote. IPv6 addresses go in brackets: `tcp:[::1]:6642`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadRemote(s.to_owned());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let addr = |rest: &str| -> Result<Endpoint, Error> {
            if let Ok(addr) = rest.parse() {
                return Ok(Endpoint::Addr(addr));
            }
            // OVS also writes IPv6 without brackets: tcp:::1:6642 → last colon is the port.
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let port: u16 = port.parse().map_err(|_| bad())?;
            match host.parse() {
                Ok(ip) => Ok(Endpoint::Addr(SocketAddr::new(ip, port))),
                Err(_) if is_host_name(host) && !host.contains(':') => {
                    Ok(Endpoint::Name(host.to_owned(), port))
                }
                Err(_) => Err(bad()),
            }
        };
        match kind {
            "unix" if !rest.is_empty() => Ok(Remote::Unix(PathBuf::from(rest))),
            "tcp" => Ok(Remote::Tcp(addr(rest)?)),
            "ssl" => Ok(Remote::Ssl(addr(rest)?)),
            _ => Err(bad()),
        }
    }

    /// Parses a comma-separated list, as `--db` and `ovn-remote` take them.
    pub fn parse_list(s: &str) -> Result<Vec<Self>, Error> {
        let remotes: Vec<Remote> = s
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(Remote::parse)
            .collect::<Result<_, _>>()?;
        if remotes.is_empty() {
            return Err(Error::BadRemote(s.to_owned()));
        }
        Ok(remotes)
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Unix(p) => write!(f, "unix:{}", p.display()),
            Remote::Tcp(a) => write!(f, "tcp:{a}"),
            Remote::Ssl(a) => write!(f, "ssl:{a}"),
        }
    }
}

/// The PEM files OVN's PKI produces, as ovn-controller's `-p/-c/-C` take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Private key of this client.
    pub private_key: PathBuf,
    /// Certificate of this client, signed by a CA the server trusts.
    pub certificate: PathBuf,
    /// CA certificate that signed the server's certificate.
    pub ca_certificate: PathBuf,
}

/// A connected byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Ready-to-use TLS settings, built once from [`TlsFiles`].
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tls")
    }
}

impl Tls {
    /// Loads the key, certificate and CA certificate.
    pub fn load(files: &TlsFiles) -> Result<Self, Error> {
        let read_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, Error> {
            let certs: Vec<_> = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Error::Tls(format!("{}: no certificate", path.display())));
            }
            Ok(certs)
        };
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca_certificate)? {
            roots
                .add(ca)
                .map_err(|e| Error::Tls(format!("{}: {e}", files.ca_certificate.display())))?;
        }
        let chain = read_certs(&files.certificate)?;
        let key = PrivateKeyDer::from_pem_file(&files.private_key)
            .map_err(|e| Error::Tls(format!("{}: {e}", files.private_key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnlyVerifier(webpki)))
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Tls(format!("{}: {e}", files.certificate.display())))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }
}

/// Verifies the server's chain against the CA but not its name: OVS PKI certificates name
/// a switch or controller id, not the address the client dials, and OVS does the same.
#[derive(Debug)]
struct ChainOnlyVerifier(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnlyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

async fn tcp_connect(endpoint: &Endpoint) -> Result<TcpStream, Error> {
    let stream = match endpoint {
        Endpoint::Addr(addr) => TcpStream::connect(addr).await?,
        Endpoint::Name(host, port) => TcpStream::connect((host.as_str(), *port)).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a stream to `remote`; `ssl:` remotes need `tls`.
pub async fn connect(remote: &Remote, tls: Option<&Tls>) -> Result<Box<dyn Stream>, Error> {
    match remote {
        Remote::Unix(path) => Ok(Box::new(UnixStream::connect(path).await?)),
        Remote::Tcp(endpoint) => Ok(Box::new(tcp_connect(endpoint).await?)),
        Remote::Ssl(endpoint) => {
            let tls = tls.ok_or_else(|| {
                Error::Tls(format!(
                    "{remote} needs a private key, certificate and CA certificate"
                ))
            })?;
            let stream = tcp_connect(endpoint).await?;
            let name = match endpoint {
                Endpoint::Addr(addr) => ServerName::IpAddress(addr.ip().into()),
                Endpoint::Name(host, _) => ServerName::try_from(host.clone())
                    .map_err(|e| Error::Tls(format!("{remote}: {e}")))?,
            };
            let stream = tls
                .connector
                .connect(name, stream)
                .await
                .map_err(|e| Error::Tls(format!("handshake with {remote}: {e}")))?;
            Ok(Box::new(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            Remote::parse("unix:/run/ovn/ovnsb_db.sock").unwrap(),
            Remote::Unix("/run/ovn/ovnsb_db.sock".into())
        );
        assert_eq!(
            Remote::parse("tcp:127.0.0.1:6642").unwrap(),
            Remote::Tcp(Endpoint::Addr("127.0.0.1:6642".parse().unwrap()))
        );
        assert_eq!(
            Remote::parse("ssl:[::1]:6642").unwrap(),
            Remote::Ssl(Endpoint::Addr("[::1]:6642".parse().unwrap()))
        );
        assert_eq!(
            Remote::parse("tcp:::1:6642").unwrap(),
            Remote::Tcp(Endpoint::Addr("[::1]:6642".parse().unwrap()))
        );
        assert_eq!(
            Remote::parse("ssl:ovnkube-db.ovn-kubernetes.svc:9642").unwrap(),
            Remote::Ssl(Endpoint::Name("ovnkube-db.ovn-kubernetes.svc".into(), 9642))
        );
        assert_eq!(
            Remote::parse("tcp:ovn-central:6642").unwrap().to_string(),
            "tcp:ovn-central:6642"
        );
        let list = Remote::parse_list("tcp:127.0.0.1:1, tcp:127.0.0.1:2,ssl:127.0.0.1:3").unwrap();
        assert_eq!(list.len(), 3);
        for bad in [
            "",
            "unix:",
            "http:1.2.3.4:80",
            "tcp:1.2.3.4",
            "tcp:host",
            "tcp:ba d:80",
            "tcp:-x:80",
        ] {
            assert!(Remote::parse_list(bad).is_err(), "{bad}");
        }
    }
}
