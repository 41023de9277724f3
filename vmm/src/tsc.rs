//! The host's TSC frequency, passed to guests so they skip TSC calibration.
//!
//! Under TCG on a loaded host, a guest calibrating its TSC against emulated timers can
//! hang or pick a wildly wrong frequency. `tsc_early_khz` with `tsc=reliable` and a
//! matching `lpj` avoids calibration altogether. The value must come from the host it
//! runs on, never a constant.

/// Kernel HZ of Debian's cloud kernel, for `lpj` (loops per jiffy = TSC ticks per tick).
const GUEST_HZ: u64 = 250;

/// Host TSC frequency in kHz.
pub fn host_tsc_khz() -> Result<u64, String> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = s.trim().parse() {
            return Ok(khz);
        }
    }
    let cpuinfo =
        std::fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    parse_cpuinfo_mhz(&cpuinfo)
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .ok_or_else(|| "no 'cpu MHz' line in /proc/cpuinfo".to_string())
}

fn parse_cpuinfo_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
}

/// Kernel command-line parameters that pin the guest's TSC to `khz`.
pub fn kernel_params(khz: u64) -> String {
    format!(
        "tsc_early_khz={khz} tsc=reliable lpj={} no_timer_check",
        khz * 1000 / GUEST_HZ
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_mhz() {
        let info = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.148\n";
        assert_eq!(parse_cpuinfo_mhz(info), Some(2596.148));
        assert_eq!(parse_cpuinfo_mhz("nothing"), None);
    }

    #[test]
    fn params_carry_khz_and_lpj() {
        assert_eq!(
            kernel_params(2_596_148),
            "tsc_early_khz=2596148 tsc=reliable lpj=10384592 no_timer_check"
        );
    }

    #[test]
    fn this_host_has_a_plausible_frequency() {
        let khz = host_tsc_khz().unwrap();
        assert!((100_000..10_000_000).contains(&khz), "{khz}");
    }
}
