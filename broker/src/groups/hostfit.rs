//! Whether a host is as large as its group's spec says.
//!
//! A group's spec (`office-4c8g`) promises its users a host size. An agent
//! joining the group reports what its host really has (`HostFacts`); a host
//! smaller than the spec still joins (operators decide what to do with it),
//! but the group records it as flagged so the shortfall is seen.

use ferry_common::wire::HostFacts;

/// One GiB, the unit specs name memory in.
const GIB: u64 = 1 << 30;

/// Share of the spec's memory, in percent, a host must report to fit.
///
/// A VM sold as 8 GiB reports less than that as total memory (firmware and
/// the kernel keep some before the OS counts it; about 3-5% on common
/// clouds), so a strict comparison would flag every correctly sized host.
/// A host below 90% is missing memory, not seeing the usual reservation.
pub const MEMORY_FIT_PERCENT: u64 = 90;

/// The host size a spec stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecSize {
    /// Virtual CPUs the host must have.
    pub vcpus: u32,
    /// Memory the host must have, in GiB.
    pub memory_gib: u32,
}

/// The spec catalog of SPEC section 2: spec name -> host size. Specs not
/// listed are not checked (their size is not known to the broker).
const CATALOG: &[(&str, SpecSize)] = &[
    (
        "office-4c8g",
        SpecSize {
            vcpus: 4,
            memory_gib: 8,
        },
    ),
    (
        "design-8c16g",
        SpecSize {
            vcpus: 8,
            memory_gib: 16,
        },
    ),
    (
        "gpu-14c93g",
        SpecSize {
            vcpus: 14,
            memory_gib: 93,
        },
    ),
];

/// The size of `spec`, when it is in the catalog.
pub fn spec_size(spec: &str) -> Option<SpecSize> {
    CATALOG
        .iter()
        .find(|(name, _)| *name == spec)
        .map(|(_, size)| *size)
}

/// `None` when `facts` fit `spec` (or the spec is unknown); otherwise what
/// the host has and what the spec needs, for the group's events.
pub fn shortfall(spec: &str, facts: &HostFacts) -> Option<String> {
    let need = spec_size(spec)?;
    let need_memory = u64::from(need.memory_gib) * GIB;
    let cpu_short = facts.vcpus < need.vcpus;
    // u128: no overflow for any reported byte count.
    let memory_short = u128::from(facts.memory_bytes) * 100
        < u128::from(need_memory) * u128::from(MEMORY_FIT_PERCENT);
    if !cpu_short && !memory_short {
        return None;
    }
    let mut missing = Vec::new();
    if cpu_short {
        missing.push("vCPUs");
    }
    if memory_short {
        missing.push("memory");
    }
    Some(format!(
        "has {} vCPU / {} but spec {spec} needs {} vCPU / {} GiB (short of {})",
        facts.vcpus,
        memory_text(facts.memory_bytes),
        need.vcpus,
        need.memory_gib,
        missing.join(" and ")
    ))
}

/// Memory in GiB with two decimals, computed exactly (no floats).
fn memory_text(bytes: u64) -> String {
    let hundredths = u128::from(bytes) * 100 / u128::from(GIB);
    format!("{}.{:02} GiB", hundredths / 100, hundredths % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(vcpus: u32, memory_bytes: u64) -> HostFacts {
        HostFacts {
            hostname: "h".into(),
            os: "Debian".into(),
            kernel: "6.1".into(),
            vcpus,
            memory_bytes,
        }
    }

    #[test]
    fn the_catalog_sizes() {
        assert_eq!(
            spec_size("office-4c8g"),
            Some(SpecSize {
                vcpus: 4,
                memory_gib: 8
            })
        );
        assert_eq!(
            spec_size("design-8c16g"),
            Some(SpecSize {
                vcpus: 8,
                memory_gib: 16
            })
        );
        assert_eq!(
            spec_size("gpu-14c93g"),
            Some(SpecSize {
                vcpus: 14,
                memory_gib: 93
            })
        );
        assert_eq!(spec_size("custom-2c4g"), None);
        assert_eq!(spec_size(""), None);
    }

    #[test]
    fn hosts_at_or_above_the_spec_fit() {
        assert_eq!(shortfall("office-4c8g", &facts(4, 8 * GIB)), None);
        assert_eq!(shortfall("office-4c8g", &facts(16, 64 * GIB)), None);
        // A correctly sized VM reports a little less than its nominal memory.
        assert_eq!(
            shortfall("office-4c8g", &facts(4, 8 * GIB * 96 / 100)),
            None
        );
        // Exactly at the tolerance still fits; one byte below does not.
        let edge = (8 * GIB * MEMORY_FIT_PERCENT).div_ceil(100);
        assert_eq!(shortfall("office-4c8g", &facts(4, edge)), None);
        assert!(shortfall("office-4c8g", &facts(4, edge - 1)).is_some());
    }

    #[test]
    fn a_small_host_is_described_with_what_it_has_and_what_is_needed() {
        let m = shortfall("design-8c16g", &facts(2, 4 * GIB)).expect("short");
        assert_eq!(
            m,
            "has 2 vCPU / 4.00 GiB but spec design-8c16g needs 8 vCPU / 16 GiB \
             (short of vCPUs and memory)"
        );
        let m = shortfall("gpu-14c93g", &facts(14, 64 * GIB + GIB / 2)).expect("short");
        assert!(
            m.contains("64.50 GiB") && m.ends_with("(short of memory)"),
            "{m}"
        );
        let m = shortfall("office-4c8g", &facts(3, 8 * GIB)).expect("short");
        assert!(m.ends_with("(short of vCPUs)"), "{m}");
    }

    #[test]
    fn unknown_specs_are_not_checked() {
        assert_eq!(shortfall("custom-64c512g", &facts(1, 1)), None);
        assert_eq!(shortfall("office-4c8g", &facts(4, u64::MAX)), None);
    }
}
