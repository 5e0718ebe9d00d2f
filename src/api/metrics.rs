//! Prometheus metrics: a registry other modules add their own collectors to, HTTP request
//! counters and latency by route pattern, and the `/metrics` route.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{HttpResponse, web};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

use super::AppState;

/// Label used for requests that matched no route (so scanners cannot blow up label cardinality).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The service's metrics registry and its HTTP collectors.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
}

impl Metrics {
    /// A fresh registry with the HTTP collectors registered.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("punica".into()), None)?;
        let http_requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by method, route pattern and status",
            ),
            &["method", "route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "http_request_duration_seconds",
                "Time to produce the response head, by method and route pattern",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["method", "route"],
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
        })
    }

    /// The registry: other modules register their collectors here (names get the `punica_` prefix).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one finished request.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .with_label_values(&[method, route, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// Everything in the Prometheus text format.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Middleware (for `actix_web::middleware::from_fn`) that counts every request.
pub async fn track_requests(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let result = next.call(req).await;
    if let Some(metrics) = metrics {
        let seconds = start.elapsed().as_secs_f64();
        match &result {
            Ok(res) => {
                let route = res
                    .request()
                    .match_pattern()
                    .unwrap_or_else(|| UNMATCHED_ROUTE.to_owned());
                let status = res.status().as_u16();
                tracing::debug!(%method, %route, status, seconds, "http request");
                metrics.observe_http(&method, &route, status, seconds);
            }
            Err(e) => {
                let status = e.as_response_error().status_code().as_u16();
                metrics.observe_http(&method, UNMATCHED_ROUTE, status, seconds);
            }
        }
    }
    result
}

/// Registers `/metrics`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics));
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    match state.metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(e) => {
            tracing::error!(error = %e, "rendering metrics failed");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_requests_appear_in_the_text_output() {
        let m = Metrics::new().unwrap();
        m.observe_http("GET", "/healthz", 200, 0.002);
        m.observe_http("GET", "/healthz", 200, 0.003);
        let text = m.render().unwrap();
        assert!(
            text.contains(
                r#"punica_http_requests_total{method="GET",route="/healthz",status="200"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("punica_http_request_duration_seconds_bucket"));
    }
}
