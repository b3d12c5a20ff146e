//! Preparing a machine for the suite: the Redis it talks to answering, `redis-server` for the
//! tests that start private servers, and Debian's Chromium for the status page test.
//!
//! Missing packages are installed with `apt-get` when running as root; otherwise the failure
//! says exactly what to run. Nothing here depends on the server crate.

use std::{
    ffi::OsString,
    fmt,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The environment variable through which the suite (`tests/status_page.rs`) learns which
/// Chromium to start, and through which a user can name one.
pub const CHROMIUM_VAR: &str = "CHROMIUM_BIN";

/// Where Debian's packages put the binaries, for a PATH that lacks them.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a Redis this command started has to answer PING.
const REDIS_START_DEADLINE: Duration = Duration::from_secs(10);

/// A program the suite needs and the Debian packages that bring it.
struct Requirement {
    /// Names looked up on PATH, first match wins.
    names: &'static [&'static str],
    /// Where Debian's package installs it, used when PATH lacks it.
    debian_path: &'static str,
    packages: &'static [&'static str],
}

const REDIS_SERVER: Requirement = Requirement {
    names: &["redis-server"],
    debian_path: "/usr/bin/redis-server",
    packages: &["redis-server"],
};

/// The bench's NATS baseline (`tests/bench_smoke.rs`); machines of this kind run it as a
/// service, from Debian's package.
const NATS_SERVER: Requirement = Requirement {
    names: &["nats-server"],
    debian_path: "/usr/sbin/nats-server",
    packages: &["nats-server"],
};

const CHROMIUM: Requirement = Requirement {
    names: &["chromium", "chromium-browser"],
    debian_path: "/usr/bin/chromium",
    packages: &["chromium", "fonts-liberation"],
};

/// What to prepare.
#[derive(Debug, Clone)]
pub struct Preparation {
    /// The Redis the suite talks to, on 127.0.0.1.
    pub redis_port: u16,
    /// Where a Redis started here keeps its files; `None`: the machine's own place.
    pub redis_dir: Option<PathBuf>,
}

impl Default for Preparation {
    fn default() -> Self {
        Self {
            redis_port: 6379,
            redis_dir: None,
        }
    }
}

/// What preparation found, handed to the suite's environment.
#[derive(Debug)]
pub struct Prepared {
    chromium: PathBuf,
    /// Directories of programs found off PATH, appended to the suite's PATH.
    extra_path: Vec<PathBuf>,
}

/// Why the machine could not be prepared.
#[derive(Debug)]
pub enum Failure {
    /// A package is missing and this process may not install it.
    NotRoot {
        program: &'static str,
        command: String,
    },
    /// `apt-get` failed or did not bring the program.
    Install {
        program: &'static str,
        detail: String,
    },
    /// `CHROMIUM_BIN` names something that is not an executable file.
    BadChromiumVar(PathBuf),
    /// The program was found but does not run.
    Broken { program: PathBuf, detail: String },
    /// Redis did not answer, even after starting it.
    Redis { port: u16, detail: String },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRoot { program, command } => write!(
                f,
                "{program} is missing and this is not root, so it cannot be installed here; \
                 as root, run:\n    {command}\nthen run this command again"
            ),
            Self::Install { program, detail } => {
                write!(f, "installing {program} with apt-get failed: {detail}")
            }
            Self::BadChromiumVar(path) => write!(
                f,
                "{CHROMIUM_VAR}={} is not an executable file; unset it or name a Chromium binary",
                path.display()
            ),
            Self::Broken { program, detail } => {
                write!(f, "{} does not run: {detail}", program.display())
            }
            Self::Redis { port, detail } => {
                write!(f, "Redis on 127.0.0.1:{port} (--redis-port): {detail}")
            }
        }
    }
}

impl Preparation {
    /// Makes the machine ready for the suite, printing what it found and did.
    pub fn run(&self) -> Result<Prepared, Failure> {
        let root = is_root();
        let mut extra_path = Vec::new();

        let redis_server = find_or_install(&REDIS_SERVER, root)?;
        if !on_path(&redis_server)
            && let Some(dir) = redis_server.parent()
        {
            extra_path.push(dir.to_path_buf());
        }
        self.ensure_redis(&redis_server)?;

        let nats_server = find_or_install(&NATS_SERVER, root)?;
        if !on_path(&nats_server)
            && let Some(dir) = nats_server.parent()
        {
            extra_path.push(dir.to_path_buf());
        }
        println!("xtask: nats-server {}", nats_server.display());

        let chromium = match std::env::var_os(CHROMIUM_VAR).filter(|v| !v.is_empty()) {
            Some(named) => {
                let named = PathBuf::from(named);
                if !is_executable(&named) {
                    return Err(Failure::BadChromiumVar(named));
                }
                named
            }
            None => find_or_install(&CHROMIUM, root)?,
        };
        let version = version_of(&chromium)?;
        println!("xtask: chromium {} ({version})", chromium.display());
        Ok(Prepared {
            chromium,
            extra_path,
        })
    }

