//! Plain HTTP/1.1 GETs to proxies' admin ports (metrics).

/// One GET over a fresh HTTP/1.1 connection (proxy admin, agent logs).
pub async fn http_get(addr: &str, path: &str) -> Result<http::Response<hyper::body::Incoming>, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(request).await.map_err(|e| e.to_string())
}

/// A proxy's metrics text, with every latency bucket: percentiles are
/// read from them.
pub async fn scrape(addr: &str) -> Result<String, String> {
    use http_body_util::BodyExt;
    let response = http_get(addr, "/metrics?detail=full").await?;
    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
