//! The usage chart: tokens per day per adapter as a stacked bar chart in inline SVG, drawn on
//! the server (no script, no external assets). Pure functions over the usage rollup.

use std::collections::BTreeMap;
use std::fmt::Write;

use time::Date;

use crate::store::UsageDay;

/// Colours of the series, in order (Okabe-Ito: distinguishable with colour-vision deficiency).
const PALETTE: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000",
];
/// Name of the base model's series.
pub const BASE_MODEL: &str = "base model";

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 28.0;

/// One legend entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegendItem {
    pub name: String,
    pub color: &'static str,
}

/// A rendered chart: the SVG markup (safe to embed: every text is escaped) and its legend.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub svg: String,
    pub legend: Vec<LegendItem>,
}

/// Escapes text for SVG/HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The smallest "nice" number (1, 2 or 5 times a power of ten) at least `x`.
fn nice_ceiling(x: u64) -> u64 {
    if x == 0 {
        return 1;
    }
    let mut base = 1u64;
    loop {
        for m in [1u64, 2, 5] {
            let v = base.saturating_mul(m);
            if v >= x {
                return v;
            }
        }
        match base.checked_mul(10) {
            Some(b) => base = b,
            None => return u64::MAX,
        }
    }
}

/// Short human form of a token count for axis labels (`950`, `12k`, `3.4M`).
pub fn short_count(v: u64) -> String {
    match v {
        0..1_000 => v.to_string(),
        1_000..1_000_000 => trim_decimal(v as f64 / 1e3, "k"),
        1_000_000..1_000_000_000 => trim_decimal(v as f64 / 1e6, "M"),
        _ => trim_decimal(v as f64 / 1e9, "G"),
    }
}

