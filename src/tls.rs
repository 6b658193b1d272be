//! Server-side TLS with rustls (the `ring` provider; no OpenSSL), terminated
//! here rather than by tonic's `ServerTlsConfig`, which is fixed at start:
//!
//! - [`ServerTls::load`] reads `--tls-cert`/`--tls-key` (and `--tls-client-ca`
//!   for mutual TLS) and builds a rustls `ServerConfig` with ALPN `h2`.
//! - [`ServerTls::spawn_reloader`] re-reads the files every
//!   `--tls-reload-interval` and on SIGHUP; changed contents build a new
//!   config that new connections get (open connections keep theirs). A pair
//!   that does not load (a half-written file, a key that does not match the
//!   certificate) is logged once and the previous one kept.
//! - [`ServerTls::incoming`] wraps the accepted TCP streams: each handshake
//!   runs in its own task, bounded by [`HANDSHAKE_TIMEOUT`], so a silent or
//!   slow client never holds up the accept loop; only finished handshakes
//!   reach tonic.
//!
//! The whole `ServerConfig` is swapped rather than only the certificate (a
//! `ResolvesServerCert`), because the client CA lives in the config's client
//! verifier, and it is reloaded the same way.
//!
//! Changes are found by content, not mtime: the files are a few kilobytes,
//! and comparing bytes has no "rewritten within the same timestamp tick" case.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; at the cap, accepting waits for one to end.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The files the server's TLS is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `Some`
    /// turns on mutual TLS (a client without such a certificate is refused).
    pub client_ca: Option<PathBuf>,
}

/// The contents a config was built from, to tell whether the files changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// What a reload found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The files are as they were (or as the last pair that failed to load).
    Unchanged,
    /// New connections get the new certificate (and client CA).
    Reloaded,
}

#[derive(Debug)]
struct Seen {
    /// What the current config was built from.
    loaded: Contents,
    /// The last contents that failed to load (`None`: the files could not be
    /// read) and why, so one failure is reported once, not at every poll.
    rejected: Option<(Option<Contents>, String)>,
}

impl Seen {
    fn reject(&mut self, contents: Option<Contents>, error: String) -> Result<Reload, String> {
        let rejection = Some((contents, error));
        if self.rejected == rejection {
            return Ok(Reload::Unchanged);
        }
        let error = rejection
            .as_ref()
            .map(|(_, e)| e.clone())
            .unwrap_or_default();
        self.rejected = rejection;
        Err(error)
    }
}

