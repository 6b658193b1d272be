//! The per-call cost measured from outside: the `fleetcare` binary as an
//! operator runs it (its own process, its default logging), driven by h2load
//! (nghttp2's HTTP/2 load generator), one h2load process per agent. The same
//! shape runs `Heartbeat` (each process heartbeating its own agent) and
//! `grpc.health.v1.Health/Check`, alternately, against the same server: the
//! ratio of the two is what the layers in front of a fleetcare call cost.
//!
//! Without h2load on the PATH (Debian: `apt-get install nghttp2-client`) the
//! section says so and is skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetcare::proto::v1 as pb;
use prost::Message;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::{from_ticks, stat_ticks};

/// The shape: `processes` h2load processes, each one connection with
/// `streams` calls in flight, `calls` calls each.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub processes: usize,
    pub streams: usize,
    pub calls: usize,
}

/// One h2load run over every process.
pub struct Run {
    pub calls: usize,
    pub elapsed: Duration,
    /// CPU the server process used during the run.
    pub server_cpu: Duration,
    /// CPU the h2load processes used.
    pub client_cpu: Duration,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    pub fn describe(&self, what: &str) -> String {
        let per = |cpu: Duration| cpu.as_secs_f64() / self.calls as f64 * 1e6;
        format!(
            "  {what:<44} {:>8} in {:>8.2?} {:>9.0}/s  cpu per call: server {:.1} µs, h2load {:.1} µs",
            self.calls,
            self.elapsed,
            self.rate(),
            per(self.server_cpu),
            per(self.client_cpu),
        )
    }
}

/// Whether h2load can be run here.
pub fn h2load_available() -> bool {
    Command::new("h2load")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The server binary in a process of its own, stopped when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// Its directory (the request bodies, its log, its embedded store),
    /// removed when it is dropped.
    dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Server {
    /// `fleetcare serve` on a free loopback port (no auth file: loopback is
    /// served without one), its store `store_args`, its logs at the default
    /// level to a file in its directory.
    pub async fn start(binary: &Path, store_args: &[String]) -> Server {
        let dir = std::env::temp_dir().join(format!("fleetcare-outside-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bench directory");
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            probe.local_addr().expect("its address")
        };
        let log = std::fs::File::create(dir.join("server.log")).expect("server log");
        let child = Command::new(binary)
            .arg("serve")
            .args(["--listen", &addr.to_string(), "--http-listen", ""])
            .args(["--heartbeat-timeout", "1h"])
            .args(store_args)
            .env_remove("RUST_LOG")
            .env("FLEETCARE_DATA_DIR", dir.join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the fleetcare binary starts");
        let server = Server {
            child,
            addr,
            dir: tempdir::Dir(dir),
        };
        server.wait_serving().await;
        server
    }

    /// Until its health check answers SERVING (a readiness probe, as an
    /// orchestrator's: a child process has no other way to say it is up).
    async fn wait_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(channel) = self.endpoint().connect().await {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if answer.is_ok_and(|a| a.into_inner().status == 1) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the server did not serve within 60 s; its log: {}",
                std::fs::read_to_string(self.dir.0.join("server.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn endpoint(&self) -> tonic::transport::Endpoint {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint")
    }

    /// CPU the server process has used so far.
    pub fn cpu(&self) -> Duration {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| stat_ticks(&s))
            .map_or(Duration::ZERO, from_ticks)
    }

    /// Writes one gRPC request frame (uncompressed) for h2load's `-d`.
    pub fn body(&self, name: &str, message: &impl Message) -> PathBuf {
        let payload = message.encode_to_vec();
        let mut frame = Vec::with_capacity(5 + payload.len());
        frame.push(0);
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        let path = self.dir.0.join(name);
        std::fs::write(&path, frame).expect("request body");
        path
    }

    /// Runs one h2load process per body, all at once, each `shape.streams`
    /// calls in flight on one connection, against `method`
    /// (`/package.Service/Method`). Every call must have been answered with a
    /// message: a gRPC error is a trailers-only answer, no data.
    pub fn h2load(&self, method: &str, bodies: &[PathBuf], shape: Shape) -> Run {
        let url = format!("http://{}{method}", self.addr);
        let cpu_before = self.cpu();
        let started = Instant::now();
        let children: Vec<Child> = bodies
            .iter()
            .map(|body| {
                Command::new("h2load")
                    .args(["-n", &shape.calls.to_string()])
                    .args(["-c", "1", "-m", &shape.streams.to_string()])
                    .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
                    .arg("-d")
                    .arg(body)
                    .arg(&url)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("h2load starts")
            })
            .collect();
        let client_before = super::children_cpu_time();
        let mut calls = 0;
        for child in children {
            let out = child.wait_with_output().expect("h2load runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let (succeeded, data) = parse(&text).unwrap_or_else(|| {
                panic!(
                    "unexpected h2load output: {text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            assert_eq!(succeeded, shape.calls, "every call answered 2xx: {text}");
            assert!(
                data >= 5 * succeeded as u64,
                "every call answered with a message, not a gRPC error: {text}"
            );
            calls += succeeded;
        }
        let elapsed = started.elapsed();
        Run {
            calls,
            elapsed,
            server_cpu: self.cpu().saturating_sub(cpu_before),
            client_cpu: super::children_cpu_time().saturating_sub(client_before),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (succeeded requests, response data bytes) from h2load's summary:
/// `requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, ...`
/// and `traffic: ... total, ... headers (...), 1.50KB (1536) data`.
fn parse(text: &str) -> Option<(usize, u64)> {
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let succeeded = requests
        .split(',')
        .find(|p| p.trim_end().ends_with("succeeded"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let traffic = text.lines().find(|l| l.starts_with("traffic:"))?;
    let data_part = traffic
        .split(',')
        .find(|p| p.trim_end().ends_with("data"))?;
    let data = data_part
        .split('(')
        .nth(1)?
        .split(')')
        .next()?
        .parse()
        .ok()?;
    Some((succeeded, data))
}

/// The request bodies of the comparison: `Heartbeat` for each of `agents`, and
/// as many empty `Health/Check`s.
pub fn bodies(server: &Server, agents: &[String]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let beats = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            server.body(
                &format!("heartbeat-{i}.bin"),
                &pb::HeartbeatRequest {
                    agent_id: agent.clone(),
                },
            )
        })
        .collect();
    let health = server.body(
        "health.bin",
        &HealthCheckRequest {
            service: String::new(),
        },
    );
    (beats, vec![health; agents.len()])
}
