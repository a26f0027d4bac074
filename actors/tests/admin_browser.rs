//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver (WebDriver, by fantoccini). The queue table shows the
//! queues, a published message changes the depth within two seconds,
//! purging from the page (with the token, confirming the dialog) empties
//! the queue, and a depth alert appears and clears. A screenshot is kept in
//! the target directory (`admin-dashboard.png`).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`CHROMIUM` and
//! `CHROMEDRIVER` override their paths): ignored by the plain test command,
//! run by `.ci/run` (which installs them) with `--ignored`.

#![cfg(feature = "admin")]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use postbox::Runtime;
use postbox_actors::admin::{AdminOptions, AdminServer};
use postbox_actors::monitor::{MonitorOptions, Thresholds};
use postbox_actors::{Broker, Envelope, QueueOptions};
use serde_json::json;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TOKEN: &str = "browser-test-token-0123456789";
const QUEUE: &str = "browser.orders";

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: tokio::process::Child,
    url: String,
    profile: tempfile::TempDir,
}

impl Driver {
    async fn start() -> Result<Driver, Box<dyn std::error::Error>> {
        let path = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(&path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {path}: {e} (apt-get install chromium-driver)"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err("chromedriver did not start listening".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            profile: tempfile::tempdir()?,
        })
    }

    async fn browser(&self) -> Result<Client, Box<dyn std::error::Error>> {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1800",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", self.profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": binary, "args": args }),
        );
        Ok(ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await?)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Retries `f` (the page re-renders every second, so an element found a
/// moment ago may be gone) until it returns `Some` or `within` passes.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = f().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn text(client: &Client, css: &str) -> Option<String> {
    client.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn cell_is(client: &Client, column: &str, want: &str) -> Option<()> {
    let css = format!("#queues tr[data-queue=\"{QUEUE}\"] td.{column}");
    (text(client, &css).await? == want).then_some(())
}

async fn alert_shown(client: &Client) -> bool {
    let css = format!("#alerts li[data-queue=\"{QUEUE}\"][data-kind=\"depth\"]");
    client.find(Locator::Css(&css)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: .ci/run installs them and runs it"]
async fn the_dashboard_shows_queues_live_purges_and_alerts() -> TestResult {
    let rt = Runtime::new()?;
    let broker = Broker::new(&rt.handle());
    broker.declare_queue(QUEUE, QueueOptions::default()).await?;
    broker
        .declare_queue("browser.other", QueueOptions::default())
        .await?;
    let monitor = MonitorOptions::default()
        .interval(Duration::from_millis(200))
        .queue_thresholds(QUEUE, Thresholds::default().depth(2));
    let options = AdminOptions::default()
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .token(TOKEN)
        .mutations(true)
        .monitor(monitor);
    let server = AdminServer::start(&broker, options).await?;
    let driver = Driver::start().await?;
    let client = driver.browser().await?;
    let outcome = drive(&client, &broker, &server).await;
    // The screenshot, whatever happened: the artifact to look at.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("admin-dashboard.png");
    if let Ok(png) = client.screenshot().await {
        std::fs::write(&shot, png)?;
        eprintln!("screenshot: {}", shot.display());
    }
    let _ = client.close().await;
    server.shutdown().await;
    outcome
}

async fn drive(client: &Client, broker: &Broker, server: &AdminServer) -> TestResult {
    client.goto(&server.url()).await?;
    // The queue table shows both queues, empty.
    eventually(Duration::from_secs(10), "the queue table", || {
        cell_is(client, "ready", "0")
    })
    .await?;
    let other = "#queues tr[data-queue=\"browser.other\"] td.name";
    assert_eq!(text(client, other).await.as_deref(), Some("browser.other"));

    // A published message shows within two seconds.
    broker.publish(QUEUE, Envelope::new("order 1")).await?;
    eventually(Duration::from_secs(2), "the depth after a publish", || {
        cell_is(client, "ready", "1")
    })
    .await?;

    // Past the threshold, the depth alert appears.
    broker.publish(QUEUE, Envelope::new("order 2")).await?;
    broker.publish(QUEUE, Envelope::new("order 3")).await?;
    eventually(Duration::from_secs(5), "the depth alert", || async {
        alert_shown(client).await.then_some(())
    })
    .await?;

    // Purging from the page needs the token; the dialog is confirmed.
    client
        .find(Locator::Id("token"))
        .await?
        .send_keys(TOKEN)
        .await?;
    let purge = format!("button.purge[data-queue=\"{QUEUE}\"]");
    eventually(Duration::from_secs(5), "clicking purge", || async {
        client
            .find(Locator::Css(&purge))
            .await
            .ok()?
            .click()
            .await
            .ok()
    })
    .await?;
    eventually(
        Duration::from_secs(5),
        "the confirmation dialog",
        || async { client.accept_alert().await.ok() },
    )
    .await?;
    eventually(Duration::from_secs(5), "the purged queue", || async {
        let stats = broker.queue_stats(QUEUE).await.ok()?.stats;
        (stats.ready == 0).then_some(())
    })
    .await?;
    eventually(Duration::from_secs(2), "the depth after the purge", || {
        cell_is(client, "ready", "0")
    })
    .await?;
    let status = text(client, "#status").await.unwrap_or_default();
    assert!(
        status.contains("live") || status.contains("purged"),
        "{status}"
    );

    // And the alert clears.
    eventually(Duration::from_secs(5), "the alert clearing", || async {
        (!alert_shown(client).await).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver: .ci/run installs them and runs it"]
async fn the_dashboard_with_protected_reads_shows_queues_once_given_the_token() -> TestResult {
    let rt = Runtime::new()?;
    let broker = Broker::new(&rt.handle());
    broker.declare_queue(QUEUE, QueueOptions::default()).await?;
    let options = AdminOptions::default()
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .token(TOKEN)
        .protect_reads(true);
    let server = AdminServer::start(&broker, options).await?;
    let driver = Driver::start().await?;
    let client = driver.browser().await?;
    let outcome = async {
        client.goto(&server.url()).await?;
        // Without the token every read is refused, and the page says so.
        eventually(Duration::from_secs(5), "the refusal shown", || async {
            let status = text(&client, "#status").await?;
            status.contains("401").then_some(())
        })
        .await?;
        assert!(text(&client, "#queues tbody tr").await.is_none());
        // With it, the page's reads carry it.
        client
            .find(Locator::Id("token"))
            .await?
            .send_keys(TOKEN)
            .await?;
        eventually(Duration::from_secs(5), "the queue table", || {
            cell_is(&client, "ready", "0")
        })
        .await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    let _ = client.close().await;
    server.shutdown().await;
    outcome
}
