//! Which backups a retention policy keeps (keep-last, -hourly, -daily,
//! -weekly, -monthly, -yearly), with Proxmox Backup Server's semantics:
//! each rule, in that order, keeps the newest backup of each of its N
//! newest periods that no earlier rule has already covered; the rest go.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeepPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
}

impl KeepPolicy {
    /// A policy without rules keeps everything.
    pub fn keeps_all(&self) -> bool {
        *self == KeepPolicy::default()
    }
}

/// For each of `times` (any order), whether `policy` keeps that backup.
pub fn select(policy: &KeepPolicy, times: &[DateTime<Utc>]) -> Vec<bool> {
    if policy.keeps_all() {
        return vec![true; times.len()];
    }
    // Newest first.
    let mut order: Vec<usize> = (0..times.len()).collect();
    order.sort_by(|a, b| times[*b].cmp(&times[*a]));
    let mut mark: Vec<Option<bool>> = vec![None; times.len()];
    type Period = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);
    let rules: [(Option<u32>, Period); 6] = [
        (policy.keep_last, |_| (0, 0, 0, 0)),
        (policy.keep_hourly, |t| (t.year(), t.ordinal(), t.hour(), 0)),
        (policy.keep_daily, |t| (t.year(), t.ordinal(), 0, 0)),
        (policy.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        (policy.keep_monthly, |t| (t.year(), t.month(), 0, 0)),
        (policy.keep_yearly, |t| (t.year(), 0, 0, 0)),
    ];
    for (i, (keep, period)) in rules.into_iter().enumerate() {
        let Some(keep) = keep.filter(|k| *k > 0) else {
            continue;
        };
        // keep-last: every backup is its own period.
        let id = |n: usize| -> (i32, u32, u32, u32, usize) {
            let (a, b, c, d) = period(&times[n]);
            (a, b, c, d, if i == 0 { n } else { 0 })
        };
        let covered: HashSet<_> = order
            .iter()
            .filter(|n| mark[**n] == Some(true))
            .map(|n| id(*n))
            .collect();
        let mut kept = HashSet::new();
        for &n in &order {
            if mark[n].is_some() || covered.contains(&id(n)) {
                continue;
            }
            if kept.contains(&id(n)) {
                // An older backup of a period already kept by this rule.
                mark[n] = Some(false);
                continue;
            }
            if kept.len() >= keep as usize {
                break;
            }
            kept.insert(id(n));
            mark[n] = Some(true);
        }
    }
    mark.into_iter().map(|m| m == Some(true)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn an_empty_policy_keeps_all() {
        assert_eq!(select(&KeepPolicy::default(), &[t("2026-01-01T00:00:00Z")]), [true]);
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        let times = [
            t("2026-01-01T00:00:00Z"),
            t("2026-01-03T00:00:00Z"),
            t("2026-01-02T00:00:00Z"),
        ];
        let p = KeepPolicy {
            keep_last: Some(2),
            ..Default::default()
        };
        assert_eq!(select(&p, &times), [false, true, true]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_and_last_counts_first() {
        // Hourly backups over three days.
        let times: Vec<_> = (0..72)
            .map(|h| t("2026-03-01T00:30:00Z") + chrono::Duration::hours(h))
            .collect();
        let p = KeepPolicy {
            keep_last: Some(3),
            keep_daily: Some(2),
            ..Default::default()
        };
        let kept: Vec<_> = select(&p, &times)
            .into_iter()
            .zip(&times)
            .filter(|(k, _)| *k)
            .map(|(_, t)| t.to_rfc3339())
            .collect();
        // The three newest; their day (03-03) is covered, so daily keeps the
        // newest of 03-02 and of 03-01.
        assert_eq!(
            kept,
            [
                "2026-03-01T23:30:00+00:00",
                "2026-03-02T23:30:00+00:00",
                "2026-03-03T21:30:00+00:00",
                "2026-03-03T22:30:00+00:00",
                "2026-03-03T23:30:00+00:00",
            ]
        );
    }

    #[test]
    fn weekly_monthly_and_yearly_periods() {
        // Daily backups for two years.
        let times: Vec<_> = (0..730)
            .map(|d| t("2025-01-01T02:00:00Z") + chrono::Duration::days(d))
            .collect();
        let p = KeepPolicy {
            keep_weekly: Some(4),
            keep_monthly: Some(6),
            keep_yearly: Some(5),
            ..Default::default()
        };
        let keep = select(&p, &times);
        // 4 weeks, then 6 months not covered (Dec 2026 is, by the weeks), then
        // the years not covered: 2025 (2026 is).
        assert_eq!(keep.iter().filter(|k| **k).count(), 4 + 6 + 1);
        assert!(keep[729], "the newest is kept");
        assert!(keep[364], "the last of 2025 is kept");
        assert!(!keep[0], "the first is not");
    }
}
