//! TLS: a server with `--tls-cert`/`--tls-key` (certificates from a test CA
//! made with rcgen), mutual TLS with `--tls-client-ca`, and a certificate
//! swapped on disk that new connections get without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetcare::config::TlsArgs;
use fleetcare_client::{Clients, ConnectOptions, pb};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::{TestApp, TestDb, eventually, test_args};

/// A certificate authority for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// (certificate PEM, key PEM) of a leaf for `names` with `usage`.
    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self) -> (String, String) {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, name: &str) -> (String, String) {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A directory of PEM files for one test, removed at the end.
struct Pems {
    dir: PathBuf,
}

impl Pems {
    fn new() -> Pems {
        let dir = std::env::temp_dir().join(format!("fleetcare-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Pems { dir }
    }

    /// Writes `contents` to `name` atomically (a rename, as deploy tools and
    /// cert-manager do), so a reader never sees half a file.
    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&temporary, contents).unwrap();
        std::fs::rename(&temporary, &path).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Pems {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server serving `server.pem`/`server-key.pem` from `pems` (and requiring
/// client certificates from `client_ca`), checking the files every 100 ms.
async fn tls_server(db: &TestDb, pems: &Pems, client_ca: Option<&Path>) -> TestApp {
    let mut args = test_args(&db.url);
    args.tls = TlsArgs {
        tls_cert: Some(pems.path("server.pem")),
        tls_key: Some(pems.path("server-key.pem")),
        tls_client_ca: client_ca.map(Path::to_path_buf),
        tls_reload_interval: Duration::from_millis(100),
    };
    TestApp::spawn_with(args).await
}

fn https(app: &TestApp) -> String {
    format!("https://{}", app.addr)
}

/// One health check on a new connection made with `options`.
async fn health(server: &str, options: &ConnectOptions) -> Result<(), String> {
    let channel = options
        .endpoint(server)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    check(channel).await
}

async fn check(channel: Channel) -> Result<(), String> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
        .map_err(|status| format!("check: {status:?}"))
}

fn trusting(pems: &Pems, name: &str, ca: &Ca) -> ConnectOptions {
    ConnectOptions::default().ca_file(pems.write(name, &ca.pem))
}

#[tokio::test]
async fn a_tls_server_answers_clients_trusting_its_ca_and_refuses_plaintext_and_strangers() {
    let db = TestDb::new();
    let pems = Pems::new();
    let ca = Ca::new("fleetcare test ca");
    let (cert, key) = ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let app = tls_server(&db, &pems, None).await;

    // A silent TCP connection (no ClientHello) does not hold up anyone else:
    // each handshake runs in its own task.
    let silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();

    let trusted = trusting(&pems, "ca.pem", &ca);
    health(&https(&app), &trusted)
        .await
        .expect("trusted over TLS");
    // host:port with a CA file means TLS too.
    health(&app.addr.to_string(), &trusted)
        .await
        .expect("host:port with --tls-ca");

    let plaintext = health(&format!("http://{}", app.addr), &ConnectOptions::default()).await;
    assert!(plaintext.is_err(), "plaintext HTTP/2 to a TLS port");

    let other = trusting(&pems, "other-ca.pem", &Ca::new("another ca"));
    let refused = health(&https(&app), &other).await.unwrap_err();
    assert!(refused.contains("UnknownIssuer"), "{refused}");

    // System roots do not include the test CA.
    assert!(
        health(&https(&app), &ConnectOptions::default())
            .await
            .is_err()
    );

    // An http:// address with TLS options is refused before connecting.
    let mixed = trusted.endpoint(&format!("http://{}", app.addr));
    assert!(mixed.is_err());

    drop(silent);
    app.stop().await;
}

/// A TLS server and the Rust client for it, with the test CA and a token.
async fn tls_clients(db: &TestDb, pems: &Pems) -> (TestApp, Clients) {
    let ca = Ca::new("fleetcare test ca");
    let (cert, key) = ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let app = tls_server(db, pems, None).await;
    let options = trusting(pems, "ca.pem", &ca).token("s3cret");
    let clients = Clients::connect_with(&https(&app), &options)
        .await
        .expect("connects");
    (app, clients)
}

#[tokio::test]
async fn the_rust_client_calls_over_tls_with_a_token() {
    let db = TestDb::new();
    let pems = Pems::new();
    let (app, mut clients) = tls_clients(&db, &pems).await;
    // ExplainRecovery reads no agent: only the connection is under test.
    let explained = clients
        .agents
        .explain_recovery(pb::ExplainRecoveryRequest {
            message: "rate limit exceeded, try again in 30 seconds".into(),
            ..Default::default()
        })
        .await
        .expect("ExplainRecovery over TLS")
        .into_inner();
    assert!(explained.recovery_at.is_some(), "{explained:?}");
    app.stop().await;
}

#[tokio::test]
async fn an_agent_registers_over_tls() {
    let db = TestDb::new();
    let pems = Pems::new();
    let (app, mut clients) = tls_clients(&db, &pems).await;
    let registered = clients
        .agents
        .register_agent(pb::RegisterAgentRequest {
            agent_id: "tls-agent".into(),
            labels: Default::default(),
            quota_pools: Vec::new(),
        })
        .await
        .expect("RegisterAgent over TLS")
        .into_inner();
    assert_eq!(registered.agent.unwrap().agent_id, "tls-agent");
    app.stop().await;
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let db = TestDb::new();
    let pems = Pems::new();
    let ca = Ca::new("fleetcare server ca");
    let (cert, key) = ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let client_ca = Ca::new("fleetcare client ca");
    let client_ca_path = pems.write("client-ca.pem", &client_ca.pem);
    let app = tls_server(&db, &pems, Some(&client_ca_path)).await;
    let trusted = trusting(&pems, "ca.pem", &ca);

    let anonymous = health(&https(&app), &trusted).await;
    assert!(anonymous.is_err(), "a client without a certificate");

    let (cert, key) = client_ca.client("agent-runner");
    let with_identity = trusted.clone().identity_files(
        pems.write("client.pem", &cert),
        pems.write("client-key.pem", &key),
    );
    health(&https(&app), &with_identity)
        .await
        .expect("a client with a certificate from the client CA");

    // A certificate from the server's CA is not one from the client CA.
    let (cert, key) = ca.client("impostor");
    let impostor = trusted.clone().identity_files(
        pems.write("impostor.pem", &cert),
        pems.write("impostor-key.pem", &key),
    );
    assert!(health(&https(&app), &impostor).await.is_err());
    app.stop().await;
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_is_served_to_new_connections_without_a_restart() {
    let db = TestDb::new();
    let pems = Pems::new();
    let old_ca = Ca::new("old ca");
    let (cert, key) = old_ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let app = tls_server(&db, &pems, None).await;
    let trusts_old = trusting(&pems, "old-ca.pem", &old_ca);
    let new_ca = Ca::new("new ca");
    let trusts_new = trusting(&pems, "new-ca.pem", &new_ca);

    health(&https(&app), &trusts_old).await.expect("old ca");
    assert!(health(&https(&app), &trusts_new).await.is_err());
    // A connection opened before the swap.
    let open = trusts_old
        .endpoint(&https(&app))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // A half-finished rotation (the new key next to the old certificate) is
    // rejected and the old pair kept.
    let (new_cert, new_key) = new_ca.server();
    pems.write("server-key.pem", &new_key);
    tokio::time::sleep(Duration::from_millis(300)).await;
    health(&https(&app), &trusts_old)
        .await
        .expect("the old pair is kept while the new one does not match");

    pems.write("server.pem", &new_cert);
    eventually(
        Duration::from_secs(10),
        "the new certificate on new connections",
        || async { health(&https(&app), &trusts_new).await.ok() },
    )
    .await;
    assert!(
        health(&https(&app), &trusts_old).await.is_err(),
        "new connections no longer get the old certificate"
    );
    check(open)
        .await
        .expect("an open connection keeps working across the swap");
    app.stop().await;
}

/// SIGHUP reloads at once, with polling off. The test registers its own SIGHUP
/// handler first, so the signal can never take the default action (ending
/// the test binary), and repeats it until the server's handler has seen one.
#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_certificate() {
    let _guard = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    let db = TestDb::new();
    let pems = Pems::new();
    let old_ca = Ca::new("old ca");
    let (cert, key) = old_ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let mut args = test_args(&db.url);
    args.tls = TlsArgs {
        tls_cert: Some(pems.path("server.pem")),
        tls_key: Some(pems.path("server-key.pem")),
        tls_client_ca: None,
        tls_reload_interval: Duration::ZERO,
    };
    let app = TestApp::spawn_with(args).await;
    let new_ca = Ca::new("new ca");
    let trusts_new = trusting(&pems, "new-ca.pem", &new_ca);
    let (cert, key) = new_ca.server();
    pems.write("server-key.pem", &key);
    pems.write("server.pem", &cert);

    eventually(
        Duration::from_secs(10),
        "the new certificate after SIGHUP",
        || async {
            let pid = std::process::id().to_string();
            let sent = std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap();
            assert!(sent.success());
            tokio::time::sleep(Duration::from_millis(100)).await;
            health(&https(&app), &trusts_new).await.ok()
        },
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_mismatched_certificate_fails_the_start_with_the_flag_named() {
    let db = TestDb::new();
    let pems = Pems::new();
    let ca = Ca::new("ca");
    let (cert, _) = ca.server();
    let (_, other_key) = ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &other_key);
    let start = |cert: PathBuf, key: PathBuf| {
        let mut args = test_args(&db.url);
        args.tls.tls_cert = Some(cert);
        args.tls.tls_key = Some(key);
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let token = tokio_util::sync::CancellationToken::new();
            fleetcare::startup::Application::build(args, listener, token)
                .await
                .err()
                .expect("refused")
                .to_string()
        }
    };
    let mismatched = start(pems.path("server.pem"), pems.path("server-key.pem")).await;
    assert!(
        mismatched.contains("does not go with --tls-cert"),
        "{mismatched}"
    );
    let missing = start(pems.path("nope.pem"), pems.path("server-key.pem")).await;
    assert!(missing.starts_with("--tls-cert "), "{missing}");
}

/// Runs the `fleetcare` CLI with `args` to completion: (exit code, stdout, stderr).
async fn cli(args: Vec<String>) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fleetcare"));
    command
        .args(args)
        .env_remove("FLEETCARE_SERVER")
        .env_remove("FLEETCARE_TLS_CA")
        .env_remove("FLEETCARE_TOKEN");
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    (
        output.status.code().unwrap(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_connects_with_tls_flags_a_client_certificate_and_a_token() {
    let db = TestDb::new();
    let pems = Pems::new();
    let ca = Ca::new("fleetcare test ca");
    let (cert, key) = ca.server();
    pems.write("server.pem", &cert);
    pems.write("server-key.pem", &key);
    let client_ca = pems.write("client-ca.pem", &ca.pem);
    let app = tls_server(&db, &pems, Some(&client_ca)).await;
    let ca_file = pems.write("ca.pem", &ca.pem);
    let (cert, key) = ca.client("operator");
    let cert = pems.write("client.pem", &cert);
    let key = pems.write("client-key.pem", &key);
    let s = |p: &Path| p.display().to_string();
    // explain-limit reads no agent: the call proves the connection, whatever the store.
    let command = |server: &str, flags: &[&str]| {
        let mut args: Vec<String> = [
            "explain-limit",
            "--message",
            "rate limit exceeded",
            "--json",
        ]
        .map(String::from)
        .into();
        args.extend(["--server".to_string(), server.to_string()]);
        args.extend(flags.iter().map(|f| f.to_string()));
        args
    };
    let server = https(&app);
    let (ca_file, cert, key) = (s(&ca_file), s(&cert), s(&key));
    let ca_flags = ["--tls-ca", ca_file.as_str()];
    let identity = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let all = [&ca_flags[..], &identity[..], &["--token", "s3cret"]].concat();

    let (code, out, err) = cli(command(&server, &all)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.trim_start().starts_with('{'), "{out}");

    // Without the client certificate the server refuses the connection.
    let (code, _, err) = cli(command(&server, &ca_flags)).await;
    assert_ne!(code, 0, "{err}");

    // Without the CA the server is not trusted: unreachable (3).
    let (code, _, err) = cli(command(&server, &identity)).await;
    assert_eq!(code, fleetcare::cli::exit::UNREACHABLE as i32, "{err}");
    assert!(err.contains("cannot reach the server"), "{err}");

    // TLS flags with an http:// address: refused before connecting (1).
    let (code, _, err) = cli(command(&format!("http://{}", app.addr), &all)).await;
    assert_eq!(code, fleetcare::cli::exit::FAILURE as i32, "{err}");
    assert!(err.contains("use https://"), "{err}");
    app.stop().await;
}