fn trim_decimal(x: f64, unit: &str) -> String {
    let s = format!("{x:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s);
    format!("{s}{unit}")
}

/// Draws tokens (prompt + completion) per day for every day in `from..=to`, one stacked bar per
/// day, one colour per adapter (largest total first; beyond the palette the rest are grouped as
/// "other adapters").
pub fn tokens_per_day(rows: &[UsageDay], from: Date, to: Date) -> Chart {
    let mut days: Vec<Date> = Vec::new();
    let mut d = from;
    while d <= to && days.len() < 366 {
        days.push(d);
        match d.next_day() {
            Some(next) => d = next,
            None => break,
        }
    }

    // Series totals decide the order and which series get their own colour.
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for r in rows {
        let name = r.adapter.clone().unwrap_or_else(|| BASE_MODEL.to_owned());
        *totals.entry(name).or_default() += r.prompt_tokens + r.completion_tokens;
    }
    let mut order: Vec<(String, u64)> = totals.into_iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let other = "other adapters".to_owned();
    let named = if order.len() > PALETTE.len() {
        PALETTE.len() - 1
    } else {
        order.len()
    };
    let mut series: Vec<String> = order.iter().take(named).map(|(n, _)| n.clone()).collect();
    if order.len() > named {
        series.push(other.clone());
    }
    let series_of = |name: &str| -> usize {
        series
            .iter()
            .position(|s| s == name)
            .unwrap_or(series.len().saturating_sub(1))
    };

    // values[day][series]
    let mut values = vec![vec![0u64; series.len()]; days.len()];
    for r in rows {
        let Some(di) = days.iter().position(|d| *d == r.day) else {
            continue;
        };
        let name = r.adapter.as_deref().unwrap_or(BASE_MODEL);
        let si = series_of(name);
        values[di][si] += r.prompt_tokens + r.completion_tokens;
    }
    let max_day = values
        .iter()
        .map(|v| v.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    // Gridlines every `step` tokens, a "nice" number, with at most four steps to the top.
    let step = nice_ceiling(max_day.div_ceil(4).max(1));
    let steps = max_day.div_ceil(step).max(1);
    let y_max = step * steps;

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / days.len().max(1) as f64;
    let bar_w = (slot * 0.7).max(1.0);
    let label = format!(
        "Tokens per day from {from} to {to}: {} tokens in total, at most {} on one day",
        values.iter().flatten().sum::<u64>(),
        max_day
    );

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" id="usage-chart">"#,
        escape(&label)
    );
    // Grid lines and y labels at 0, 1/4, ... of the scale.
    for i in 0..=steps {
        let v = step * i;
        let y = TOP + plot_h - plot_h * (i as f64 / steps as f64);
        let _ = write!(
            svg,
            r#"<line class="grid-line" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            short_count(v)
        );
    }
    let _ = write!(
        svg,
        r#"<line class="axis" x1="{LEFT}" x2="{}" y1="{:.1}" y2="{:.1}"/>"#,
        WIDTH - RIGHT,
        TOP + plot_h,
        TOP + plot_h
    );
    let label_every = (days.len() / 10).max(1);
    for (di, day) in days.iter().enumerate() {
        let x = LEFT + slot * di as f64 + (slot - bar_w) / 2.0;
        let mut y = TOP + plot_h;
        for (si, v) in values[di].iter().enumerate() {
            if *v == 0 {
                continue;
            }
            let h = plot_h * (*v as f64 / y_max as f64);
            y -= h;
            let _ = write!(
                svg,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bar_w:.1}" height="{h:.1}" fill="{}"><title>{day} · {}: {v} tokens</title></rect>"#,
                PALETTE[si % PALETTE.len()],
                escape(&series[si])
            );
        }
        if di % label_every == 0 || di + 1 == days.len() {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{:02}-{:02}</text>"#,
                LEFT + slot * di as f64 + slot / 2.0,
                HEIGHT - 8.0,
                u8::from(day.month()),
                day.day()
            );
        }
    }
    if max_day == 0 {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">No tokens in this period</text>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    svg.push_str("</svg>");

    let legend = series
        .iter()
        .enumerate()
        .map(|(i, name)| LegendItem {
            name: name.clone(),
            color: PALETTE[i % PALETTE.len()],
        })
        .collect();
    Chart { svg, legend }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn day(d: Date, adapter: Option<&str>, tokens: u64) -> UsageDay {
        UsageDay {
            day: d,
            adapter: adapter.map(str::to_owned),
            requests: 1,
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
        }
    }

    #[test]
    fn each_day_and_adapter_gets_a_bar_segment_with_its_total_in_the_tooltip() {
        let rows = vec![
            day(date!(2026 - 11 - 27), Some("legal"), 300),
            day(date!(2026 - 11 - 28), Some("legal"), 100),
            day(date!(2026 - 11 - 28), None, 50),
        ];
        let chart = tokens_per_day(&rows, date!(2026 - 11 - 26), date!(2026 - 11 - 28));
        assert_eq!(chart.svg.matches("<rect").count(), 3);
        assert!(chart.svg.contains("2026-11-27 · legal: 300 tokens"));
        assert!(chart.svg.contains("2026-11-28 · base model: 50 tokens"));
        assert_eq!(chart.legend[0].name, "legal");
        assert_eq!(chart.legend[1].name, BASE_MODEL);
        assert!(chart.svg.contains("11-26"));
    }

    #[test]
    fn gridlines_fall_on_round_numbers_above_the_largest_day() {
        let rows = vec![day(date!(2026 - 11 - 28), Some("a"), 3_500)];
        let chart = tokens_per_day(&rows, date!(2026 - 11 - 28), date!(2026 - 11 - 28));
        for label in [">0<", ">1k<", ">2k<", ">3k<", ">4k<"] {
            assert!(chart.svg.contains(label), "missing tick {label}");
        }
        assert!(!chart.svg.contains(">5k<"));
    }

    #[test]
    fn adapter_names_are_escaped_in_the_markup() {
        let rows = vec![day(date!(2026 - 11 - 28), Some("<script>"), 10)];
        let chart = tokens_per_day(&rows, date!(2026 - 11 - 28), date!(2026 - 11 - 28));
        assert!(!chart.svg.contains("<script>"));
        assert!(chart.svg.contains("&lt;script&gt;"));
    }

    #[test]
    fn an_empty_period_says_so_and_has_no_bars() {
        let chart = tokens_per_day(&[], date!(2026 - 11 - 1), date!(2026 - 11 - 14));
        assert!(chart.svg.contains("No tokens in this period"));
        assert!(!chart.svg.contains("<rect"));
        assert!(chart.legend.is_empty());
    }

    #[test]
    fn series_beyond_the_palette_are_grouped() {
        let rows: Vec<UsageDay> = (0..12)
            .map(|i| day(date!(2026 - 11 - 28), Some(&format!("a{i:02}")), 100 + i))
            .collect();
        let chart = tokens_per_day(&rows, date!(2026 - 11 - 28), date!(2026 - 11 - 28));
        assert_eq!(chart.legend.len(), PALETTE.len());
        assert_eq!(chart.legend.last().unwrap().name, "other adapters");
    }

    #[test]
    fn axis_scale_rounds_up_to_a_nice_number() {
        assert_eq!(nice_ceiling(0), 1);
        assert_eq!(nice_ceiling(7), 10);
        assert_eq!(nice_ceiling(130), 200);
        assert_eq!(nice_ceiling(4_999), 5_000);
        assert_eq!(short_count(12_300), "12.3k");
        assert_eq!(short_count(2_000_000), "2M");
    }
}
