//! Pieces that operator and tenant pages both show: quotas with what is in use, the API key
//! table, and the usage chart with its table.

use time::{Duration as TimeDuration, OffsetDateTime};

use super::chart::{self, Chart};
use super::error::ConsoleError;
use super::view;
use crate::domain::{Quotas, TenantId};
use crate::store::{ApiKeyInfo, Store};

/// Periods the usage pages offer, in days.
pub const PERIODS: [u32; 3] = [7, 14, 30];
/// The default period.
pub const DEFAULT_DAYS: u32 = 14;

/// One quota with what the tenant uses of it now.
#[derive(Clone, Debug)]
pub struct QuotaView {
    /// The API's field name (`max_adapters`, ...).
    pub key: &'static str,
    pub label: &'static str,
    /// The limit as a form value: empty for unlimited.
    pub value: String,
    /// The limit for reading ("unlimited" or a number).
    pub limit: String,
    /// What is in use, for reading.
    pub used: String,
    /// used / limit in 0..=1 when limited.
    pub fraction: Option<String>,
}

/// What a tenant uses of each quota now.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuotaUse {
    pub adapters: u64,
    pub adapter_bytes: u64,
    pub streams: u64,
    pub tokens_minute: u64,
    pub tokens_day: u64,
}

/// Reads the tenant's current consumption of each quota.
pub async fn quota_use(store: &Store, tenant: TenantId) -> Result<QuotaUse, ConsoleError> {
    let adapters = store.list_adapters(tenant).await?;
    let (tokens_minute, tokens_day) = store.tokens_used(tenant, OffsetDateTime::now_utc()).await?;
    Ok(QuotaUse {
        adapters: adapters.len() as u64,
        adapter_bytes: adapters.iter().map(|a| a.size_bytes).sum(),
        streams: store.active_streams(tenant).await?,
        tokens_minute,
        tokens_day,
    })
}

/// The five quotas in the API's order with their use.
pub fn quota_views(quotas: &Quotas, used: &QuotaUse) -> Vec<QuotaView> {
    let rows: [(&'static str, &'static str, Option<u64>, u64, bool); 5] = [
        (
            "max_adapters",
            "Adapters",
            quotas.max_adapters,
            used.adapters,
            false,
        ),
        (
            "max_adapter_bytes",
            "Adapter storage (bytes)",
            quotas.max_adapter_bytes,
            used.adapter_bytes,
            true,
        ),
        (
            "max_concurrent_streams",
            "Concurrent streams",
            quotas.max_concurrent_streams,
            used.streams,
            false,
        ),
        (
            "tokens_per_minute",
            "Tokens this minute",
            quotas.tokens_per_minute,
            used.tokens_minute,
            false,
        ),
        (
            "tokens_per_day",
            "Tokens today (UTC)",
            quotas.tokens_per_day,
            used.tokens_day,
            false,
        ),
    ];
    rows.into_iter()
        .map(|(key, label, limit, used, is_bytes)| {
            let show = |v: u64| {
                if is_bytes {
                    view::bytes(v)
                } else {
                    view::count(v)
                }
            };
            QuotaView {
                key,
                label,
                value: limit.map(|l| l.to_string()).unwrap_or_default(),
                limit: limit.map_or_else(|| "unlimited".to_owned(), show),
                used: show(used),
                fraction: limit.map(|l| {
                    let f = if l == 0 {
                        1.0
                    } else {
                        (used as f64 / l as f64).min(1.0)
                    };
                    format!("{f:.3}")
                }),
            }
        })
        .collect()
}

/// One API key as listed.
#[derive(Clone, Debug)]
pub struct KeyRow {
    pub id: String,
    pub prefix: String,
    pub label: String,
    pub created: String,
    pub last_used: String,
    pub revoked: bool,
}

/// The key table's rows.
pub fn key_rows(keys: Vec<ApiKeyInfo>) -> Vec<KeyRow> {
    let now = OffsetDateTime::now_utc();
    keys.into_iter()
        .map(|k| KeyRow {
            id: k.id.to_string(),
            prefix: k.prefix,
            label: k.label,
            created: view::datetime(k.created_at),
            last_used: k
                .last_used_at
                .map_or_else(|| "never".to_owned(), |t| view::ago(t, now)),
            revoked: k.revoked_at.is_some(),
        })
        .collect()
}

/// One line of the usage table.
#[derive(Clone, Debug)]
pub struct UsageRow {
    pub day: String,
    pub adapter: String,
    pub requests: String,
    pub prompt_tokens: String,
    pub completion_tokens: String,
}

/// The chart and table of a tenant's last `days` days (today included).
pub async fn usage(
    store: &Store,
    tenant: TenantId,
    days: u32,
) -> Result<(Chart, Vec<UsageRow>), ConsoleError> {
    let to = OffsetDateTime::now_utc().date();
    let from = to - TimeDuration::days(i64::from(days.max(1)) - 1);
    let rows = store.usage_daily(tenant, from, to).await?;
    let chart = chart::tokens_per_day(&rows, from, to);
    let table = rows
        .iter()
        .rev()
        .map(|r| UsageRow {
            day: r.day.to_string(),
            adapter: r
                .adapter
                .clone()
                .unwrap_or_else(|| chart::BASE_MODEL.to_owned()),
            requests: view::count(r.requests),
            prompt_tokens: view::count(r.prompt_tokens),
            completion_tokens: view::count(r.completion_tokens),
        })
        .collect();
    Ok((chart, table))
}

/// A period from the query, limited to the offered ones.
pub fn period(requested: Option<u32>) -> u32 {
    match requested {
        Some(d) if PERIODS.contains(&d) => d,
        _ => DEFAULT_DAYS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_show_limits_use_and_fill() {
        let quotas = Quotas {
            max_adapters: Some(4),
            max_adapter_bytes: None,
            ..Quotas::UNLIMITED
        };
        let used = QuotaUse {
            adapters: 3,
            adapter_bytes: 2048,
            ..QuotaUse::default()
        };
        let views = quota_views(&quotas, &used);
        assert_eq!(views[0].key, "max_adapters");
        assert_eq!(views[0].value, "4");
        assert_eq!(views[0].used, "3");
        assert_eq!(views[0].fraction.as_deref(), Some("0.750"));
        assert_eq!(views[1].value, "");
        assert_eq!(views[1].limit, "unlimited");
        assert_eq!(views[1].used, "2.0 KiB");
        assert_eq!(views[1].fraction, None);
    }

    #[test]
    fn only_offered_periods_are_accepted() {
        assert_eq!(period(Some(7)), 7);
        assert_eq!(period(Some(9999)), DEFAULT_DAYS);
        assert_eq!(period(None), DEFAULT_DAYS);
    }
}
