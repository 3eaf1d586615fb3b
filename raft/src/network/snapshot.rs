//! Snapshot streaming: a [`SnapshotDir`](crate::types::SnapshotDir) (a flat directory holding a
//! RocksDB checkpoint and `meta.bin`) travels as one client-streaming `InstallSnapshot` call:
//!
//! 1. a header: the leader's vote, the snapshot meta, and every file with its size and crc32;
//! 2. data chunks of at most `snapshot_chunk_bytes`, file after file in header order, each at the
//!    offset where the previous chunk of that file ended;
//! 3. `done`.
//!
//! The receiver writes the files into an empty incoming directory, checks every size and crc32
//! after `done`, fsyncs the files and the directory, and only then hands the directory to openraft.
//! Anything else (a stream that ends early, breaks, stalls, or breaks a rule above) discards the
//! incoming directory: a half-received snapshot is never installed.
//!
//! Memory stays at a few chunks whatever the snapshot size: the sender reads the next chunk only
//! when the bounded channel into the gRPC stream has room, and the receiver writes each chunk
//! before reading the next.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::{Stream, StreamExt};
use herald_proto::raft::raft_service_client::RaftServiceClient;
use herald_proto::raft::snapshot_chunk::Body;
use herald_proto::raft::{
    RaftReply, SnapshotChunk, SnapshotData, SnapshotDone, SnapshotFile, SnapshotHeader,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Most files a snapshot header may list (a RocksDB checkpoint holds tens to hundreds).
pub const MAX_SNAPSHOT_FILES: usize = 100_000;

/// Longest file name accepted in a snapshot (the common filesystem limit).
const MAX_NAME_BYTES: usize = 255;

/// Chunks queued between the file reader and the gRPC stream. Two keep the link busy while the
/// next chunk is read, and bound the sender's memory to about three chunks.
const SEND_QUEUE: usize = 2;

// ---------------------------------------------------------------------------------------------
// Sending side
// ---------------------------------------------------------------------------------------------

/// Why sending a snapshot failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Reading the local snapshot directory failed; the peer is not at fault.
    #[error("reading snapshot {path}: {source}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The call itself failed (transport error or refused by the receiver).
    #[error("snapshot stream failed: {0}")]
    Rpc(#[from] Status),
}

fn local(path: &Path, source: std::io::Error) -> SendError {
    SendError::Local {
        path: path.display().to_string(),
        source,
    }
}

/// Lists the regular files of the flat directory `dir`, sorted by name, each with its size and
/// crc32 (the file is read once to compute it). Blocking: run it on a blocking thread.
pub fn scan_snapshot_dir(dir: &Path) -> std::io::Result<Vec<(PathBuf, SnapshotFile)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if !kind.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file: a snapshot directory must be flat",
                path.display()
            )));
        }
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| std::io::Error::other(format!("snapshot file name {n:?} is not valid UTF-8")))?;
        let (size, crc32) = size_and_crc(&path)?;
        files.push((path, SnapshotFile { name, size, crc32 }));
    }
    files.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    Ok(files)
}

fn size_and_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize()))
}

/// Streams the snapshot in `dir` to the peer behind `client`, `header` carrying everything but the
/// file list (filled here). Returns the receiver's reply. The caller bounds it in time and drops it
/// to cancel, which resets the stream: the receiver then discards what it got.
pub(crate) async fn send_snapshot(
    client: &mut RaftServiceClient<Channel>,
    mut header: SnapshotHeader,
    dir: PathBuf,
    chunk_bytes: usize,
) -> Result<RaftReply, SendError> {
    let scan_dir = dir.clone();
    let files = tokio::task::spawn_blocking(move || scan_snapshot_dir(&scan_dir))
        .await
        .map_err(|e| local(&dir, std::io::Error::other(e)))?
        .map_err(|e| local(&dir, e))?;
    header.files = files.iter().map(|(_, f)| f.clone()).collect();

    let (tx, rx) = mpsc::channel(SEND_QUEUE);
    // The reader's error, set before it drops `tx`: by the time the receiver sees the stream end
    // early and the call returns, the cause is here.
    let failure: Arc<Mutex<Option<SendError>>> = Arc::default();
    let reader = AbortOnDrop(tokio::spawn(read_chunks(
        files,
        SnapshotChunk {
            body: Some(Body::Header(header)),
        },
        chunk_bytes,
        tx,
        failure.clone(),
    )));
    let res = client.install_snapshot(ReceiverStream::new(rx)).await;
    drop(reader);
    if let Some(e) = failure.lock().take() {
        return Err(e);
    }
    Ok(res?.into_inner())
}

