//! Throwaway Postgres clusters the campaign may crash: `initdb` into a
//! directory of the campaign's, `postgres` on a free port in a process group
//! of its own (so kill -9 takes the postmaster and every backend at once, as
//! a machine crash would), and a synchronous streaming standby made with
//! `pg_basebackup`. As root, everything runs as the `postgres` user through
//! `setpriv` (initdb and postgres refuse root).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio::process::{Child, Command};

use crate::procs::signal_group;

/// The directory holding `initdb`, `postgres` and `pg_basebackup`:
/// `FLEETCARE_TEST_POSTGRES_BIN`, else PATH, else Debian's
/// `/usr/lib/postgresql/<version>/bin`, newest first.
pub fn find_binaries() -> Result<PathBuf, String> {
    let usable = |dir: &PathBuf| {
        ["initdb", "postgres", "pg_basebackup"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("FLEETCARE_TEST_POSTGRES_BIN") {
        return Some(PathBuf::from(dir))
            .filter(usable)
            .ok_or("FLEETCARE_TEST_POSTGRES_BIN has no initdb, postgres and pg_basebackup".into());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|d| d.path().join("bin")).collect())
        .unwrap_or_default();
    installed.sort();
    installed.reverse();
    on_path
        .into_iter()
        .chain(installed)
        .find(usable)
        .ok_or_else(|| {
            "no initdb, postgres and pg_basebackup were found (FLEETCARE_TEST_POSTGRES_BIN, \
         PATH, /usr/lib/postgresql); install PostgreSQL's server package"
                .into()
        })
}

/// The user to run Postgres as: none (ourselves) unless we are root, then `postgres`.
fn run_as() -> Result<Option<&'static str>, String> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Ok(None);
    }
    let known = std::process::Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .is_ok_and(|o| o.status.success());
    if known {
        Ok(Some("postgres"))
    } else {
        Err("running as root, and there is no postgres user to run initdb as".into())
    }
}

fn command(user: Option<&str>, program: &Path, cwd: &Path) -> Command {
    let mut c = match user {
        // setpriv execs the program itself (no forked parent in between), so
        // the child's pid is the postmaster's.
        Some(user) => {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
                "--",
            ])
            .arg(program);
            c
        }
        None => Command::new(program),
    };
    c.current_dir(cwd);
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One Postgres cluster: its data directory, port and (while running) process.
pub struct Cluster {
    pub name: String,
    bin: PathBuf,
    user: Option<&'static str>,
    dir: PathBuf,
    data: PathBuf,
    pub port: u16,
    /// Settings given on the command line (`-c k=v`), so that a base backup
    /// of this cluster does not inherit them.
    settings: Vec<String>,
    child: Option<Child>,
}

impl Cluster {
    /// `initdb` a new cluster in `root/name`.
    pub async fn init(bin: &Path, root: &Path, name: &str) -> Result<Cluster, String> {
        let mut cluster = Cluster::prepare(bin, root, name)?;
        let out = command(cluster.user, &bin.join("initdb"), &cluster.dir)
            .arg("-D")
            .arg(&cluster.data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .await
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        cluster.settings = base_settings();
        Ok(cluster)
    }

    /// A streaming standby of `primary` (which must run), named `name` in
    /// the primary's `synchronous_standby_names`: `pg_basebackup`, then
    /// `standby.signal` and a `primary_conninfo` naming it.
    pub async fn standby_of(primary: &Cluster, root: &Path, name: &str) -> Result<Cluster, String> {
        let mut cluster = Cluster::prepare(&primary.bin, root, name)?;
        let out = command(
            cluster.user,
            &primary.bin.join("pg_basebackup"),
            &cluster.dir,
        )
        .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
        .args([
            "-U",
            "postgres",
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
            "-D",
        ])
        .arg(&cluster.data)
        .output()
        .await
        .map_err(|e| format!("pg_basebackup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let signal = command(cluster.user, Path::new("touch"), &cluster.dir)
            .arg(cluster.data.join("standby.signal"))
            .status()
            .await
            .map_err(|e| e.to_string())?;
        assert!(signal.success(), "touch standby.signal");
        cluster.settings = base_settings();
        cluster.settings.push(format!(
            "primary_conninfo=host=127.0.0.1 port={} user=postgres application_name={name}",
            primary.port
        ));
        Ok(cluster)
    }

    fn prepare(bin: &Path, root: &Path, name: &str) -> Result<Cluster, String> {
        let user = run_as()?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some(user) = user {
            let chown = std::process::Command::new("chown")
                .arg(user)
                .arg(&dir)
                .status()
                .map_err(|e| e.to_string())?;
            if !chown.success() {
                return Err(format!("chown {user} {} failed", dir.display()));
            }
        }
        Ok(Cluster {
            name: name.into(),
            bin: bin.into(),
            user,
            data: dir.join("data"),
            dir,
            port: free_port(),
            settings: Vec::new(),
            child: None,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Starts the postmaster and waits until it accepts a login.
    pub async fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let mut c = command(self.user, &self.bin.join("postgres"), &self.dir);
        c.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir);
        for setting in &self.settings {
            c.args(["-c", setting]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .map_err(|e| e.to_string())?;
        let child = c
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start postgres: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match sqlx::PgConnection::connect(&self.url("postgres")).await {
                Ok(conn) => {
                    let _ = conn.close().await;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "{} not ready after 60 s: {e}; log:\n{}",
                        self.name,
                        self.log_tail()
                    ));
                }
                Err(_) => {
                    if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                        self.child = None;
                        return Err(format!(
                            "{} exited at start ({status}); log:\n{}",
                            self.name,
                            self.log_tail()
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
            }
        }
    }

    /// kill -9 of the postmaster and every backend (its process group), and
    /// waits for the postmaster to be gone.
    pub async fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                signal_group("KILL", pid);
            }
            let _ = child.wait().await;
        }
        // The backends of the group go with it; wait until none holds the
        // data directory, or the next start refuses.
        let pid_file = self.data.join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        {
            if !Path::new(&format!("/proc/{pid}")).exists() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `pg_promote()` on a standby: it ends recovery and becomes a primary.
    pub async fn promote(&self) -> Result<(), String> {
        let mut conn = sqlx::PgConnection::connect(&self.url("postgres"))
            .await
            .map_err(|e| e.to_string())?;
        let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, 60)")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if promoted {
            Ok(())
        } else {
            Err(format!("{} was not promoted within 60 s", self.name))
        }
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(child) = &self.child
            && let Some(pid) = child.id()
        {
            signal_group("KILL", pid);
        }
    }
}

/// Settings of every throwaway cluster. `fsync=off`: the campaign crashes
/// processes, not the machine, and a killed process's writes are in the
/// kernel's page cache. `synchronous_commit` stays `on`: with `off`, a commit
/// is answered before its WAL leaves Postgres's memory, and kill -9 would lose
/// acknowledged transactions (Postgres's documented trade, not fleetcare's).
fn base_settings() -> Vec<String> {
    [
        "listen_addresses=127.0.0.1",
        "fsync=off",
        "full_page_writes=off",
        "synchronous_commit=on",
        "max_connections=200",
        "wal_level=replica",
        "max_wal_senders=5",
        "hot_standby=on",
    ]
    .map(String::from)
    .to_vec()
}
