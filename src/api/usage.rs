//! `GET /api/v1/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`: the caller's requests and tokens per UTC
//! day and adapter, from the usage ledger (every finished, stopped or cancelled generation).

use actix_web::{HttpResponse, web};
use serde::{Deserialize, Serialize};
use time::{Date, Duration, OffsetDateTime};

use crate::api::auth::TenantContext;
use crate::api::error::ApiError;
use crate::api::state::ServiceState;
use crate::domain::TenantId;
use crate::store::Store;

/// Days reported when `from` is absent (ending at `to`).
pub const DEFAULT_RANGE_DAYS: i64 = 30;
/// Longest range one query may cover.
pub const MAX_RANGE_DAYS: i64 = 366;

time::serde::format_description!(iso_date, Date, "[year]-[month]-[day]");

/// The query string: both ends inclusive, UTC days.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

/// One row of the report.
#[derive(Debug, Serialize)]
pub struct UsageRow {
    #[serde(with = "iso_date")]
    pub date: Date,
    /// Adapter name; `null` for the base model.
    pub adapter: Option<String>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct UsageReport {
    #[serde(with = "iso_date")]
    pub from: Date,
    #[serde(with = "iso_date")]
    pub to: Date,
    pub usage: Vec<UsageRow>,
}

fn parse_day(field: &str, raw: &str) -> Result<Date, ApiError> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(raw, format).map_err(|_| {
        ApiError::InvalidRequest(format!(
            "`{field}` must be a date as YYYY-MM-DD, got '{raw}'"
        ))
    })
}

/// The inclusive day range a query asks for, checked.
pub fn resolve_range(query: &UsageQuery, today: Date) -> Result<(Date, Date), ApiError> {
    let to = match &query.to {
        Some(raw) => parse_day("to", raw)?,
        None => today,
    };
    let from = match &query.from {
        Some(raw) => parse_day("from", raw)?,
        None => to - Duration::days(DEFAULT_RANGE_DAYS - 1),
    };
    if from > to {
        return Err(ApiError::InvalidRequest(format!(
            "`from` ({from}) is after `to` ({to})"
        )));
    }
    if (to - from).whole_days() >= MAX_RANGE_DAYS {
        return Err(ApiError::InvalidRequest(format!(
            "the range may cover at most {MAX_RANGE_DAYS} days"
        )));
    }
    Ok((from, to))
}

/// The report of one tenant for a query.
pub async fn usage_report(
    store: &Store,
    tenant: TenantId,
    query: UsageQuery,
) -> Result<UsageReport, ApiError> {
    let (from, to) = resolve_range(&query, OffsetDateTime::now_utc().date())?;
    let usage = store
        .usage_daily(tenant, from, to)
        .await?
        .into_iter()
        .map(|day| UsageRow {
            date: day.day,
            adapter: day.adapter,
            requests: day.requests,
            prompt_tokens: day.prompt_tokens,
            completion_tokens: day.completion_tokens,
        })
        .collect();
    Ok(UsageReport { from, to, usage })
}

/// `GET /api/v1/usage`.
pub async fn usage(
    tenant: TenantContext,
    state: web::Data<ServiceState>,
    query: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let report = usage_report(&state.store, tenant.tenant_id, query.into_inner()).await?;
    Ok(HttpResponse::Ok().json(report))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn query(from: Option<&str>, to: Option<&str>) -> UsageQuery {
        UsageQuery {
            from: from.map(str::to_owned),
            to: to.map(str::to_owned),
        }
    }

    #[test]
    fn the_default_range_is_the_last_thirty_days() {
        let (from, to) = resolve_range(&query(None, None), date!(2026 - 11 - 28)).unwrap();
        assert_eq!(to, date!(2026 - 11 - 28));
        assert_eq!(from, date!(2026 - 10 - 30));
    }

    #[test]
    fn malformed_reversed_and_huge_ranges_are_refused() {
        let today = date!(2026 - 11 - 28);
        for bad in [
            query(Some("2026-13-01"), None),
            query(Some("yesterday"), None),
            query(Some("2026-11-20"), Some("2026-11-10")),
            query(Some("2020-01-01"), Some("2026-01-01")),
        ] {
            assert!(
                matches!(resolve_range(&bad, today), Err(ApiError::InvalidRequest(_))),
                "{bad:?}"
            );
        }
        assert!(resolve_range(&query(Some("2026-11-01"), Some("2026-11-01")), today).is_ok());
    }
}
