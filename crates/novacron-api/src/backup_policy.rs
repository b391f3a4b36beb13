//! Backup policies: when to back up which VMs of a project, to which store,
//! and which of their backups to keep (Proxmox VE's backup jobs).
//!
//! The schedule is a cron expression in UTC: five fields (minute, hour,
//! day of month, month, day of week, Sunday = 0 or 7), or six with seconds
//! first, or `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::backup::KeepRules;
use crate::error::FieldError;
use crate::selector::LabelSelector;
use crate::types::Metadata;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupPolicy {
    pub metadata: Metadata,
    pub spec: BackupPolicySpec,
    #[serde(default)]
    pub status: BackupPolicyStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupPolicySpec {
    /// Cron expression, UTC (see the module's description).
    #[schema(max_length = 200)]
    pub schedule: String,
    /// The store backups go to (default `local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    /// The VMs of the policy's project it backs up, by label (`k=v`,
    /// `k!=v`, `k`, `!k`, comma-separated); empty: every VM of the project.
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub selector: String,
    /// After each run, each VM's backups in the store are pruned to these
    /// (none: every backup is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<KeepRules>,
    /// No scheduled runs while set (a run by hand still happens).
    #[serde(default)]
    pub suspended: bool,
}

impl BackupPolicySpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if Schedule::parse(&self.schedule)?.next_after(Utc::now()).is_none() {
            return Err(FieldError::new(
                "spec.schedule",
                format!("{:?} names no time to come", self.schedule),
            ));
        }
        if let Some(s) = &self.store {
            crate::validate::name("spec.store", s)?;
        }
        if self.selector.len() > 1000 {
            return Err(FieldError::new("spec.selector", "at most 1000 characters"));
        }
        LabelSelector::parse(&self.selector).map_err(|e| FieldError::new("spec.selector", e.message))?;
        if let Some(k) = &self.keep {
            k.validate()
                .map_err(|e| FieldError::new(format!("spec.keep.{}", e.field), e.message))?;
        }
        Ok(())
    }

    pub fn store(&self) -> &str {
        self.store.as_deref().unwrap_or(crate::backup::DEFAULT_STORE)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BackupPolicyStatus {
    /// The spec generation `next_run` was worked out for.
    #[serde(default)]
    pub observed_generation: u64,
    /// When the next scheduled run is due (none while suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<DateTime<Utc>>,
    /// The run going on now, as far as it has got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<PolicyRun>,
    /// The last run that finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<PolicyRun>,
}

/// One run of a policy: a backup of each VM it selected, then the prune.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyRun {
    pub started: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished: Option<DateTime<Utc>>,
    /// Started by hand (`backup-policy run`) rather than by the schedule.
    #[serde(default)]
    pub by_hand: bool,
    /// Each VM it backed up or tried to, in order.
    #[serde(default)]
    pub vms: Vec<PolicyRunVm>,
    /// Backups the retention removed after the run.
    #[serde(default)]
    pub pruned: Vec<String>,
    /// Whether every VM was backed up (and pruned), once finished.
    #[serde(default)]
    pub ok: bool,
}

impl PolicyRun {
    /// No VM of the run has an error (what `ok` says once it is finished).
    pub fn all_backed_up(&self) -> bool {
        self.vms.iter().all(|v| v.error.is_none())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyRunVm {
    pub vm: String,
    /// The backup taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// Why every block was read, for a full backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/backup-policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackupPolicy {
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub name: String,
    #[serde(default)]
    #[schema(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    pub project: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub spec: BackupPolicySpec,
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule(croner::Cron);

impl Schedule {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let bad = |why: String| FieldError::new("spec.schedule", why);
        if s.len() > 200 || s.trim().is_empty() {
            return Err(bad("a cron expression, e.g. \"0 2 * * *\" (02:00 UTC daily)".into()));
        }
        // Five fields, or six with seconds first; not seven (with years).
        if s.split_whitespace().count() > 6 {
            return Err(bad(format!("{s:?}: five fields (or six with seconds first)")));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(s)
            .map_err(|e| bad(format!("{s:?} is not a cron expression: {e}")))?;
        Ok(Schedule(cron))
    }

    /// The first time the schedule names after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.find_next_occurrence(&t, false).ok()
    }
}

impl FromStr for Schedule {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        Schedule::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn schedules_are_unix_cron_in_utc() {
        // 2026-12-05 is a Saturday; weekday 1 is Monday, as in crontab(5).
        let sat = at("2026-12-05T00:00:00Z");
        let next = |s: &str| Schedule::parse(s).ok().and_then(|c| c.next_after(sat));
        assert_eq!(next("0 3 * * 1"), Some(at("2026-12-07T03:00:00Z")));
        assert_eq!(next("0 2 * * *"), Some(at("2026-12-05T02:00:00Z")));
        assert_eq!(next("*/15 * * * *"), Some(at("2026-12-05T00:15:00Z")));
        assert_eq!(next("@daily"), Some(at("2026-12-06T00:00:00Z")));
        assert_eq!(next("*/10 * * * * *"), Some(at("2026-12-05T00:00:10Z")));
        for bad in ["", "61 * * * *", "every day", "* * * * * * *", "0 2 * *"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(next("0 0 30 2 *"), None, "February 30th never comes");
    }

    #[test]
    fn a_policy_checks_its_parts() {
        let spec = BackupPolicySpec {
            schedule: "0 2 * * *".into(),
            store: None,
            selector: "backup=nightly".into(),
            keep: Some(KeepRules {
                keep_last: Some(7),
                ..Default::default()
            }),
            suspended: false,
        };
        assert!(spec.validate().is_ok());
        let mut bad = spec.clone();
        bad.selector = "a=b,=c".into();
        assert_eq!(bad.validate().map_err(|e| e.field), Err("spec.selector".into()));
        let mut bad = spec.clone();
        bad.keep = Some(KeepRules::default());
        assert_eq!(bad.validate().map_err(|e| e.field), Err("spec.keep.keep".into()));
        let mut bad = spec.clone();
        bad.store = Some("Not A Name".into());
        assert!(bad.validate().is_err());
        let mut never = spec;
        never.schedule = "0 0 30 2 *".into();
        assert_eq!(never.validate().map_err(|e| e.field), Err("spec.schedule".into()));
    }
}
