//! Real headless Chromium for the console tests: one chromedriver per test on a free port, a
//! fresh profile directory, and a screenshot in `target/console-screenshots/` when a test fails.
//!
//! Debian's `chromium` and `chromium-driver` packages are expected at `/usr/bin/chromium` and
//! `/usr/bin/chromedriver` (override with `CHROMIUM` and `CHROMEDRIVER`). fantoccini talks to
//! chromedriver over plain HTTP through hyper-util's connector, so no TLS stack is involved.

#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use tokio::sync::Semaphore;

/// Browsers running at once: each Chromium takes a few hundred MB and a core while it renders.
static BROWSER_SLOTS: Semaphore = Semaphore::const_new(2);

/// How long waits for page content give up after.
pub const WAIT: Duration = Duration::from_secs(20);

/// One chromedriver process with one Chromium session.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port for chromedriver")
}

fn program(env: &str, default: &str) -> String {
    std::env::var(env).unwrap_or_else(|_| default.to_owned())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a fresh profile.
    pub async fn start() -> Browser {
        let driver_bin = program("CHROMEDRIVER", "/usr/bin/chromedriver");
        let chromium_bin = program("CHROMIUM", "/usr/bin/chromium");
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {driver_bin} (apt-get install chromium chromium-driver): {e}")
            });
        let profile = tempfile::Builder::new()
            .prefix("punica-chromium-")
            .tempdir()
            .expect("create a Chromium profile dir");
        let args = vec![
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-quic".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".to_owned(),
            json!({ "binary": chromium_bin, "args": args }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                // chromedriver needs a moment before it listens.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot open a Chromium session through {driver_bin}: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    /// A handle for test bodies.
    pub fn page(&self) -> Page {
        Page {
            client: self.client.clone(),
        }
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The browser as test bodies see it: navigation, lookups and waits that panic with a useful
/// message instead of returning errors.
#[derive(Clone)]
pub struct Page {
    pub client: Client,
}

impl Page {
    /// Finds one element by CSS selector, waiting for it to appear.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element `{css}` within {WAIT:?}: {e}"))
    }

    /// Whether an element matching `css` is on the page now.
    pub async fn exists(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .map(|v| v.is_empty())
            .unwrap_or(true)
    }

    /// Navigates to `url`.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("cannot open {url}: {e}"));
    }

    /// Types `text` into the field matching `css` (clearing it first).
    pub async fn fill(&self, css: &str, text: &str) {
        let field = self.find(css).await;
        field.clear().await.expect("clear field");
        field.send_keys(text).await.expect("type into field");
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("cannot click `{css}`: {e}"));
    }

    /// Text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("element text")
    }

    /// Waits until the text of `css` satisfies `pred`; returns it.
    pub async fn wait_text(&self, css: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Ok(el) = self.client.find(Locator::Css(css)).await
                && let Ok(text) = el.text().await
            {
                if pred(&text) {
                    return text;
                }
                last = text;
            }
            if Instant::now() > deadline {
                panic!("`{css}` never reached the expected text within {WAIT:?}; last: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page's current path (without origin).
    pub async fn path(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.path().to_owned())
            .expect("current url")
    }

    /// The page's HTML source.
    pub async fn source(&self) -> String {
        self.client.source().await.expect("page source")
    }

    /// Saves a PNG of the current viewport to `path`.
    pub async fn screenshot_to(&self, path: &std::path::Path) {
        match self.client.screenshot().await {
            Ok(png) => {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::write(path, png) {
                    eprintln!("cannot write screenshot {}: {e}", path.display());
                }
            }
            Err(e) => eprintln!("cannot take a screenshot: {e}"),
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A panicking test may never reach `close`; the driver must not outlive it.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where failure screenshots go: `<target dir>/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

/// Runs a browser test body; when it panics, saves a screenshot named after the test first and
/// then re-raises the panic.
pub async fn with_browser<F, Fut>(test_name: &str, body: F)
where
    F: FnOnce(Page) -> Fut,
    Fut: Future<Output = ()>,
{
    let _slot = BROWSER_SLOTS
        .acquire()
        .await
        .expect("the browser semaphore is never closed");
    let browser = Browser::start().await;
    let outcome = AssertUnwindSafe(body(browser.page())).catch_unwind().await;
    if let Err(panic) = outcome {
        let path = screenshot_dir().join(format!("{test_name}.png"));
        browser.page().screenshot_to(&path).await;
        eprintln!("failure screenshot: {}", path.display());
        browser.close().await;
        std::panic::resume_unwind(panic);
    }
    browser.close().await;
}
