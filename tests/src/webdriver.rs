//! A real browser for the console's tests: headless Chromium from the
//! distribution's packages (`chromium`, `chromium-driver`), driven over the
//! W3C WebDriver protocol (JSON over HTTP to `chromedriver` on a port it
//! picks on loopback).
//!
//! Only what the tests use: open a page, find elements, read their text
//! and attributes, click, run a script, take a screenshot, and downloads
//! into a directory of the test's. A missing browser is an error that
//! names the packages (the README's test command installs them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The key of an element reference in WebDriver JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long one WebDriver command may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// Where the distribution's packages put the programs.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium session; the driver (and with it the browser) is
/// killed when this is dropped.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    downloads: PathBuf,
}

/// An element of the current page.
#[derive(Clone, Debug)]
pub struct Element(String);

impl Browser {
    /// Starts `chromedriver` and a headless Chromium session whose
    /// downloads go to `downloads` (created).
    pub async fn start(downloads: &Path) -> anyhow::Result<Browser> {
        for program in [CHROMEDRIVER, CHROMIUM] {
            if !Path::new(program).exists() {
                bail!(
                    "{program} is missing: install the distribution's chromium and \
                     chromium-driver packages (tests/run does when they are missing)"
                );
            }
        }
        std::fs::create_dir_all(downloads).context("create the download directory")?;
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start chromedriver")?;
        let stdout = driver.stdout.take().context("chromedriver stdout")?;
        let port = tokio::time::timeout(COMMAND_LIMIT, async {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let port: u16 = rest
                        .trim_end_matches('.')
                        .trim()
                        .parse()
                        .with_context(|| format!("chromedriver's port in {line:?}"))?;
                    // Keep reading so the pipe never fills.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Ok(port);
                }
            }
            Err(anyhow!("chromedriver ended before saying its port"))
        })
        .await
        .context("chromedriver did not say its port in time")??;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    // As root in a sandbox-less container; no network but loopback.
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        "--disable-dev-shm-usage", "--window-size=1280,1000",
                    ],
                    "prefs": {
                        "download.default_directory": downloads,
                        "download.prompt_for_download": false,
                    },
                },
            }},
        });
        let answer = call(addr, "POST", "/session", Some(capabilities)).await?;
        let session = answer["sessionId"]
            .as_str()
            .context("no sessionId in the new session's answer")?
            .to_owned();
        let browser = Browser {
            driver,
            addr,
            session,
            downloads: downloads.to_owned(),
        };
        // Headless Chromium saves downloads only when told where.
        let _ = browser
            .command(
                "POST",
                "/goog/cdp/execute",
                json!({"cmd": "Browser.setDownloadBehavior",
                       "params": {"behavior": "allow", "downloadPath": downloads}}),
            )
            .await;
        Ok(browser)
    }

    async fn command(&self, method: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        let body = if method == "GET" { None } else { Some(body) };
        call(self.addr, method, &path, body).await
    }

    /// Opens `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command("POST", "/url", json!({ "url": url })).await?;
        Ok(())
    }

    /// The current page's address.
    pub async fn url(&self) -> anyhow::Result<String> {
        let v = self.command("GET", "/url", Value::Null).await?;
        v.as_str().map(str::to_owned).context("url is not text")
    }

    /// The first element matching the CSS selector.
    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let v = self
            .command(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await
            .with_context(|| format!("find {css:?}"))?;
        element(&v)
    }

    /// Every element matching the CSS selector.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let v = self
            .command(
                "POST",
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        v.as_array()
            .context("elements")?
            .iter()
            .map(element)
            .collect()
    }

    /// An element's rendered text.
    pub async fn text(&self, e: &Element) -> anyhow::Result<String> {
        let v = self
            .command("GET", &format!("/element/{}/text", e.0), Value::Null)
            .await?;
        v.as_str().map(str::to_owned).context("text")
    }

    /// An element's attribute.
    pub async fn attr(&self, e: &Element, name: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .command(
                "GET",
                &format!("/element/{}/attribute/{name}", e.0),
                Value::Null,
            )
            .await?;
        Ok(v.as_str().map(str::to_owned))
    }

    /// Clicks an element.
    pub async fn click(&self, e: &Element) -> anyhow::Result<()> {
        self.command("POST", &format!("/element/{}/click", e.0), json!({}))
            .await?;
        Ok(())
    }

    /// Clears a form field and types `text` into it.
    pub async fn fill(&self, e: &Element, text: &str) -> anyhow::Result<()> {
        self.command("POST", &format!("/element/{}/clear", e.0), json!({}))
            .await?;
        self.command(
            "POST",
            &format!("/element/{}/value", e.0),
            json!({ "text": text }),
        )
        .await?;
        Ok(())
    }

    /// Runs `script` (a function body) in the page and returns its value.
    pub async fn script(&self, script: &str) -> anyhow::Result<Value> {
        self.command(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Waits, at most `limit`, until `script` returns true in the page.
    pub async fn wait_until(&self, script: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.script(script).await? == Value::Bool(true) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the page did not come to `{script}` within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits, at most `limit`, for an element matching the CSS selector
    /// (after a click that loads another page, the old one may still be
    /// there for a moment), and returns the first.
    pub async fn wait_for(&self, css: &str, limit: Duration) -> anyhow::Result<Element> {
        let query = serde_json::to_string(css)?;
        self.wait_until(
            &format!("return document.querySelector({query}) !== null"),
            limit,
        )
        .await?;
        self.find(css).await
    }

    /// A PNG of the current page's viewport.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        let v = self.command("GET", "/screenshot", Value::Null).await?;
        let b64 = v.as_str().context("screenshot is not text")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .context("screenshot is not base64")?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("the screenshot is not a PNG");
        }
        Ok(png)
    }

    /// Resizes the window (for screenshots of whole pages).
    pub async fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.command(
            "POST",
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await?;
        Ok(())
    }

    /// Where downloads go.
    pub fn downloads(&self) -> &Path {
        &self.downloads
    }

    /// Waits, at most `limit`, for a finished download (no `.crdownload`)
    /// whose name starts with `prefix`, and returns its path.
    pub async fn wait_download(&self, prefix: &str, limit: Duration) -> anyhow::Result<PathBuf> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = std::fs::read_dir(&self.downloads)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix) && !n.ends_with(".crdownload"))
                });
            if let Some(p) = done {
                return Ok(p);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no download named {prefix}* in {} within {limit:?}",
                    self.downloads.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the session (the driver is killed on drop either way).
    pub async fn quit(mut self) -> anyhow::Result<()> {
        let path = format!("/session/{}", self.session);
        let r = call(self.addr, "DELETE", &path, None).await;
        let _ = self.driver.kill().await;
        r.map(|_| ())
    }
}

fn element(v: &Value) -> anyhow::Result<Element> {
    v.get(ELEMENT_KEY)
        .and_then(Value::as_str)
        .map(|id| Element(id.to_owned()))
        .with_context(|| format!("not an element: {v}"))
}

/// One WebDriver command: its `value`, or the driver's error as an error.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, text) = tokio::time::timeout(COMMAND_LIMIT, http(addr, method, path, body))
        .await
        .with_context(|| format!("WebDriver {method} {path} took over {COMMAND_LIMIT:?}"))??;
    let v: Value = serde_json::from_slice(&text)
        .with_context(|| format!("WebDriver {method} {path}: not JSON"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if status != 200 {
        bail!(
            "WebDriver {method} {path}: {status} {}: {}",
            value["error"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or("?")
        );
    }
    // A new session answers {"value": {"sessionId": ..., "capabilities": ...}}.
    Ok(value)
}

/// An HTTP/1.1 request on a new connection; the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}
