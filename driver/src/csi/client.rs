//! A gRPC channel to a CSI endpoint's unix socket, for clients of the plugin (the example
//! client, the benchmark, the tests). tonic speaks HTTP/2 with authority `localhost`.

use std::path::Path;

use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the plugin listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
}
