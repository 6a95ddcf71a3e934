//! The CLIs' client for a running daemon's local HTTP API, found through the
//! `api.addr` file in the data directory.

use iq_protocol::datadir::{DataDir, Role};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    DataDir(#[from] iq_protocol::datadir::DataDirError),
    #[error(
        "the daemon for {dir} is not running (nothing answers at {addr}): start it with `{bin} run --data {dir}`"
    )]
    NotRunning {
        dir: String,
        addr: String,
        bin: &'static str,
    },
    /// The daemon answered with an error; the message is its explanation.
    #[error("{0}")]
    Api(String),
    #[error("talking to the daemon at {addr} failed: {source}")]
    Http {
        addr: String,
        source: reqwest::Error,
    },
}

/// A client bound to one data directory's daemon.
#[derive(Debug)]
pub struct Client {
    base: String,
    dir: String,
    bin: &'static str,
    http: reqwest::Client,
}

impl Client {
    /// Finds the daemon of `data`, which must belong to `role`.
    pub fn new(data: &DataDir, role: Role) -> Result<Self, ClientError> {
        data.config(role)?;
        let bin = match role {
            Role::Quarter => "iq-node",
            Role::Center => "iq-center",
        };
        let addr = data.api_addr()?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|source| ClientError::Http {
                addr: addr.to_string(),
                source,
            })?;
        Ok(Self {
            base: format!("http://{addr}"),
            dir: data.path().display().to_string(),
            bin,
            http,
        })
    }

    fn map_err(&self, source: reqwest::Error) -> ClientError {
        if source.is_connect() {
            ClientError::NotRunning {
                dir: self.dir.clone(),
                addr: self.base.clone(),
                bin: self.bin,
            }
        } else {
            ClientError::Http {
                addr: self.base.clone(),
                source,
            }
        }
    }

    async fn decode<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, ClientError> {
        if resp.status().is_success() {
            return resp.json().await.map_err(|e| self.map_err(e));
        }
        let status = resp.status();
        match resp.json::<ErrorBody>().await {
            Ok(body) => Err(ClientError::Api(body.error)),
            Err(_) => Err(ClientError::Api(format!("the daemon answered {status}"))),
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = request.send().await.map_err(|e| self.map_err(e))?;
        self.decode(resp).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path)).query(query)).await
    }

    /// `GET` of a binary answer (the store export behind `backup`).
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>, ClientError> {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .map_err(|e| self.map_err(e))?;
        if !resp.status().is_success() {
            let status = resp.status();
            return match resp.json::<ErrorBody>().await {
                Ok(body) => Err(ClientError::Api(body.error)),
                Err(_) => Err(ClientError::Api(format!("the daemon answered {status}"))),
            };
        }
        let bytes = resp.bytes().await.map_err(|e| self.map_err(e))?;
        Ok(bytes.to_vec())
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }
}
