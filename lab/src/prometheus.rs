//! A real Prometheus (Debian's `prometheus` 2.42) scraping a real
//! `prometheus-pushgateway` (1.5), both on 127.0.0.1, as a cluster's
//! monitoring stack would: the test pushes `gpu_job_queue_depth` to the
//! gateway, as a seed's scripts do, and reads it back through Prometheus'
//! HTTP API (`/api/v1/query`), which is where KEDA and the sidecar read it.
//!
//! Prometheus scrapes every `scrape_interval` (the tests use 1s), so a
//! pushed value shows in queries after one or two scrapes;
//! [`Prometheus::wait_value`] waits for it. [`Prometheus::stop_server`] and
//! [`Prometheus::start_server`] take the server away and bring it back on
//! the same port and storage, for the "Prometheus unreachable" case.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use super::util::{self, log_tail, ChildGuard, TestDir};

pub struct Prometheus {
    server: Option<ChildGuard>,
    // Held for its Drop, which stops the pushgateway.
    _gateway: ChildGuard,
    /// `127.0.0.1:PORT` of Prometheus.
    pub addr: String,
    /// `127.0.0.1:PORT` of the pushgateway.
    pub gateway_addr: String,
    dir: TestDir,
}

/// The programs this harness runs; `.ci/run` installs both packages.
pub const TOOLS: &[&str] = &["prometheus", "prometheus-pushgateway"];

impl Prometheus {
    /// Starts the pushgateway, then Prometheus scraping it every
    /// `scrape_interval` (`"1s"`), and waits until both answer.
    pub fn start(scrape_interval: &str) -> anyhow::Result<Prometheus> {
        for t in TOOLS {
            if util::find_in_path(t).is_none() {
                bail!("{t} is not on PATH: apt-get install prometheus prometheus-pushgateway (.ci/run does)");
            }
        }
        let dir = TestDir::new("prometheus")?;
        let gateway_addr = format!("127.0.0.1:{}", util::free_port()?);
        let mut cmd = util::command("prometheus-pushgateway");
        cmd.arg(format!("--web.listen-address={gateway_addr}"))
            .stdin(Stdio::null())
            .stdout(log_file(&dir, "pushgateway.log")?)
            .stderr(log_file(&dir, "pushgateway.log")?);
        let gateway = ChildGuard::spawn(cmd, "prometheus-pushgateway")?;
        wait_ready(&gateway_addr, "/-/ready", &dir, "pushgateway.log")?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n\
                 scrape_configs:\n  - job_name: pushgateway\n    honor_labels: true\n    \
                 static_configs:\n      - targets: [\"{gateway_addr}\"]\n"
            ),
        )?;
        let mut p = Prometheus {
            server: None,
            _gateway: gateway,
            addr: format!("127.0.0.1:{}", util::free_port()?),
            gateway_addr,
            dir,
        };
        p.start_server()?;
        Ok(p)
    }

    /// `http://127.0.0.1:PORT`: what `sidecar.prometheus` names.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (Re)starts the Prometheus server on its port and storage.
    pub fn start_server(&mut self) -> anyhow::Result<()> {
        let mut cmd = util::command("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            self.dir.join("prometheus.yml").display()
        ))
        .arg(format!("--web.listen-address={}", self.addr))
        .arg(format!(
            "--storage.tsdb.path={}",
            self.dir.join("data").display()
        ))
        .stdin(Stdio::null())
        .stdout(log_file(&self.dir, "prometheus.log")?)
        .stderr(log_file(&self.dir, "prometheus.log")?);
        self.server = Some(ChildGuard::spawn(cmd, "prometheus")?);
        wait_ready(&self.addr, "/-/ready", &self.dir, "prometheus.log")
    }

    /// Kills the server: queries then fail to connect.
    pub fn stop_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// Replaces job `job`'s metrics on the gateway with `text` (exposition
    /// format, e.g. `"gpu_job_queue_depth 12\n"`).
    pub fn push(&self, job: &str, text: &str) -> anyhow::Result<()> {
        let (status, body) = util::http_request(
            &self.gateway_addr,
            "PUT",
            &format!("/metrics/job/{job}"),
            text,
        )?;
        if !(200..300).contains(&status) {
            bail!("pushgateway answered {status}: {body}");
        }
        Ok(())
    }

    /// `/api/v1/query` as JSON.
    pub fn query(&self, q: &str) -> anyhow::Result<serde_json::Value> {
        let path = format!(
            "/api/v1/query?query={}",
            percent_encoding::utf8_percent_encode(q, percent_encoding::NON_ALPHANUMERIC)
        );
        let (_, body) = util::http_request(&self.addr, "GET", &path, "")?;
        serde_json::from_str(&body).with_context(|| format!("not JSON: {body}"))
    }

    /// Waits until query `q` gives `want`; returns how long that took.
    pub fn wait_value(&self, q: &str, want: f64, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut last = serde_json::Value::Null;
        while start.elapsed() < timeout {
            if let Ok(v) = self.query(q) {
                let got = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok());
                if got == Some(want) {
                    return Ok(start.elapsed());
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(anyhow!(
            "{q} did not become {want} within {timeout:?}; last answer {last}\n{}",
            log_tail(&self.dir.join("prometheus.log"), 20)
        ))
    }
}

fn log_file(dir: &TestDir, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("open {name}"))
}

fn wait_ready(addr: &str, path: &str, dir: &TestDir, log: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = util::http_request(addr, "GET", path, "") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{addr}{path} not ready in 30 s\n{}",
                log_tail(&dir.join(log), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
