//! What the benchmark reads from and asks of this machine: the open-file limit, a process's
//! resident memory and CPU time from `/proc`, and the CPU model for the report.
//!
//! Linux only (`/proc`); the parsers are pure functions over the files' text.

use std::path::Path;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use serde::Serialize;

/// Raises the soft open-file limit to the hard limit, so that thousands of connections fit.
/// Answers the soft limit in force afterwards (inherited by a core the benchmark spawns).
pub fn raise_open_file_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    let wanted = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if limit.current != limit.maximum
        && let Err(error) = setrlimit(Resource::Nofile, wanted)
    {
        tracing::warn!(%error, "could not raise the open-file limit");
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Memory and CPU time of a process at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessSample {
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
}

impl ProcessSample {
    /// Reads `/proc/<pid>/status` and `/proc/<pid>/stat`.
    pub fn of(pid: u32) -> std::io::Result<Self> {
        Self::read(&Path::new("/proc").join(pid.to_string()))
    }

    /// This process.
    pub fn own() -> std::io::Result<Self> {
        Self::read(Path::new("/proc/self"))
    }

    fn read(dir: &Path) -> std::io::Result<Self> {
        let invalid = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}/{what} is not in the expected format", dir.display()),
            )
        };
        let status = std::fs::read_to_string(dir.join("status"))?;
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        let rss_kib = vm_rss_kib(&status).ok_or_else(|| invalid("status"))?;
        let ticks = cpu_ticks(&stat).ok_or_else(|| invalid("stat"))?;
        // Clock ticks per second (`sysconf(_SC_CLK_TCK)`), 100 on every common Linux.
        let per_second = rustix::param::clock_ticks_per_second().max(1);
        Ok(Self {
            rss_kib,
            cpu_seconds: ticks as f64 / per_second as f64,
        })
    }
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// `utime + stime` (clock ticks) of a `/proc/<pid>/stat` line. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted from its last `)`.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The machine a run was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// `model name` of `/proc/cpuinfo`.
    pub cpu: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| cpu_model(&text))
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
        }
    }
}

fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read_from_the_vmrss_line() {
        let status = "Name:\tworkerpush\nVmPeak:\t  99999 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_kib(status), Some(12345));
        assert_eq!(vm_rss_kib("Name:\tx\n"), None);
        assert_eq!(vm_rss_kib("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn cpu_ticks_count_fields_after_the_command_name() {
        // A command name with spaces and a parenthesis must not shift the fields.
        let stat = "4242 (work (er) push) S 1 4242 4242 0 -1 4194304 500 0 0 0 \
                    170 30 0 0 20 0 3 0 100 1000000 300 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(200));
        assert_eq!(cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = ProcessSample::own().unwrap();
        assert!(sample.rss_kib > 0);
        assert!(sample.cpu_seconds >= 0.0);
    }

    #[test]
    fn cpu_model_comes_from_the_first_model_name() {
        let text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu\n";
        assert_eq!(
            cpu_model(text).as_deref(),
            Some("Intel(R) Xeon(R) Processor")
        );
    }
}
