//! Test helpers: the real `pingapp` binary on random ports, and WebSocket
//! and HTTP clients that talk to it like browsers do.

use serde_json::Value;
pub use testkit::ws::{Client, Closed, WAIT};

#[path = "../common/server.rs"]
mod server;

pub use server::Server;

impl Server {
    /// Starts `pingapp` with the database in `dir`.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        Self::start_with_env(dir, extra, &[])
    }

    /// Starts `pingapp` with the database in `dir` and extra environment.
    pub fn start_with_env(dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::launch("127.0.0.1:0", dir, extra, env)
    }

    /// The admin base URL.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The status of `GET` on the admin listener's `path`.
    pub async fn admin_status(&self, path: &str) -> u16 {
        reqwest::get(self.admin_url(path))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Connects a WebSocket client to `path` (e.g. `/ws/public/?v=2`).
    pub async fn ws(&self, path: &str) -> Client {
        Client::connect(self.addr, path).await
    }

    /// GET a JSON document; returns status and body.
    pub async fn get_json(&self, path: &str, bearer: Option<&str>) -> (u16, Value) {
        let mut req = reqwest::Client::new().get(self.url(path));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, body)
    }

    /// The value of one metric sample line starting with `prefix`, summed.
    pub async fn metric(&self, prefix: &str) -> f64 {
        let text = reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A v2 public client past its welcome and first view; returns (client,
/// id, token).
pub async fn public_v2(server: &Server) -> (Client, String, String) {
    let mut c = server.ws("/ws/public/?v=2").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["command"], "welcome", "{welcome}");
    let id = welcome["channel_name"].as_str().unwrap().to_owned();
    let token = welcome["token"].as_str().unwrap().to_owned();
    let view = c.recv().await;
    assert_eq!(view["command"], "view", "{view}");
    c.id.clone_from(&id);
    (c, id, token)
}
