//! Service-level Prometheus metrics per tenant and adapter (exported as `punica_tenant_*`: the
//! registry adds the `punica_` prefix): requests by finish reason, tokens,
//! errors by code, latency histograms, live streams.
//!
//! Label cardinality is bounded on purpose. `tenant` is the tenant's name, which operators
//! create one by one; past [`MAX_TENANT_LABELS`] distinct tenants, newcomers share `_other`.
//! `adapter` appears only on the request and token counters (never on histograms), and each
//! tenant gets its own label for the first [`MAX_ADAPTER_LABELS_PER_TENANT`] adapters it uses
//! in this process; later ones share `_other`, the base model is `_base`. So the worst case is
//! tenants x (adapters + 2) x a handful of finish reasons, whatever tenants upload.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::api::auth::TenantContext;
use crate::api::error::ErrorCode;

/// Distinct tenant label values before newcomers share `_other`.
pub const MAX_TENANT_LABELS: usize = 1_000;
/// Distinct adapter label values per tenant before newcomers share `_other`.
pub const MAX_ADAPTER_LABELS_PER_TENANT: usize = 16;
/// Label of requests to the base model.
pub const BASE_LABEL: &str = "_base";
/// Label shared by everything past a cap.
pub const OTHER_LABEL: &str = "_other";
/// Tenant label of requests that did not authenticate.
pub const ANONYMOUS_LABEL: &str = "_anonymous";

/// Which label values have been handed out.
#[derive(Default)]
struct Labels {
    adapters: HashMap<String, HashSet<String>>,
}

/// The service's metrics; registered into the registry behind `/metrics`.
pub struct ServiceMetrics {
    requests: IntCounterVec,
    tokens: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    first_token: HistogramVec,
    active: IntGaugeVec,
    uploads: IntCounterVec,
    labels: Mutex<Labels>,
}

