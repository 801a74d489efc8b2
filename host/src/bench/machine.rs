//! Where a bench ran, so that figures from different machines are never
//! mixed up: the CPU, the widest vector instructions it has and the ones the
//! matrix products use, cores and threads.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    /// `model name` of /proc/cpuinfo (empty elsewhere).
    pub cpu: String,
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
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, name)| name.trim().to_string())
            .unwrap_or_default();
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
            isa: isa.into(),
            avx512_bf16: cpuinfo_flag(&cpuinfo, "avx512_bf16"),
            amx: cpuinfo_flag(&cpuinfo, "amx_tile"),
            gemm_kernels: gemm_kernels.into(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: candle_core::utils::get_num_threads(),
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
        format!(
            "machine: {} — {}{}, {} cores, {} threads; matmul kernels {}",
            if self.cpu.is_empty() {
                "unknown CPU"
            } else {
                &self.cpu
            },
            self.isa,
            if extensions.is_empty() {
                String::new()
            } else {
                format!(" with {}", extensions.join(", "))
            },
            self.cores,
            self.threads,
            self.gemm_kernels
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_are_whole_words() {
        let cpuinfo = "model name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n";
        assert!(cpuinfo_flag(cpuinfo, "avx512_bf16"));
        assert!(cpuinfo_flag(cpuinfo, "avx2"));
        assert!(!cpuinfo_flag(cpuinfo, "avx512"));
        assert!(!cpuinfo_flag(cpuinfo, "amx_tile"));
        assert!(!cpuinfo_flag("", "avx2"));
    }
}
