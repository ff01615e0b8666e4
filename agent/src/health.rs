//! Host facts and health, read with sysinfo.
//!
//! Reading the host ([`HealthSampler::sample`]) is separate from building the
//! wire report ([`to_report`]), a pure function that is unit-tested. sysinfo
//! gives CPU use and load as floats; they are turned into integers (permille,
//! milli-load) here, at the edge, and rounded once.

use std::path::Path;

use ferry_common::wire::{HealthReport, HostFacts};
use ferry_common::UnixMillis;
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// One reading of the host, as sysinfo reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSample {
    /// CPU use over all cores, percent (0.0..=100.0; sysinfo may overshoot).
    pub cpu_percent: f32,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Installed memory, bytes.
    pub memory_total: u64,
    /// Bytes used on the root filesystem.
    pub disk_used: u64,
    /// Size of the root filesystem.
    pub disk_total: u64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
}

/// Builds the wire report from a sample. Pure.
pub fn to_report(
    sample: &HostSample,
    at: UnixMillis,
    sessions: u32,
    draining: bool,
) -> HealthReport {
    let cpu = if sample.cpu_percent.is_finite() {
        (f64::from(sample.cpu_percent) * 10.0)
            .round()
            .clamp(0.0, 1000.0) as u32
    } else {
        0
    };
    let milli = |l: f64| {
        if l.is_finite() {
            (l * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32
        } else {
            0
        }
    };
    HealthReport {
        at,
        cpu_permille: cpu,
        memory_used_bytes: sample.memory_used.min(sample.memory_total),
        memory_total_bytes: sample.memory_total,
        disk_used_bytes: sample.disk_used.min(sample.disk_total),
        disk_total_bytes: sample.disk_total,
        load_milli: [
            milli(sample.load[0]),
            milli(sample.load[1]),
            milli(sample.load[2]),
        ],
        sessions,
        draining,
    }
}

/// Keeps sysinfo's state between samples: CPU use is the difference between
/// two readings, so the sampler lives as long as the agent.
pub struct HealthSampler {
    /// CPU and memory readings.
    system: System,
    /// Mounted filesystems.
    disks: Disks,
}

impl Default for HealthSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthSampler {
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            system,
            disks: Disks::new_with_refreshed_list(),
        }
    }

    /// Reads the host now. Blocking (reads /proc and statfs): call it from
    /// `spawn_blocking`.
    pub fn sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.disks.refresh(true);
        let (disk_used, disk_total) = root_disk(&self.disks);
        let load = System::load_average();
        HostSample {
            cpu_percent: self.system.global_cpu_usage(),
            memory_used: self.system.used_memory(),
            memory_total: self.system.total_memory(),
            disk_used,
            disk_total,
            load: [load.one, load.five, load.fifteen],
        }
    }
}

fn root_disk(disks: &Disks) -> (u64, u64) {
    disks
        .list()
        .iter()
        .find(|d| d.mount_point() == Path::new("/"))
        .map(|d| {
            let total = d.total_space();
            (total.saturating_sub(d.available_space()), total)
        })
        .unwrap_or((0, 0))
}

/// Static facts about the host for `Hello`. Blocking.
pub fn host_facts() -> HostFacts {
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    facts_from(
        System::host_name(),
        System::long_os_version().or_else(System::name),
        System::kernel_version(),
        system.cpus().len(),
        system.total_memory(),
    )
}

/// Builds `HostFacts`, bounding every text field to the wire's text limit. Pure.
pub fn facts_from(
    hostname: Option<String>,
    os: Option<String>,
    kernel: Option<String>,
    vcpus: usize,
    memory_bytes: u64,
) -> HostFacts {
    let text = |s: Option<String>| {
        let mut s = s.unwrap_or_else(|| "unknown".to_owned());
        truncate(&mut s, ferry_common::limits::MAX_TEXT_LEN);
        s
    };
    HostFacts {
        hostname: text(hostname),
        os: text(os),
        kernel: text(kernel),
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        memory_bytes,
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HostSample {
        HostSample {
            cpu_percent: 37.46,
            memory_used: 3 << 30,
            memory_total: 8 << 30,
            disk_used: 10 << 30,
            disk_total: 100 << 30,
            load: [0.5, 1.25, 2.0004],
        }
    }

    #[test]
    fn report_is_converted_to_integers() {
        let r = to_report(&sample(), UnixMillis(5), 3, true);
        assert_eq!(
            r,
            HealthReport {
                at: UnixMillis(5),
                cpu_permille: 375,
                memory_used_bytes: 3 << 30,
                memory_total_bytes: 8 << 30,
                disk_used_bytes: 10 << 30,
                disk_total_bytes: 100 << 30,
                load_milli: [500, 1250, 2000],
                sessions: 3,
                draining: true,
            }
        );
    }

    #[test]
    fn odd_readings_are_clamped() {
        let mut s = sample();
        s.cpu_percent = 104.0;
        s.memory_used = 9 << 30;
        s.load = [f64::NAN, -1.0, 1e12];
        let r = to_report(&s, UnixMillis(0), 0, false);
        assert_eq!(r.cpu_permille, 1000);
        assert_eq!(r.memory_used_bytes, r.memory_total_bytes);
        assert_eq!(r.load_milli, [0, 0, u32::MAX]);
        s.cpu_percent = f32::NAN;
        assert_eq!(to_report(&s, UnixMillis(0), 0, false).cpu_permille, 0);
    }

    #[test]
    fn facts_are_bounded() {
        let f = facts_from(None, Some("é".repeat(2000)), Some("6.1".into()), 4, 1 << 30);
        assert_eq!(f.hostname, "unknown");
        assert!(f.os.len() <= ferry_common::limits::MAX_TEXT_LEN);
        assert_eq!(f.vcpus, 4);
    }

    #[test]
    fn the_real_host_can_be_read() {
        let facts = host_facts();
        assert!(facts.vcpus >= 1);
        assert!(facts.memory_bytes > 0);
        let mut sampler = HealthSampler::new();
        let s = sampler.sample();
        assert!(s.memory_total > 0);
    }
}
