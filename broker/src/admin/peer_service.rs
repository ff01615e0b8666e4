//! The owner's side of requests forwarded by another broker of the cluster
//! ([`crate::peer`]): the proof checked first, only the kinds a broker
//! forwards ([`forwarded`]) answered, by this broker's admin handler with
//! forwarding off, so a request never travels on.

use std::pin::Pin;
use std::sync::Arc;

use ferry_common::admin::{AdminError, AdminErrorCode, AdminResponseV1};
use ferry_common::frame;
use ferry_common::limits::MAX_ADMIN_FRAME_LEN;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::AdminContext;
use crate::endpoint::{answer_preamble, EndpointService};
use crate::peer::{forwarded, PeerKey, PeerMessage, MAX_PEER_FRAME_LEN, REQUEST_TIMEOUT};

/// Peer connections served at once; past it a new one is closed at once.
/// Brokers forward one operator's request at a time each.
pub const MAX_PEER_CONNECTIONS: usize = 16;

/// The server side: answers other brokers' requests with this broker's
/// admin handler (which does not forward them again).
pub struct PeerService {
    ctx: AdminContext,
    key: PeerKey,
    /// Places of [`MAX_PEER_CONNECTIONS`].
    places: Arc<tokio::sync::Semaphore>,
}

impl PeerService {
    /// `ctx` must not forward (`peers: None`).
    pub fn new(mut ctx: AdminContext, key: PeerKey) -> PeerService {
        ctx.peers = None;
        PeerService {
            ctx,
            key,
            places: Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS)),
        }
    }
}

impl EndpointService for PeerService {
    fn serve(
        &self,
        conn: quinn::Connection,
        token: CancellationToken,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let (ctx, key) = (self.ctx.clone(), self.key.clone());
        let place = self.places.clone().try_acquire_owned();
        Box::pin(async move {
            let Ok(_place) = place else {
                conn.close(0u32.into(), b"busy");
                return;
            };
            tokio::select! {
                _ = token.cancelled() => {}
                _ = serve_one(&ctx, &key, &conn) => {}
            }
            conn.close(0u32.into(), b"done");
        })
    }
}

async fn serve_one(ctx: &AdminContext, key: &PeerKey, conn: &quinn::Connection) {
    let Ok(Ok((mut send, mut recv))) = timeout(REQUEST_TIMEOUT, conn.accept_bi()).await else {
        return;
    };
    if answer_preamble(
        &mut send,
        &mut recv,
        REQUEST_TIMEOUT,
        "broker",
        "run the same Ferry version on every broker",
    )
    .await
    .is_err()
    {
        return;
    }
    let read = timeout(
        REQUEST_TIMEOUT,
        frame::read_message_within::<PeerMessage, _, MAX_PEER_FRAME_LEN>(&mut recv),
    )
    .await;
    let Ok(Ok(Some(PeerMessage::V1 { proof, request }))) = read else {
        return;
    };
    // Nothing is said to a peer that has not proven it holds the key.
    let answer = if !key.check(conn, &proof) {
        tracing::warn!(remote = %conn.remote_address(),
            "refused a request from another broker: its proof does not match this broker's \
             key (every broker needs the same pki_dir; after a key rotation, restart them all)");
        AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::NotAllowed,
            message: "refused: this broker's key differs from the asking broker's (every \
                      broker needs the same pki_dir; after a key rotation, restart them all)"
                .into(),
        })
    } else if !forwarded(&request) {
        AdminResponseV1::Error(AdminError {
            code: AdminErrorCode::NotAllowed,
            message: "brokers forward only drains, disconnects and live views".into(),
        })
    } else {
        super::handle(ctx, request).await
    };
    let _ = timeout(
        REQUEST_TIMEOUT,
        frame::write_message(&mut send, &answer, MAX_ADMIN_FRAME_LEN),
    )
    .await;
    let _ = send.finish();
    let _ = timeout(REQUEST_TIMEOUT, send.stopped()).await;
}