/// The server's current TLS config, shared by the accept path and the reloader.
#[derive(Clone)]
pub struct ServerTls {
    files: Arc<TlsFiles>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
    seen: Arc<Mutex<Seen>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files; an error names the flag and the file.
    pub fn load(files: TlsFiles) -> Result<ServerTls, String> {
        let contents = read(&files)?;
        let config = build(&files, &contents)?;
        Ok(ServerTls {
            files: Arc::new(files),
            current: Arc::new(RwLock::new(Arc::new(config))),
            seen: Arc::new(Mutex::new(Seen {
                loaded: contents,
                rejected: None,
            })),
        })
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The config a new connection gets.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Re-reads the files and, if they changed and load, swaps the config.
    /// An error (unreadable files, a bad pair) leaves the current config in
    /// place; the same bad contents are reported once, then `Unchanged`.
    pub fn reload(&self) -> Result<Reload, String> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let contents = match read(&self.files) {
            Ok(contents) => contents,
            Err(error) => return seen.reject(None, error),
        };
        if contents == seen.loaded {
            seen.rejected = None;
            return Ok(Reload::Unchanged);
        }
        if matches!(&seen.rejected, Some((Some(bad), _)) if *bad == contents) {
            return Ok(Reload::Unchanged);
        }
        match build(&self.files, &contents) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
                seen.loaded = contents;
                seen.rejected = None;
                Ok(Reload::Reloaded)
            }
            Err(error) => seen.reject(Some(contents), error),
        }
    }

    /// Reloads, logging the outcome (reloaded: info; failed: warn).
    fn reload_logged(&self) {
        match self.reload() {
            Ok(Reload::Reloaded) => tracing::info!(
                cert = %self.files.cert.display(),
                "tls certificate reloaded"
            ),
            Ok(Reload::Unchanged) => {}
            Err(error) => tracing::warn!(
                %error,
                "tls reload failed, keeping the previous certificate"
            ),
        }
    }

    /// Checks the files every `interval` (zero: never) and on SIGHUP, until
    /// `shutdown` fires.
    pub fn spawn_reloader(&self, interval: Duration, shutdown: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hangup = Hangup::new();
            let mut tick = (!interval.is_zero()).then(|| {
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                tick
            });
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = async { tick.as_mut().unwrap().tick().await }, if tick.is_some() => {}
                    () = hangup.recv() => tracing::info!("sighup: reloading tls files"),
                }
                let tls = tls.clone();
                // File reads: off the runtime's worker threads.
                let _ = tokio::task::spawn_blocking(move || tls.reload_logged()).await;
            }
        });
    }

    /// The TLS connections made from `tcp`'s streams. Each handshake runs in a
    /// task of its own, with the config current when the connection was
    /// accepted; a failed or timed-out handshake is logged (debug) and
    /// dropped. Errors of `tcp` itself are passed on, as tonic expects.
    pub fn incoming<S, IO, E>(
        &self,
        tcp: S,
    ) -> impl Stream<Item = Result<TlsStream<IO>, E>> + use<S, IO, E>
    where
        S: Stream<Item = Result<IO, E>> + Send + 'static,
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: Send + 'static,
    {
        let state = Handshakes {
            tls: self.clone(),
            tcp: Box::pin(tcp),
            tcp_done: false,
            pending: JoinSet::new(),
        };
        futures::stream::unfold(state, Handshakes::next)
    }
}

struct Handshakes<IO, E> {
    tls: ServerTls,
    tcp: std::pin::Pin<Box<dyn Stream<Item = Result<IO, E>> + Send>>,
    tcp_done: bool,
    pending: JoinSet<Result<TlsStream<IO>, String>>,
}

impl<IO, E> Handshakes<IO, E>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: Send + 'static,
{
    async fn next(mut self) -> Option<(Result<TlsStream<IO>, E>, Self)> {
        loop {
            if self.tcp_done && self.pending.is_empty() {
                return None;
            }
            let accepting = !self.tcp_done && self.pending.len() < MAX_PENDING_HANDSHAKES;
            tokio::select! {
                accepted = self.tcp.next(), if accepting => match accepted {
                    Some(Ok(io)) => {
                        let acceptor = TlsAcceptor::from(self.tls.config());
                        self.pending.spawn(async move {
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                                Ok(Ok(stream)) => Ok(stream),
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err(format!("no handshake within {HANDSHAKE_TIMEOUT:?}")),
                            }
                        });
                    }
                    Some(Err(e)) => return Some((Err(e), self)),
                    None => self.tcp_done = true,
                },
                Some(done) = self.pending.join_next(), if !self.pending.is_empty() => match done {
                    Ok(Ok(stream)) => return Some((Ok(stream), self)),
                    Ok(Err(error)) => tracing::debug!(%error, "tls handshake failed"),
                    Err(error) => tracing::debug!(%error, "tls handshake task failed"),
                },
                else => return None,
            }
        }
    }
}

/// SIGHUP, where there is such a thing; a signal that never comes elsewhere
/// (or when the handler cannot be installed).
struct Hangup {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    fn new() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let signal = signal(SignalKind::hangup())
                .inspect_err(|error| tracing::warn!(%error, "no sighup handler: tls reloads by polling only"))
                .ok();
            Hangup { signal }
        }
        #[cfg(not(unix))]
        Hangup {}
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

fn read(files: &TlsFiles) -> Result<Contents, String> {
    Ok(Contents {
        cert: read_file("--tls-cert", &files.cert)?,
        key: read_file("--tls-key", &files.key)?,
        client_ca: files
            .client_ca
            .as_deref()
            .map(|path| read_file("--tls-client-ca", path))
            .transpose()?,
    })
}

