//! Failure causes, their rates and what each looks like to the cluster.
//!
//! The rates are the Llama 3 405B pre-training's unexpected interruptions: 419 in 54 days
//! on 16,384 H100s ("The Llama 3 Herd of Models", Meta 2024, Table 5). Every cause scales
//! with the number of GPUs (each count is a rate per GPU-hour), which is how the paper's
//! hardware causes behave and an assumption for the software and network ones.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::config::Failures;

/// A cause of interruption (the rows of the Llama 3 table).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    FaultyGpu,
    GpuHbm3,
    SoftwareBug,
    NetworkSwitchCable,
    HostMaintenance,
    GpuSram,
    GpuSystemProcessor,
    Nic,
    NcclWatchdog,
    SilentDataCorruption,
    GpuThermal,
    Ssd,
    PowerSupply,
    ServerChassis,
    IoExpansionBoard,
    Dependency,
    Cpu,
    SystemMemory,
}

/// How a failure shows itself, which decides how it is detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Symptom {
    /// The process dies or its device reports a fatal error: peers see broken links.
    Crash,
    /// The process or device stops (or the host's network goes): no heartbeats, no errors.
    Hang,
    /// The device reports an uncorrectable error or the host is taken away: the worker
    /// drains itself.
    Drain,
    /// A collective hangs with every process alive.
    CollectiveHang,
    /// Bits flip; replicas diverge.
    Corruption,
    /// Steps slow down by a factor.
    Straggler,
    /// A checkpoint write fails.
    Storage,
}

/// What a failed component takes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loses {
    /// One host, until it is repaired.
    Host,
    /// One process (a restart brings the host back).
    Process,
    /// Nothing: the hardware stays.
    Nothing,
}

pub struct CauseInfo {
    pub cause: Cause,
    pub label: &'static str,
    /// Interruptions in 54 days on 16,384 GPUs (Llama 3 405B, Table 5).
    pub llama3_count: f64,
    pub symptom: Symptom,
    pub loses: Loses,
}

pub const LLAMA3_DAYS: f64 = 54.0;
pub const LLAMA3_GPUS: f64 = 16_384.0;
pub const LLAMA3_UNEXPECTED: f64 = 419.0;
pub const LLAMA3_PLANNED: f64 = 47.0;

use Cause::*;
pub const CAUSES: &[CauseInfo] = &[
    ci(FaultyGpu, "faulty GPU", 148.0, Symptom::Crash, Loses::Host),
    ci(
        GpuHbm3,
        "GPU HBM3 memory",
        72.0,
        Symptom::Drain,
        Loses::Host,
    ),
    ci(
        SoftwareBug,
        "software bug",
        54.0,
        Symptom::Crash,
        Loses::Process,
    ),
    ci(
        NetworkSwitchCable,
        "network switch/cable",
        35.0,
        Symptom::Hang,
        Loses::Host,
    ),
    ci(
        HostMaintenance,
        "host maintenance (unplanned)",
        32.0,
        Symptom::Drain,
        Loses::Host,
    ),
    ci(
        GpuSram,
        "GPU SRAM memory",
        19.0,
        Symptom::Drain,
        Loses::Host,
    ),
    ci(
        GpuSystemProcessor,
        "GPU system processor",
        17.0,
        Symptom::Hang,
        Loses::Host,
    ),
    ci(Nic, "NIC", 7.0, Symptom::Hang, Loses::Host),
    ci(
        NcclWatchdog,
        "NCCL watchdog timeout",
        7.0,
        Symptom::CollectiveHang,
        Loses::Nothing,
    ),
    ci(
        SilentDataCorruption,
        "silent data corruption",
        6.0,
        Symptom::Corruption,
        Loses::Host,
    ),
    ci(
        GpuThermal,
        "GPU thermal interface + sensor",
        6.0,
        Symptom::Straggler,
        Loses::Host,
    ),
    ci(Ssd, "SSD", 3.0, Symptom::Storage, Loses::Nothing),
    ci(
        PowerSupply,
        "power supply",
        3.0,
        Symptom::Crash,
        Loses::Host,
    ),
    ci(
        ServerChassis,
        "server chassis",
        2.0,
        Symptom::Crash,
        Loses::Host,
    ),
    ci(
        IoExpansionBoard,
        "IO expansion board",
        2.0,
        Symptom::Crash,
        Loses::Host,
    ),
    ci(
        Dependency,
        "dependency",
        2.0,
        Symptom::Crash,
        Loses::Process,
    ),
    ci(Cpu, "CPU", 2.0, Symptom::Crash, Loses::Host),
    ci(
        SystemMemory,
        "system memory",
        2.0,
        Symptom::Crash,
        Loses::Host,
    ),
];

const fn ci(
    cause: Cause,
    label: &'static str,
    llama3_count: f64,
    symptom: Symptom,
    loses: Loses,
) -> CauseInfo {
    CauseInfo {
        cause,
        label,
        llama3_count,
        symptom,
        loses,
    }
}

pub fn info(c: Cause) -> &'static CauseInfo {
    // CAUSES lists every variant in declaration order.
    &CAUSES[c as usize]
}

/// Per-cause rates for a run, per second for the whole job.
#[derive(Debug, Clone)]
pub struct Rates {
    /// (cause, rate per second) with a positive rate.
    pub per_cause: Vec<(Cause, f64)>,
    pub total_per_s: f64,
    pub planned_per_s: f64,
}

impl Rates {
    pub fn new(f: &Failures, gpus: u64) -> Rates {
        let seconds = LLAMA3_DAYS * 86_400.0;
        let mut per_cause = Vec::new();
        for c in CAUSES {
            let count = f
                .counts
                .iter()
                .rev()
                .find(|o| o.cause == c.cause)
                .map_or(c.llama3_count, |o| o.count);
            let rate = count / seconds / LLAMA3_GPUS * gpus as f64 * f.scale;
            if rate > 0.0 {
                per_cause.push((c.cause, rate));
            }
        }
        let total_per_s = per_cause.iter().map(|(_, r)| r).sum();
        Rates {
            per_cause,
            total_per_s,
            planned_per_s: f.planned_per_day / 86_400.0,
        }
    }

    /// The cause whose cumulative rate interval holds `u` in [0, 1).
    pub fn pick(&self, u: f64) -> Cause {
        let mut x = u * self.total_per_s;
        for (c, r) in &self.per_cause {
            if x < *r {
                return *c;
            }
            x -= r;
        }
        self.per_cause.last().map_or(FaultyGpu, |(c, _)| *c)
    }

    /// Mean time between unexpected interruptions, s.
    pub fn mtbf_s(&self) -> f64 {
        if self.total_per_s > 0.0 {
            1.0 / self.total_per_s
        } else {
            f64::INFINITY
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_sums_to_the_papers_419_and_lists_every_cause_in_order() {
        let total: f64 = CAUSES.iter().map(|c| c.llama3_count).sum();
        assert_eq!(total, LLAMA3_UNEXPECTED);
        for (i, c) in CAUSES.iter().enumerate() {
            assert_eq!(c.cause as usize, i, "{}", c.label);
        }
    }

    #[test]
    fn rates_at_the_papers_scale_give_419_in_54_days() {
        let r = Rates::new(&Failures::default(), 16_384);
        let expected = r.total_per_s * LLAMA3_DAYS * 86_400.0;
        assert!((expected - 419.0).abs() < 1e-9, "{expected}");
        assert_eq!(r.pick(0.0), FaultyGpu);
        assert_eq!(r.pick(0.999_999_9), SystemMemory);
    }
}