/// Aborts the reader task when the send is cancelled or finished.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feeds the header, the data chunks and `done` into `tx`. Stops quietly when `tx` is closed (the
/// call ended); on a read error it records the error and stops without `done`.
async fn read_chunks(
    files: Vec<(PathBuf, SnapshotFile)>,
    header: SnapshotChunk,
    chunk_bytes: usize,
    tx: mpsc::Sender<SnapshotChunk>,
    failure: Arc<Mutex<Option<SendError>>>,
) {
    if tx.send(header).await.is_err() {
        return;
    }
    for (index, (path, meta)) in files.iter().enumerate() {
        match send_file(index as u32, path, meta, chunk_bytes, &tx).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                *failure.lock() = Some(local(path, e));
                return;
            }
        }
    }
    let _ = tx
        .send(SnapshotChunk {
            body: Some(Body::Done(SnapshotDone {})),
        })
        .await;
}

/// Sends one file's chunks; `Ok(false)` when the call is gone.
async fn send_file(
    index: u32,
    path: &Path,
    meta: &SnapshotFile,
    chunk_bytes: usize,
    tx: &mpsc::Sender<SnapshotChunk>,
) -> std::io::Result<bool> {
    let file = tokio::fs::File::open(path).await?;
    // Never send past the size announced in the header, even if the file grew since the scan.
    let mut file = file.take(meta.size);
    let mut offset = 0u64;
    while offset < meta.size {
        let want = chunk_bytes.min((meta.size - offset) as usize);
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            if file.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} shrank to {} bytes while sending, header says {}",
                        path.display(),
                        offset,
                        meta.size
                    ),
                ));
            }
        }
        let len = buf.len() as u64;
        let chunk = SnapshotData {
            file: index,
            offset,
            data: buf.freeze(),
        };
        if tx
            .send(SnapshotChunk {
                body: Some(Body::Data(chunk)),
            })
            .await
            .is_err()
        {
            return Ok(false);
        }
        offset += len;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Receiving side
// ---------------------------------------------------------------------------------------------