fn certificates(
    flag: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config from the files' contents: the certificate chain and
/// its key (checked to match), client verification when a client CA is
/// given, and ALPN `h2` (gRPC is HTTP/2 only).
fn build(files: &TlsFiles, contents: &Contents) -> Result<ServerConfig, String> {
    let provider = provider();
    let chain = certificates("--tls-cert", &files.cert, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|e| format!("--tls-key {}: no PEM private key: {e}", files.key.display()))?;
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    match CertifiedKey::new(chain.clone(), signing_key).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => {
            return Err(format!(
                "--tls-key {} does not go with --tls-cert {}: {e}",
                files.key.display(),
                files.cert.display()
            ));
        }
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let builder = match (&files.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for ca in certificates("--tls-client-ca", path, pem)? {
                roots
                    .add(ca)
                    .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--tls-client-ca {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let dir =
                std::env::temp_dir().join(format!("fleetcare-tls-unit-{}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for localhost: (cert PEM, key PEM).
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn files(dir: &Dir, (cert, key): &(String, String)) -> TlsFiles {
        TlsFiles {
            cert: dir.write("cert.pem", cert),
            key: dir.write("key.pem", key),
            client_ca: None,
        }
    }

    #[test]
    fn loads_a_pair_and_sets_alpn_h2() {
        let dir = Dir::new();
        let tls = ServerTls::load(files(&dir, &pair())).unwrap();
        assert_eq!(tls.config().alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn refuses_a_key_of_another_certificate_and_files_that_are_not_pem() {
        let dir = Dir::new();
        let (cert, _) = pair();
        let (_, other_key) = pair();
        let error = ServerTls::load(files(&dir, &(cert.clone(), other_key))).unwrap_err();
        assert!(error.contains("does not go with --tls-cert"), "{error}");
        let error = ServerTls::load(files(&dir, &("junk".into(), "junk".into()))).unwrap_err();
        assert!(
            error.starts_with("--tls-cert ") && error.contains("no PEM certificate"),
            "{error}"
        );
        let mut missing = files(&dir, &pair());
        missing.client_ca = Some(dir.0.join("absent.pem"));
        let error = ServerTls::load(missing).unwrap_err();
        assert!(error.starts_with("--tls-client-ca "), "{error}");
    }

    #[test]
    fn reload_swaps_changed_files_and_keeps_the_old_config_for_a_bad_pair_reporting_it_once() {
        let dir = Dir::new();
        let first = pair();
        let tls = ServerTls::load(files(&dir, &first)).unwrap();
        let before = tls.config();
        assert_eq!(tls.reload(), Ok(Reload::Unchanged));
        assert!(Arc::ptr_eq(&before, &tls.config()));

        // A half-done rotation: the new key, the old certificate.
        let second = pair();
        dir.write("key.pem", &second.1);
        let error = tls.reload().unwrap_err();
        assert!(error.contains("does not go with"), "{error}");
        assert_eq!(tls.reload(), Ok(Reload::Unchanged), "reported once");
        assert!(Arc::ptr_eq(&before, &tls.config()), "old config kept");

        dir.write("cert.pem", &second.0);
        assert_eq!(tls.reload(), Ok(Reload::Reloaded));
        assert!(!Arc::ptr_eq(&before, &tls.config()));

        // A vanished file is an error once, and the config stays.
        let current = tls.config();
        std::fs::remove_file(dir.0.join("cert.pem")).unwrap();
        assert!(tls.reload().unwrap_err().starts_with("--tls-cert "));
        assert_eq!(tls.reload(), Ok(Reload::Unchanged));
        assert!(Arc::ptr_eq(&current, &tls.config()));
        // Put back as it was: nothing to reload, and the next failure is reported again.
        dir.write("cert.pem", &second.0);
        assert_eq!(tls.reload(), Ok(Reload::Unchanged));
        dir.write("cert.pem", "junk");
        assert!(tls.reload().is_err());
    }
}
