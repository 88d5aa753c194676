//! The statistics of `phalanx bench`: medians and paired ratios over rounds, each round's
//! two runs back to back.

/// The mean of `a[i] / b[i]` over the rounds and its 95% confidence interval (Student's
/// t with n - 1 degrees of freedom; the mean alone for one round).
pub(crate) fn paired_mean_ci95(a: &[f64], b: &[f64]) -> (f64, [f64; 2]) {
    let r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    if r.len() < 2 {
        return (mean, [mean, mean]);
    }
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    // Two-sided 95% quantiles of Student's t for 1..=30 degrees of freedom, then the
    // normal's.
    const T975: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    let t = T975.get(r.len() - 2).copied().unwrap_or(1.96);
    let half = t * (var / n).sqrt();
    (mean, [mean - half, mean + half])
}

/// The median of `a[i] / b[i]` over the rounds.
pub(crate) fn paired_median(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paired_interval_is_students_t_over_the_rounds() {
        // Ratios 0.98, 1.00, 1.02: mean 1.00, sd 0.02, t(0.975, 2) = 4.303.
        let (mean, ci) = paired_mean_ci95(&[0.98, 1.00, 1.02], &[1.0, 1.0, 1.0]);
        assert!((mean - 1.0).abs() < 1e-12);
        let half = 4.303 * 0.02 / 3f64.sqrt();
        assert!((ci[0] - (1.0 - half)).abs() < 1e-9 && (ci[1] - (1.0 + half)).abs() < 1e-9);
        assert_eq!(paired_mean_ci95(&[2.0], &[4.0]), (0.5, [0.5, 0.5]));
        assert_eq!(paired_median(&[1.0, 3.0, 8.0], &[1.0, 1.0, 2.0]), 3.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
