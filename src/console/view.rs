//! What every page shares: the layout (title, navigation, CSRF token, asset URLs), rendering a
//! template into a response, and the small formatting helpers the pages use.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;
use askama::Template;
use time::OffsetDateTime;

use super::assets;
use super::error::ConsoleError;
use super::session::Session;

/// One navigation link.
#[derive(Clone, Debug)]
pub struct NavItem {
    pub href: &'static str,
    pub label: &'static str,
    pub current: bool,
}

/// The frame of every page.
#[derive(Clone, Debug)]
pub struct Layout {
    pub title: String,
    /// The synchronizer token forms echo (also in a `<meta>` for the upload script).
    pub csrf: String,
    pub nav: Vec<NavItem>,
    /// "email (tenant)" of the signed-in account; `None` on the login page.
    pub who: Option<String>,
    /// A one-line success message.
    pub notice: Option<String>,
    pub css_url: String,
    pub js_url: String,
}

/// Sections of the console, for highlighting the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Tenants,
    Adapters,
    Keys,
    Usage,
    Playground,
}

impl Layout {
    /// A page without a session (login, errors).
    pub fn anonymous(title: &str, csrf: &str) -> Layout {
        Layout {
            title: title.to_owned(),
            csrf: csrf.to_owned(),
            nav: Vec::new(),
            who: None,
            notice: None,
            css_url: assets::css_url(),
            js_url: assets::js_url(),
        }
    }

    /// A page of a signed-in session, with the navigation of its role.
    pub fn for_session(session: &Session, title: &str, section: Section) -> Layout {
        let items: &[(&'static str, &'static str, Section)] = if session.is_operator() {
            &[("/console/tenants", "Tenants", Section::Tenants)]
        } else {
            &[
                ("/console/adapters", "Adapters", Section::Adapters),
                ("/console/playground", "Playground", Section::Playground),
                ("/console/keys", "API keys", Section::Keys),
                ("/console/usage", "Usage & quotas", Section::Usage),
            ]
        };
        let who = match &session.inner.tenant_name {
            Some(tenant) => format!("{} ({tenant})", session.inner.email),
            None => format!("{} (operator)", session.inner.email),
        };
        Layout {
            title: title.to_owned(),
            csrf: session.inner.csrf_token.clone(),
            nav: items
                .iter()
                .map(|(href, label, s)| NavItem {
                    href,
                    label,
                    current: *s == section,
                })
                .collect(),
            who: Some(who),
            notice: None,
            css_url: assets::css_url(),
            js_url: assets::js_url(),
        }
    }

    /// The same layout with a success message.
    pub fn with_notice(mut self, notice: Option<String>) -> Layout {
        self.notice = notice;
        self
    }
}

/// Renders a page with `status`. Pages are never cached: they can hold secrets (a new API key)
/// and per-session tokens.
pub fn render(page: &impl Template, status: StatusCode) -> Result<HttpResponse, ConsoleError> {
    let html = page.render()?;
    Ok(HttpResponse::build(status)
        .content_type("text/html; charset=utf-8")
        .body(html))
}

/// A 303 to `location` (after a successful form post).
pub fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((actix_web::http::header::LOCATION, location.to_owned()))
        .finish()
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `1.2 MiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `2026-11-28 18:05 UTC`.
pub fn datetime(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!("{} {:02}:{:02} UTC", t.date(), t.hour(), t.minute())
}

/// `3 min ago`, `2 h ago`, `5 days ago` (relative to `now`); absolute beyond 30 days.
pub fn ago(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let secs = (now - t).whole_seconds().max(0);
    match secs {
        0..60 => "just now".to_owned(),
        60..3_600 => format!("{} min ago", secs / 60),
        3_600..86_400 => format!("{} h ago", secs / 3_600),
        86_400..2_592_000 => {
            let days = secs / 86_400;
            format!("{days} day{} ago", if days == 1 { "" } else { "s" })
        }
        _ => datetime(t),
    }
}

/// Thousands separators for counts (`1 234 567` with thin spaces).
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn sizes_counts_and_times_are_human_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(count(1_234_567), "1\u{202f}234\u{202f}567");
        assert_eq!(count(999), "999");
        let now = datetime!(2026-11-28 18:00 UTC);
        assert_eq!(ago(datetime!(2026-11-28 17:58 UTC), now), "2 min ago");
        assert_eq!(ago(datetime!(2026-11-27 18:00 UTC), now), "1 day ago");
        assert_eq!(
            ago(datetime!(2026-09-01 08:05 UTC), now),
            "2026-09-01 08:05 UTC"
        );
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            encode_query("/console/adapters?x=1&y"),
            "/console/adapters%3Fx%3D1%26y"
        );
    }
}
