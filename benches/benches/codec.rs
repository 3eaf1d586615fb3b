//! Micro-benchmarks of the client frame codec (the per-delivery encode and per-frame decode).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_proto::client::{frame::Kind, Frame, Push, Qos};
use herald_proto::frame;

fn push_frame() -> Frame {
    Frame {
        kind: Some(Kind::Push(Push {
            session_id: 1,
            msg_id: "1-5f3a-123456".into(),
            seq: 123_456,
            payload: vec![b'x'; 100].into(),
            qos: Qos::AtLeastOnce as i32,
            pushed_at_ms: 1_790_000_000_000,
            ..Default::default()
        })),
    }
}

fn codec(c: &mut Criterion) {
    let f = push_frame();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_push_100b", |b| {
        let mut buf = BytesMut::with_capacity(256);
        b.iter(|| {
            buf.clear();
            frame::encode(&f, &mut buf);
            criterion::black_box(buf.len())
        })
    });
    let wire = frame::encode_to_bytes(&f);
    g.bench_function("decode_push_100b", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            criterion::black_box(frame::decode(&mut buf, frame::DEFAULT_MAX_FRAME).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
