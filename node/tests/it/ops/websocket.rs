//! The WebSocket client listener: the same frames in binary messages, Dispatch names it, and the
//! connection counts as transport "ws".

use anyhow::bail;
use herald_node::room::ws::WsStream;
use herald_proto::v1 as pb;

use super::{http_get, metric, ops_cluster};
use crate::harness::{eventually, NODE_WAIT};
use crate::raw::{Raw, Who};

/// A raw protocol client over a WebSocket to `addr`.
async fn ws_raw(addr: &str) -> Raw {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .unwrap_or_else(|e| panic!("websocket connect to {addr}: {e}"));
    assert_eq!(resp.status().as_u16(), 101);
    Raw::from_io(Box::new(WsStream::new(ws)))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_client_gets_pushes_and_acks_them() {
    let (c, admin, ws) = ops_cluster(3, &[]).await;
    let app = c.create_app("wsapp").await;

    // Dispatch for transport "ws" lists the WebSocket addresses (once every node announced).
    let mut grpc = c.client(1).await;
    let nodes = eventually("dispatch to list three ws addresses", NODE_WAIT, || {
        let mut g = grpc.clone();
        async move {
            let r = g
                .dispatch(pb::DispatchRequest {
                    app: "wsapp".into(),
                    user: "bob".into(),
                    transport: "ws".into(),
                })
                .await?
                .into_inner();
            if r.nodes.len() == 3 {
                Ok(r.nodes)
            } else {
                bail!("{r:?}")
            }
        }
    })
    .await;
    let mut listed: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    listed.sort();
    let mut want = ws.clone();
    want.sort();
    assert_eq!(listed, want);

    // A message stored while bob is away is replayed over the WebSocket, a live one follows.
    grpc.push(app.push_request("bob", "while-away", "w1"))
        .await
        .unwrap();
    let mut raw = ws_raw(&ws[1]).await;
    let who = Who {
        app: app.id.clone(),
        user: "bob".into(),
        device: "browser".into(),
        platform: "web".into(),
        token: app.token("bob", None),
    };
    let welcome = raw.hello(&who, 0).await.unwrap();
    assert_eq!(welcome.node_id, 2);
    let first = raw.pushes(1).await.unwrap().remove(0);
    assert_eq!((&first.payload[..], first.seq), (&b"while-away"[..], 1));
    grpc.push(app.push_request("bob", "live", "w2")).await.unwrap();
    let second = raw.pushes(1).await.unwrap().remove(0);
    assert_eq!((&second.payload[..], second.seq), (&b"live"[..], 2));
    raw.ack(1, 2).await.unwrap();

    // The ack commits: bob's device cursor moves and the mailbox empties.
    eventually("bob's ack to commit", NODE_WAIT, || {
        let mut g = grpc.clone();
        let req = app.request(pb::StatusRequest {
            app: "wsapp".into(),
            user: "bob".into(),
        });
        async move {
            let s = g.status(req).await?.into_inner();
            if s.pending == 0 && s.devices.iter().any(|d| d.device == "browser" && d.acked == 2) {
                Ok(())
            } else {
                bail!("{s:?}")
            }
        }
    })
    .await;

    // Node 2 counts one WebSocket connection.
    let m = http_get(&admin[1], "/metrics", None).await.unwrap().body;
    assert_eq!(
        metric(&m, "herald_connections{transport=\"ws\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "herald_connections{transport=\"tcp\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "herald_app_connections{app=\"wsapp\",transport=\"ws\"}"),
        Some(1.0),
        "{m}"
    );

    // A text message is not part of the protocol: the connection ends.
    let (mut plain, _) = tokio_tungstenite::connect_async(format!("ws://{}/", ws[0]))
        .await
        .unwrap();
    use futures::{SinkExt, StreamExt};
    plain
        .send(tokio_tungstenite::tungstenite::Message::Text("hello".into()))
        .await
        .unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Some(m) = plain.next().await {
            if m.is_err() || matches!(m, Ok(tokio_tungstenite::tungstenite::Message::Close(_))) {
                return;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the server kept a connection that sent text");
    c.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_message_over_the_frame_limit_is_refused_like_an_oversized_frame() {
    use futures::SinkExt;
    use herald_proto::client::{frame::Kind, ErrorCode};
    let (c, _admin, ws) = ops_cluster(1, &["--max-frame", "1024"]).await;
    let app = c.create_app("wsbig").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/", ws[0]))
        .await
        .unwrap();
    // One byte over a whole max frame with its length prefix (1024 + 4).
    socket
        .send(tokio_tungstenite::tungstenite::Message::Binary(
            vec![0u8; 1029].into(),
        ))
        .await
        .unwrap();
    let mut raw = Raw::from_io(Box::new(WsStream::new(socket)));
    match raw.recv().await.unwrap() {
        Kind::Error(e) => assert_eq!(e.code(), ErrorCode::FrameTooLarge, "{e:?}"),
        other => panic!("expected ERROR FRAME_TOO_LARGE, got {other:?}"),
    }
    assert!(raw.closed_within(std::time::Duration::from_secs(5)).await);

    // A message of one whole max frame is served (HELLO is far smaller; the limit is per message).
    let mut ok = ws_raw(&ws[0]).await;
    let who = Who {
        app: app.id.clone(),
        user: "gina".into(),
        device: "browser".into(),
        platform: "web".into(),
        token: app.token("gina", None),
    };
    ok.hello(&who, 0).await.unwrap();
    ok.ping(1).await.unwrap();
    c.assert_no_panics();
}
