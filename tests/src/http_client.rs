//! A real HTTP client for tests that need more than [`crate::http`]'s one request per
//! connection: hyper-util's client over HTTP/1.1, or HTTP/2 without TLS (prior
//! knowledge), many requests multiplexed on one connection; bodies given whole or as a
//! stream of chunks (sent chunked, with no length).

use std::net::SocketAddr;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

type Body = BoxBody<Bytes, std::io::Error>;

/// A client of one server; clones share its connection pool.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Body>,
    addr: SocketAddr,
}

/// A request that got no complete answer (connection refused or reset, …).
pub type HttpError = Box<dyn std::error::Error + Send + Sync>;

impl HttpClient {
    /// HTTP/1.1, one request at a time per connection.
    pub fn http1(addr: SocketAddr) -> HttpClient {
        HttpClient::build(addr, false)
    }

    /// HTTP/2 with prior knowledge: every request on one connection.
    pub fn http2(addr: SocketAddr) -> HttpClient {
        HttpClient::build(addr, true)
    }

    fn build(addr: SocketAddr, h2: bool) -> HttpClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(connector);
        HttpClient { client, addr }
    }

    /// Sends `body` (whole) and reads the whole answer: status and body text.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<(u16, String), HttpError> {
        let body = Full::new(body.into())
            .map_err(|never| match never {})
            .boxed();
        self.request(method, path, body).await
    }

    /// POSTs a JSON value.
    pub async fn post_json(
        &self,
        path: &str,
        v: &serde_json::Value,
    ) -> Result<(u16, String), HttpError> {
        self.send("POST", path, v.to_string()).await
    }

    /// Sends a body as these chunks (no Content-Length), then reads the whole answer.
    pub async fn send_chunks(
        &self,
        path: &str,
        chunks: Vec<Bytes>,
    ) -> Result<(u16, String), HttpError> {
        let frames = futures_stream(chunks);
        self.request("POST", path, BodyExt::boxed(StreamBody::new(frames)))
            .await
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Body,
    ) -> Result<(u16, String), HttpError> {
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .body(body)?;
        let res = self.client.request(req).await?;
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

fn futures_stream(
    chunks: Vec<Bytes>,
) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send + Sync + 'static
{
    tokio_stream::iter(chunks.into_iter().map(|c| Ok(Frame::data(c))))
}

/// The `data:` payloads of a server-sent-events body, in order.
pub fn sse_data(body: &str) -> Vec<&str> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect()
}