/// Why a received snapshot was refused. Nothing of it may be installed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("bad snapshot file name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("snapshot header lists {0} files, more than {MAX_SNAPSHOT_FILES}")]
    TooManyFiles(usize),
    #[error("data chunk for file #{file}, the header lists {files} files")]
    UnknownFile { file: u32, files: usize },
    #[error("data chunk for file #{file} after file #{current}: files must be sent in header order")]
    FileOrder { file: u32, current: u32 },
    #[error("chunk of {name} at offset {offset}, expected offset {expected}")]
    Offset {
        name: String,
        offset: u64,
        expected: u64,
    },
    #[error("{name} would grow to {end} bytes, the header says {size}")]
    Overflow { name: String, end: u64, size: u64 },
    #[error("{name} is {received} bytes, the header says {size}")]
    Size { name: String, received: u64, size: u64 },
    #[error("{name} has crc32 {actual:#010x}, the header says {expected:#010x}")]
    Crc {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error("malformed snapshot stream: {0}")]
    Protocol(String),
    #[error("snapshot stream ended before done")]
    Truncated,
    #[error("no snapshot chunk for {0:?}")]
    Idle(Duration),
    #[error("snapshot stream broke: {0}")]
    Stream(Status),
    #[error("writing snapshot file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ReceiveError {
    /// The status the sender gets back.
    pub fn to_status(&self) -> Status {
        let code = match self {
            ReceiveError::Size { .. } | ReceiveError::Crc { .. } => Code::DataLoss,
            ReceiveError::Truncated | ReceiveError::Stream(_) => Code::Aborted,
            ReceiveError::Idle(_) => Code::DeadlineExceeded,
            ReceiveError::Io { .. } => Code::Internal,
            _ => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ReceiveError {
    ReceiveError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks a header's file list: at most [`MAX_SNAPSHOT_FILES`], unique plain names (no `/`, `\`,
/// `..`, NUL, not empty, at most 255 bytes), so no file can land outside the incoming directory.
pub fn validate_file_list(files: &[SnapshotFile]) -> Result<(), ReceiveError> {
    if files.len() > MAX_SNAPSHOT_FILES {
        return Err(ReceiveError::TooManyFiles(files.len()));
    }
    let mut seen = HashSet::with_capacity(files.len());
    for f in files {
        let bad = |reason| {
            Err(ReceiveError::BadName {
                name: f.name.clone(),
                reason,
            })
        };
        if f.name.is_empty() || f.name == "." {
            return bad("empty");
        }
        if f.name.len() > MAX_NAME_BYTES {
            return bad("longer than 255 bytes");
        }
        if f.name.contains(['/', '\\']) {
            return bad("contains a path separator");
        }
        if f.name.contains("..") {
            return bad("contains '..'");
        }
        if f.name.contains('\0') {
            return bad("contains NUL");
        }
        if !seen.insert(f.name.as_str()) {
            return bad("listed twice");
        }
    }
    Ok(())
}

/// What has been received of one file.
struct Received {
    bytes: u64,
    crc: crc32fast::Hasher,
}

/// The receiving core: reads data chunks from `chunks` (the stream after its header) into the files
/// `files` under the existing, empty directory `dir` until `done`, then checks every size and crc32
/// and fsyncs the files and `dir`. Waits at most `idle_timeout` for each chunk.
///
/// On error the directory holds garbage: the caller discards it.
pub async fn receive_snapshot_files<S>(
    dir: &Path,
    files: &[SnapshotFile],
    chunks: &mut S,
    idle_timeout: Duration,
) -> Result<(), ReceiveError>
where
    S: Stream<Item = Result<SnapshotChunk, Status>> + Unpin,
{
    validate_file_list(files)?;
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.name)).collect();
    // Every file exists from the start (empty ones get no data chunk); create_new refuses to
    // reuse anything already in the directory.
    for path in &paths {
        tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| io_err(path, e))?;
    }
    let mut received: Vec<Received> = files
        .iter()
        .map(|_| Received {
            bytes: 0,
            crc: crc32fast::Hasher::new(),
        })
        .collect();
    // The file being written; earlier ones are complete and synced.
    let mut current: Option<(u32, tokio::fs::File)> = None;

    loop {
        let chunk = match tokio::time::timeout(idle_timeout, chunks.next()).await {
            Err(_) => return Err(ReceiveError::Idle(idle_timeout)),
            Ok(None) => return Err(ReceiveError::Truncated),
            Ok(Some(Err(status))) => return Err(ReceiveError::Stream(status)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        let data = match chunk.body {
            Some(Body::Data(data)) => data,
            Some(Body::Done(_)) => break,
            Some(Body::Header(_)) => return Err(ReceiveError::Protocol("a second header".into())),
            None => return Err(ReceiveError::Protocol("a chunk without body".into())),
        };
        let index = data.file as usize;
        let (Some(meta), Some(path)) = (files.get(index), paths.get(index)) else {
            return Err(ReceiveError::UnknownFile {
                file: data.file,
                files: files.len(),
            });
        };
        match &current {
            Some((cur, _)) if *cur == data.file => {}
            Some((cur, _)) if *cur > data.file => {
                return Err(ReceiveError::FileOrder {
                    file: data.file,
                    current: *cur,
                });
            }
            _ => {
                if let Some((cur, file)) = current.take() {
                    sync_file(file, &paths[cur as usize]).await?;
                }
                let file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .await
                    .map_err(|e| io_err(path, e))?;
                current = Some((data.file, file));
            }
        }
        let got = &mut received[index];
        if data.offset != got.bytes {
            return Err(ReceiveError::Offset {
                name: meta.name.clone(),
                offset: data.offset,
                expected: got.bytes,
            });
        }
        let end = got.bytes + data.data.len() as u64;
        if end > meta.size {
            return Err(ReceiveError::Overflow {
                name: meta.name.clone(),
                end,
                size: meta.size,
            });
        }
        if let Some((_, file)) = current.as_mut() {
            file.write_all(&data.data).await.map_err(|e| io_err(path, e))?;
        }
        got.crc.update(&data.data);
        got.bytes = end;
    }

    if let Some((cur, file)) = current.take() {
        sync_file(file, &paths[cur as usize]).await?;
    }
    for (meta, got) in files.iter().zip(received) {
        if got.bytes != meta.size {
            return Err(ReceiveError::Size {
                name: meta.name.clone(),
                received: got.bytes,
                size: meta.size,
            });
        }
        let actual = got.crc.finalize();
        if actual != meta.crc32 {
            return Err(ReceiveError::Crc {
                name: meta.name.clone(),
                expected: meta.crc32,
                actual,
            });
        }
    }
    sync_dir(dir).await
}

async fn sync_file(mut file: tokio::fs::File, path: &Path) -> Result<(), ReceiveError> {
    file.flush().await.map_err(|e| io_err(path, e))?;
    file.sync_all().await.map_err(|e| io_err(path, e))
}

/// fsyncs a directory so the files created in it survive a crash.
pub(crate) async fn sync_dir(dir: &Path) -> Result<(), ReceiveError> {
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&owned)?.sync_all())
        .await
        .map_err(|e| io_err(dir, std::io::Error::other(e)))?
        .map_err(|e| io_err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> SnapshotFile {
        SnapshotFile {
            name: name.into(),
            size: 0,
            crc32: 0,
        }
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        for name in ["", ".", "..", "../x", "a/b", "a\\b", "x..y", "/abs", "a\0b"] {
            assert!(validate_file_list(&[file(name)]).is_err(), "{name:?} accepted");
        }
        assert!(validate_file_list(&[file("a"), file("a")]).is_err());
        assert!(validate_file_list(&[file("000012.sst"), file("MANIFEST-000005"), file("meta.bin")]).is_ok());
    }
}
