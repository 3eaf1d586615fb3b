//! Prints every event of one session until Ctrl-C.
//!
//! ```sh
//! # against `herald dev` (it prints a token for alice):
//! cargo run -p herald-client --example listen -- \
//!     --dispatch 127.0.0.1:7401 --app demo --user alice --device laptop --token eyJhbGci...
//! ```
//!
//! Options: `--dispatch ADDR` (gRPC, repeatable) and/or `--node ADDR` (client address,
//! repeatable), `--app`, `--user`, `--device`, `--token`, `--topic T` (repeatable), `--ca PEM`
//! (TLS with this CA), `--store DIR` (keep cursors there, so a restart resumes), `--manual-ack`,
//! `--adaptive-heartbeat`. `RUST_LOG=herald_client=debug` shows the SDK's logs.

use anyhow::{bail, Context};
use futures::StreamExt;
use herald_client::{AckMode, Client, Event, FileStore, HeartbeatConfig, TlsConfig};

#[derive(Default)]
struct Args {
    dispatch: Vec<String>,
    nodes: Vec<String>,
    app: Option<String>,
    user: Option<String>,
    device: String,
    token: Option<String>,
    topics: Vec<String>,
    ca: Option<String>,
    store: Option<String>,
    manual_ack: bool,
    adaptive: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        device: "listen".into(),
        ..Default::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dispatch" => a.dispatch.push(value()?),
            "--node" => a.nodes.push(value()?),
            "--app" => a.app = Some(value()?),
            "--user" => a.user = Some(value()?),
            "--device" => a.device = value()?,
            "--token" => a.token = Some(value()?),
            "--topic" => a.topics.push(value()?),
            "--ca" => a.ca = Some(value()?),
            "--store" => a.store = Some(value()?),
            "--manual-ack" => a.manual_ack = true,
            "--adaptive-heartbeat" => a.adaptive = true,
            other => bail!("unknown option {other} (see the example's doc comment)"),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = parse()?;
    let app = args.app.context("--app is required")?;
    let user = args.user.context("--user is required")?;
    let token = args.token.context("--token is required")?;

    let mut builder = Client::builder(app, user, args.device)
        .token(token)
        .dispatch_seeds(args.dispatch)
        .nodes(args.nodes)
        .topics(args.topics)
        .ack_mode(if args.manual_ack {
            AckMode::Manual
        } else {
            AckMode::Auto
        })
        .heartbeat(HeartbeatConfig {
            adaptive: args.adaptive,
            ..HeartbeatConfig::default()
        });
    if let Some(ca) = args.ca {
        builder = builder.tls(TlsConfig::from_ca_pem_file(ca)?);
    }
    if let Some(dir) = args.store {
        builder = builder.store(FileStore::new(dir)?);
    }
    let (client, mut events) = builder.connect().await?;

    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            event = events.next() => match event {
                None => break,
                Some(Event::Message(m)) => {
                    let text = String::from_utf8_lossy(&m.payload);
                    match &m.topic {
                        None => println!("message {} seq={} {text}", m.msg_id, m.seq),
                        Some(t) => println!("message {} topic={t} seq={} {text}", m.msg_id, m.topic_seq),
                    }
                    if args.manual_ack {
                        m.ack();
                    }
                }
                Some(Event::Connected { node_id, addr, epoch }) => {
                    println!("connected node={node_id} addr={addr} epoch={epoch}")
                }
                Some(Event::Disconnected { reason }) => println!("disconnected: {reason}"),
                Some(Event::Gap(g)) => println!(
                    "gap topic={} {}..={} ({:?})",
                    g.topic.as_deref().unwrap_or("<mailbox>"),
                    g.from_seq,
                    g.to_seq,
                    g.reason
                ),
                Some(Event::Kicked { reason, .. }) => println!("kicked: {reason}"),
                Some(other) => println!("{other:?}"),
            },
        }
    }
    client.close().await?;
    Ok(())
}
