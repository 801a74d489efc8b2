//! Where a bench ran, so that figures from different machines are never
//! mixed up: the CPU, the widest vector instructions it has and the ones the
//! matrix products use, cores and threads.

use serde::Serialize;

use super::peak::Peaks;

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    /// `model name` of /proc/cpuinfo (empty elsewhere).
    pub cpu: String,
    /// `cpu family` and `model` of /proc/cpuinfo: cloud machines often name
    /// only "AMD EPYC", and Zen 4 (family 25) runs AVX-512 at half the
    /// width of Zen 5 (family 26), so the same name can mean twice the
    /// matmul speed.
    pub family_model: Option<(u32, u32)>,
    /// The widest x86 level: `AVX-512`, `AVX2`, or `baseline`.
    pub isa: String,
    pub avx512_bf16: bool,
    pub amx: bool,
    /// The kernels gemm (candle's CPU matmul) dispatches to here.
    pub gemm_kernels: String,
    /// Logical CPUs this process may use.
    pub cores: usize,
    /// candle's worker threads.
    pub threads: usize,
    /// One core's best multiply-add rates, measured.
    pub peaks_per_core: Peaks,
}

/// The value of a `key : value` line of /proc/cpuinfo.
fn cpuinfo_value<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// A flag of /proc/cpuinfo (Linux); false elsewhere.
fn cpuinfo_flag(cpuinfo: &str, flag: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == flag))
}

impl Machine {
    pub(super) fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo_value(&cpuinfo, "model name")
            .unwrap_or_default()
            .to_string();
        let number = |key| cpuinfo_value(&cpuinfo, key)?.parse().ok();
        let family_model = number("cpu family").zip(number("model"));
        #[cfg(target_arch = "x86_64")]
        let (avx512, avx2) = (
            std::is_x86_feature_detected!("avx512f"),
            std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
        );
        #[cfg(not(target_arch = "x86_64"))]
        let (avx512, avx2) = (false, false);
        let isa = match (avx512, avx2) {
            (true, _) => "AVX-512",
            (false, true) => "AVX2",
            _ => "baseline",
        };
        // gemm picks its AVX-512 kernels at run time, but only where it was
        // built with its `x86-v4` feature (host/Cargo.toml enables it).
        let gemm_kernels = match (avx512, avx2) {
            (true, _) => "AVX-512 (x86-v4)",
            (false, true) => "AVX2+FMA (x86-v3)",
            _ => "portable",
        };
        Self {
            cpu,
            family_model,
            isa: isa.into(),
            avx512_bf16: cpuinfo_flag(&cpuinfo, "avx512_bf16"),
            amx: cpuinfo_flag(&cpuinfo, "amx_tile"),
            gemm_kernels: gemm_kernels.into(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: candle_core::utils::get_num_threads(),
            peaks_per_core: Peaks::measure(20_000_000),
        }
    }

    /// One line for the bench's header.
    pub(super) fn line(&self) -> String {
        let mut extensions = Vec::new();
        if self.avx512_bf16 {
            extensions.push("AVX512-BF16");
        }
        if self.amx {
            extensions.push("AMX");
        }
        let rate = |gflops: Option<f64>| gflops.map_or("none".into(), |r| format!("{r:.0}"));
        format!(
            "machine: {}{} — {}{}, {} cores, {} threads; matmul kernels {}; GFLOP/s per core: f32 FMA {}, bf16 dot {}",
            if self.cpu.is_empty() {
                "unknown CPU"
            } else {
                &self.cpu
            },
            self.family_model
                .map(|(family, model)| format!(" (family {family}, model {model})"))
                .unwrap_or_default(),
            self.isa,
            if extensions.is_empty() {
                String::new()
            } else {
                format!(" with {}", extensions.join(", "))
            },
            self.cores,
            self.threads,
            self.gemm_kernels,
            rate(self.peaks_per_core.f32_fma),
            rate(self.peaks_per_core.bf16_dot),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_are_whole_words() {
        let cpuinfo = "cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n";
        assert_eq!(cpuinfo_value(cpuinfo, "model name"), Some("Test CPU"));
        assert_eq!(cpuinfo_value(cpuinfo, "model"), Some("17"));
        assert_eq!(cpuinfo_value(cpuinfo, "cpu family"), Some("25"));
        assert!(cpuinfo_flag(cpuinfo, "avx512_bf16"));
        assert!(cpuinfo_flag(cpuinfo, "avx2"));
        assert!(!cpuinfo_flag(cpuinfo, "avx512"));
        assert!(!cpuinfo_flag(cpuinfo, "amx_tile"));
        assert!(!cpuinfo_flag("", "avx2"));
    }
}
