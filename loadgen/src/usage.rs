//! loadgen's own cost: CPU time and resident memory of this process, read
//! from `/proc/self` (Linux), so that a run shows what its clients cost the
//! machine the server under test shares (docs/loadgen.md).

use std::time::Duration;

/// The kernel's unit for the CPU times in `/proc/PID/stat` (`USER_HZ`,
/// 100 on every Linux architecture the project builds for).
const USER_HZ: u64 = 100;

/// CPU time (user + system) this process has used so far; `None` where
/// `/proc/self/stat` is unreadable (not Linux).
pub(crate) fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_ticks(&stat).map(|ticks| Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// utime + stime of a `/proc/PID/stat` line. The command name (field 2)
/// may hold spaces and parentheses, so fields are counted after its last
/// `)`: utime and stime are fields 14 and 15, the 12th and 13th after it.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in KiB.
pub(crate) fn memory_kib() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some((
        status_kib(&status, "VmRSS:")?,
        status_kib(&status, "VmHWM:")?,
    ))
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_lines() {
        let stat = "4242 (load gen) (x) S 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(stat), Some(325));
        assert_eq!(cpu_ticks("garbage"), None);
        let status = "Name:\tloadgen\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(status_kib(status, "VmHWM:"), Some(20480));
        assert_eq!(status_kib(status, "VmSwap:"), None);
        if cfg!(target_os = "linux") {
            assert!(cpu_time().is_some());
            let (rss, hwm) = memory_kib().unwrap();
            assert!(rss > 0 && hwm >= rss);
        }
    }
}