    fn ensure_redis(&self, redis_server: &Path) -> Result<(), Failure> {
        let port = self.redis_port;
        if redis_answers(port) {
            println!("xtask: redis answering on 127.0.0.1:{port}");
            return Ok(());
        }
        let (dir, log) = match &self.redis_dir {
            Some(dir) => (dir.clone(), dir.join("redis.log")),
            None => (
                PathBuf::from("/var/lib/redis"),
                PathBuf::from("/var/log/redis/ci.log"),
            ),
        };
        let redis_failure = |detail: String| Failure::Redis { port, detail };
        for needed in [dir.as_path(), log.parent().unwrap_or(Path::new("/"))] {
            std::fs::create_dir_all(needed)
                .map_err(|e| redis_failure(format!("cannot create {}: {e}", needed.display())))?;
        }
        println!(
            "xtask: nothing answers on 127.0.0.1:{port}; starting {} (log {})",
            redis_server.display(),
            log.display()
        );
        // The machine's own command (rust-svc), on the port asked for.
        let status = Command::new(redis_server)
            .args([
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "-::1",
                "--port",
            ])
            .arg(port.to_string())
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| redis_failure(format!("cannot run {}: {e}", redis_server.display())))?;
        if !status.success() {
            return Err(redis_failure(format!(
                "{} exited with {status}; see {}",
                redis_server.display(),
                log.display()
            )));
        }
        let deadline = Instant::now() + REDIS_START_DEADLINE;
        while Instant::now() < deadline {
            if redis_answers(port) {
                println!("xtask: redis answering on 127.0.0.1:{port}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(redis_failure(format!(
            "started, but no PONG within {} s; see {}",
            REDIS_START_DEADLINE.as_secs(),
            log.display()
        )))
    }
}

impl Prepared {
    /// Hands what was found to the suite: `CHROMIUM_BIN`, and PATH extended with the
    /// directories of programs found off it.
    pub fn apply(&self, command: &mut Command) {
        command.env(CHROMIUM_VAR, &self.chromium);
        if !self.extra_path.is_empty() {
            let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            dirs.extend(self.extra_path.iter().cloned());
            if let Ok(path) = std::env::join_paths(dirs) {
                command.env("PATH", path);
            }
        }
    }
}

/// PING → +PONG on 127.0.0.1:`port`, within a second or two.
fn redis_answers(port: u16) -> bool {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 16];
    let mut read = 0;
    while read < 5 {
        match stream.read(&mut reply[read..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => read += n,
        }
    }
    reply.starts_with(b"+PONG")
}

/// The program on PATH, else where Debian puts it, else installed (root) — or the command to
/// install it.
fn find_or_install(requirement: &Requirement, root: bool) -> Result<PathBuf, Failure> {
    if let Some(found) = find(requirement) {
        return Ok(found);
    }
    let program = requirement.names[0];
    let command = install_command(requirement.packages);
    if !root {
        return Err(Failure::NotRoot { program, command });
    }
    println!("xtask: {program} is missing; running {command}");
    apt_get(&["update", "-qq"]).map_err(|detail| Failure::Install { program, detail })?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(requirement.packages);
    apt_get(&install).map_err(|detail| Failure::Install { program, detail })?;
    find(requirement).ok_or_else(|| Failure::Install {
        program,
        detail: format!(
            "apt-get succeeded but neither PATH nor {} has it",
            requirement.debian_path
        ),
    })
}

fn find(requirement: &Requirement) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    requirement
        .names
        .iter()
        .find_map(|name| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|c| is_executable(c))
        })
        .or_else(|| {
            let debian = PathBuf::from(requirement.debian_path);
            is_executable(&debian).then_some(debian)
        })
}

/// The exact command a root user runs to install `packages`.
fn install_command(packages: &[&str]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Runs `apt-get ARGS` with the system's PATH (dpkg needs it, whatever ours is).
fn apt_get(args: &[&str]) -> Result<(), String> {
    let apt_get = ["/usr/bin/apt-get", "/bin/apt-get"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| is_executable(p))
        .ok_or("this machine has no apt-get (a Debian machine is expected)")?;
    let status = Command::new(&apt_get)
        .args(args)
        .env("PATH", system_path())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", apt_get.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("apt-get {} exited with {status}", args.join(" ")))
    }
}

/// `PROGRAM --version`'s first line; a program that cannot say it is broken.
fn version_of(program: &Path) -> Result<String, Failure> {
    let broken = |detail: String| Failure::Broken {
        program: program.to_path_buf(),
        detail,
    };
    let output = Command::new(program)
        .arg("--version")
        .env("PATH", system_path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| broken(e.to_string()))?;
    if !output.status.success() {
        return Err(broken(format!(
            "--version exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// Our PATH followed by the system's directories: wrappers such as Debian's
/// `/usr/bin/chromium` (a shell script) need the usual tools.
fn system_path() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(std::env::split_paths(SYSTEM_PATH));
    std::env::join_paths(dirs).unwrap_or_else(|_| SYSTEM_PATH.into())
}

fn on_path(program: &Path) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    program
        .parent()
        .is_some_and(|parent| std::env::split_paths(&path).any(|dir| dir == parent))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The effective user owns its `/proc/self`.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_command_names_every_package_and_runs_unattended() {
        assert_eq!(
            install_command(CHROMIUM.packages),
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends chromium fonts-liberation"
        );
    }

    #[test]
    fn not_root_says_exactly_what_to_run() {
        let failure = Failure::NotRoot {
            program: "chromium",
            command: install_command(CHROMIUM.packages),
        };
        let text = failure.to_string();
        assert!(
            text.contains("as root, run:\n    apt-get update && "),
            "{text}"
        );
        assert!(text.contains("chromium fonts-liberation"), "{text}");
    }
}
