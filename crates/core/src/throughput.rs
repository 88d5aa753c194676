//! The throughput and MFU a job's rank 0 reports with its progress: checked before the
//! replicated state keeps it (the newest one only, so it stays bounded). A report that
//! fails the check is dropped and the outcome says why; the progress it came with counts.
use phalanx_proto::Throughput;

/// Why a report cannot be kept, if it cannot: a source longer than
/// [`Throughput::SOURCE_BYTES_MAX`], devices that are not the plan's ranks, a step past
/// the job's end, no measured step, or figures that contradict each other.
pub fn check(t: &Throughput, ranks: usize, job_steps: u64) -> Result<(), String> {
    if t.peak_source.len() > Throughput::SOURCE_BYTES_MAX {
        return Err(format!(
            "peak source of {} bytes (at most {})",
            t.peak_source.len(),
            Throughput::SOURCE_BYTES_MAX
        ));
    }
    if t.devices as usize != ranks {
        return Err(format!("{} devices for a plan of {ranks} ranks", t.devices));
    }
    if t.step > job_steps {
        return Err(format!("step {} past the job's {job_steps} steps", t.step));
    }
    if t.steps == 0 {
        return Err("measured over no step".into());
    }
    // achieved = tokens/s × FLOPs/token, within the rounding of both to integers.
    let product = t.tokens_per_s as f64 * t.flops_per_token as f64 / 1e6;
    let slack = (t.flops_per_token as f64 / 1e6).max(1.0) + product * 1e-6;
    if (product - t.achieved_mflops as f64).abs() > slack {
        return Err(format!(
            "{} MFLOP/s achieved is not {} tokens/s × {} FLOPs/token",
            t.achieved_mflops, t.tokens_per_s, t.flops_per_token
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Throughput {
        Throughput {
            step: 10,
            steps: 9,
            tokens_per_s: 10_000,
            flops_per_token: 5_000_000,
            achieved_mflops: 50_000,
            devices: 2,
            peak_mflops_per_device: 100_000,
            peak_source: "measured".into(),
            mfu_ppm: 250_000,
        }
    }

    #[test]
    fn a_consistent_report_is_kept_and_each_inconsistency_is_named() {
        assert_eq!(check(&report(), 2, 20), Ok(()));
        assert!((report().mfu() - 0.25).abs() < 1e-12);
        type Spoil = fn(&mut Throughput);
        let cases: [(Spoil, &str); 5] = [
            (
                |t| t.peak_source = "x".repeat(300),
                "peak source of 300 bytes",
            ),
            (|t| t.devices = 3, "3 devices for a plan of 2 ranks"),
            (|t| t.step = 21, "step 21 past the job's 20 steps"),
            (|t| t.steps = 0, "measured over no step"),
            (
                |t| t.achieved_mflops = 60_000,
                "60000 MFLOP/s achieved is not",
            ),
        ];
        for (spoil, why) in cases {
            let mut t = report();
            spoil(&mut t);
            let e = check(&t, 2, 20).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn the_state_keeps_the_newest_report_and_drops_a_bad_one_but_not_its_progress() {
        use crate::state::{ClusterState, StateLimits};
        use phalanx_proto::{Command, DeviceSpec, Envelope};
        let mut s = ClusterState::new(StateLimits::default());
        let env = |id: &str, command: Command| Envelope {
            trace: None,
            request_id: id.into(),
            command,
        };
        for (i, w) in ["a", "b"].into_iter().enumerate() {
            let reg = Command::RegisterWorker {
                id: w.into(),
                address: format!("127.0.0.1:70{i}"),
                device: DeviceSpec::default(),
            };
            s.apply(i as u64 + 1, &env(w, reg));
        }
        let spec =
            crate::jobfile::parse_job_toml(&crate::jobfile::job_template("tiny", 20).unwrap())
                .unwrap();
        s.apply(3, &env("submit", Command::SubmitJob { spec }));
        let plan = s.job.as_ref().unwrap().plan.clone().unwrap();
        assert_eq!(plan.ranks.len(), 2);
        let progress = |step: u64, t: Throughput| Command::ReportProgress {
            worker: plan.ranks[0].clone(),
            epoch: plan.epoch,
            step,
            loss_millionths: None,
            compute_us: None,
            throughput: Some(t),
        };
        let out = s.apply(4, &env("p1", progress(10, report())));
        assert!(out.outcome.is_applied(), "{out:?}");
        assert_eq!(s.job.as_ref().unwrap().throughput, Some(report()));
        let bad = Throughput {
            devices: 5,
            ..report()
        };
        let out = s.apply(5, &env("p2", progress(11, bad)));
        assert!(out.outcome.is_applied(), "{out:?}");
        assert!(
            format!("{out:?}").contains("progress 11; throughput report dropped: 5 devices"),
            "{out:?}"
        );
        let job = s.job.as_ref().unwrap();
        assert_eq!(job.rank_steps[0], 11, "the progress counts");
        assert_eq!(job.throughput, Some(report()), "the bad report is not kept");
    }
}
