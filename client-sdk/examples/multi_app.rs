//! Several apps of one device on one shared connection: one socket, one heartbeat, a session and
//! an event stream per app.
//!
//! ```sh
//! cargo run -p herald-client --example multi_app -- 127.0.0.1:7401 alice \
//!     demo=eyJhbGci... other-app=eyJhbGci...
//! ```
//!
//! Arguments: a Dispatch seed (gRPC address), the user, then `app=token` for each app.

use anyhow::{bail, Context};
use futures::stream::{SelectAll, StreamExt};
use herald_client::{Connection, Event, SessionConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let mut args = std::env::args().skip(1);
    let seed = args.next().context("usage: multi_app SEED USER APP=TOKEN...")?;
    let user = args.next().context("usage: multi_app SEED USER APP=TOKEN...")?;
    let apps: Vec<(String, String)> = args
        .map(|a| {
            a.split_once('=')
                .map(|(app, token)| (app.to_string(), token.to_string()))
        })
        .collect::<Option<_>>()
        .context("apps are given as APP=TOKEN")?;
    if apps.is_empty() {
        bail!("name at least one APP=TOKEN");
    }

    // One connection for the whole device.
    let conn = Connection::builder().dispatch_seeds([seed]).build()?;

    // Each app opens its own session on it, with its own token and cursors, and gets its own
    // client and event stream. Here the streams are merged, each event tagged with its app.
    let mut clients = Vec::new();
    let mut all = SelectAll::new();
    for (app, token) in apps {
        let (client, events) = conn
            .open(SessionConfig::new(&app, &user, "multi-app-demo").token(token))
            .await?;
        println!("opened session {} for app {app}", client.session_id());
        clients.push(client);
        all.push(events.map(move |e| (app.clone(), e)));
    }

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            next = all.next() => match next {
                None => break, // every session ended
                Some((app, Event::Message(m))) => {
                    println!("[{app}] message {} seq={} {}", m.msg_id, m.seq, String::from_utf8_lossy(&m.payload))
                }
                Some((app, Event::Connected { node_id, .. })) => println!("[{app}] connected to node {node_id}"),
                Some((app, Event::Disconnected { reason })) => println!("[{app}] disconnected: {reason}"),
                Some((app, other)) => println!("[{app}] {other:?}"),
            },
        }
    }
    // Ends every session (acking what was shown) and the connection.
    conn.close().await;
    Ok(())
}