impl ServiceMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self::unregistered()?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.tokens.clone()))?;
        registry.register(Box::new(metrics.errors.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        registry.register(Box::new(metrics.first_token.clone()))?;
        registry.register(Box::new(metrics.active.clone()))?;
        registry.register(Box::new(metrics.uploads.clone()))?;
        Ok(metrics)
    }

    /// Metrics that are not exported (unit tests).
    pub fn unregistered() -> Result<Self, prometheus::Error> {
        let latency_buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        Ok(ServiceMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "tenant_requests_total",
                    "Generations ended, by tenant, adapter and finish reason (length, stop, cancelled, error)",
                ),
                &["tenant", "adapter", "finish_reason"],
            )?,
            tokens: IntCounterVec::new(
                Opts::new(
                    "tenant_tokens_total",
                    "Tokens processed, by tenant, adapter and kind (prompt, completion)",
                ),
                &["tenant", "adapter", "kind"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "tenant_errors_total",
                    "Failed API calls and generations, by tenant and error code",
                ),
                &["tenant", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "tenant_request_duration_seconds",
                    "Time from admission to the end of a generation, by tenant",
                )
                .buckets(latency_buckets.clone()),
                &["tenant"],
            )?,
            first_token: HistogramVec::new(
                HistogramOpts::new(
                    "tenant_time_to_first_token_seconds",
                    "Time from receipt to the first generated token, by tenant",
                )
                .buckets(latency_buckets),
                &["tenant"],
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "tenant_active_streams",
                    "Generations running now in this process, by tenant",
                ),
                &["tenant"],
            )?,
            uploads: IntCounterVec::new(
                Opts::new(
                    "tenant_adapter_uploads_total",
                    "Adapter uploads accepted, by tenant",
                ),
                &["tenant"],
            )?,
            labels: Mutex::new(Labels::default()),
        })
    }

    /// The tenant label, capped at [`MAX_TENANT_LABELS`] distinct values.
    fn tenant_label(&self, tenant: Option<&TenantContext>) -> String {
        let Some(tenant) = tenant else {
            return ANONYMOUS_LABEL.to_owned();
        };
        let Ok(mut labels) = self.labels.lock() else {
            return OTHER_LABEL.to_owned();
        };
        if labels.adapters.contains_key(&tenant.tenant_name)
            || labels.adapters.len() < MAX_TENANT_LABELS
        {
            labels
                .adapters
                .entry(tenant.tenant_name.clone())
                .or_default();
            tenant.tenant_name.clone()
        } else {
            OTHER_LABEL.to_owned()
        }
    }

    /// The (tenant, adapter) labels, each capped.
    fn labels(&self, tenant: &TenantContext, adapter: Option<&str>) -> (String, String) {
        let tenant_label = self.tenant_label(Some(tenant));
        let Some(adapter) = adapter else {
            return (tenant_label, BASE_LABEL.to_owned());
        };
        let Ok(mut labels) = self.labels.lock() else {
            return (tenant_label, OTHER_LABEL.to_owned());
        };
        let seen = labels.adapters.entry(tenant_label.clone()).or_default();
        let adapter_label = if seen.contains(adapter) || seen.len() < MAX_ADAPTER_LABELS_PER_TENANT
        {
            seen.insert(adapter.to_owned());
            adapter.to_owned()
        } else {
            OTHER_LABEL.to_owned()
        };
        (tenant_label, adapter_label)
    }

    /// One failed call or generation.
    pub fn record_error(&self, tenant: Option<&TenantContext>, code: ErrorCode) {
        self.errors
            .with_label_values(&[self.tenant_label(tenant).as_str(), code.as_str()])
            .inc();
    }

    /// A generation started running (after admission).
    pub fn stream_started(&self, tenant: &TenantContext) {
        self.active
            .with_label_values(&[self.tenant_label(Some(tenant)).as_str()])
            .inc();
    }

    /// The first token of a generation arrived `elapsed` after the request.
    pub fn first_token(&self, tenant: &TenantContext, elapsed: Duration) {
        self.first_token
            .with_label_values(&[self.tenant_label(Some(tenant)).as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// A generation that ran has ended; `finish_reason` is `length`, `stop`, `cancelled` or
    /// `error`.
    pub fn stream_finished(
        &self,
        tenant: &TenantContext,
        adapter: Option<&str>,
        finish_reason: &str,
        prompt_tokens: u32,
        completion_tokens: u32,
        elapsed: Duration,
    ) {
        let (tenant_label, adapter_label) = self.labels(tenant, adapter);
        let (t, a) = (tenant_label.as_str(), adapter_label.as_str());
        self.active.with_label_values(&[t]).dec();
        self.requests
            .with_label_values(&[t, a, finish_reason])
            .inc();
        self.tokens
            .with_label_values(&[t, a, "prompt"])
            .inc_by(u64::from(prompt_tokens));
        self.tokens
            .with_label_values(&[t, a, "completion"])
            .inc_by(u64::from(completion_tokens));
        self.duration
            .with_label_values(&[t])
            .observe(elapsed.as_secs_f64());
    }

    /// An adapter upload was stored.
    pub fn upload_accepted(&self, tenant: &TenantContext) {
        self.uploads
            .with_label_values(&[self.tenant_label(Some(tenant)).as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ApiKeyId, TenantId};

    fn tenant(name: &str) -> TenantContext {
        TenantContext {
            tenant_id: TenantId::new(),
            tenant_name: name.into(),
            key_id: Some(ApiKeyId::new()),
        }
    }

    #[test]
    fn adapter_labels_are_capped_per_tenant() {
        let metrics = ServiceMetrics::unregistered().unwrap();
        let acme = tenant("acme");
        for i in 0..MAX_ADAPTER_LABELS_PER_TENANT {
            let (_, label) = metrics.labels(&acme, Some(&format!("a{i}")));
            assert_eq!(label, format!("a{i}"));
        }
        let (_, label) = metrics.labels(&acme, Some("one-too-many"));
        assert_eq!(label, OTHER_LABEL);
        let (_, label) = metrics.labels(&acme, Some("a0"));
        assert_eq!(label, "a0", "a known adapter keeps its label");
        let (_, label) = metrics.labels(&tenant("other"), Some("one-too-many"));
        assert_eq!(label, "one-too-many", "the cap is per tenant");
        let (_, label) = metrics.labels(&acme, None);
        assert_eq!(label, BASE_LABEL);
    }

    #[test]
    fn tenant_labels_are_capped() {
        let metrics = ServiceMetrics::unregistered().unwrap();
        for i in 0..MAX_TENANT_LABELS {
            assert_eq!(
                metrics.tenant_label(Some(&tenant(&format!("t{i}")))),
                format!("t{i}")
            );
        }
        assert_eq!(metrics.tenant_label(Some(&tenant("late"))), OTHER_LABEL);
        assert_eq!(metrics.tenant_label(Some(&tenant("t0"))), "t0");
        assert_eq!(metrics.tenant_label(None), ANONYMOUS_LABEL);
    }

    #[test]
    fn a_finished_stream_counts_its_tokens() {
        let metrics = ServiceMetrics::unregistered().unwrap();
        let acme = tenant("acme");
        metrics.stream_started(&acme);
        metrics.stream_finished(
            &acme,
            Some("legal"),
            "length",
            5,
            16,
            Duration::from_millis(30),
        );
        assert_eq!(
            metrics
                .tokens
                .with_label_values(&["acme", "legal", "completion"])
                .get(),
            16
        );
        assert_eq!(metrics.active.with_label_values(&["acme"]).get(), 0);
        assert_eq!(
            metrics
                .requests
                .with_label_values(&["acme", "legal", "length"])
                .get(),
            1
        );
    }
}
