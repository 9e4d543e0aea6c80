//! The copy engine against the in-process server: embedded export → file → another
//! embedded export → null, byte for byte, with a hole that stays a hole in the file.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use nbd_client::{CancelToken, Errno};
use nbd_copy::{copy, Endpoint, Options, Progress};
use nbd_embedded::{MemoryServer, ServerOptions};

const MIB: u64 = 1 << 20;

fn nbd(path: &std::path::Path) -> Endpoint {
    Endpoint::Nbd { uri: format!("nbd+unix:///?socket={}", path.display()), settings: Box::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_file_to_embedded() {
    let dir = std::env::temp_dir().join(format!("nbd-copy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = MemoryServer::new(ServerOptions { size: 8 * MIB, ..ServerOptions::default() });
    let data: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 + 1).collect();
    source.write(0, &data);
    source.write(6 * MIB, &data[..4096]);
    let src_listener = source.listen_unix(&dir.join("src.sock")).unwrap();
    let dest = MemoryServer::new(ServerOptions { size: 8 * MIB, ..ServerOptions::default() });
    dest.write(3 * MIB, &[0xee; 4096]);
    let dst_listener = dest.listen_unix(&dir.join("dst.sock")).unwrap();

    let file = dir.join("copy.img");
    let progress = Arc::new(Progress::default());
    let report = copy(nbd(&dir.join("src.sock")), Endpoint::File(file.clone()), Options::default(), progress.clone(), CancelToken::new())
        .await
        .unwrap();
    assert_eq!(report.bytes, 8 * MIB);
    assert_eq!(report.data_bytes + report.zero_bytes, 8 * MIB);
    assert_eq!(report.data_bytes, MIB + 4096);
    let written = std::fs::read(&file).unwrap();
    assert_eq!(written, source.read(0, 8 * MIB as usize));
    // The zero blocks were not written: the file has (about) the data's blocks only.
    assert!(std::fs::metadata(&file).unwrap().blocks() * 512 < 2 * MIB);

    let report = copy(Endpoint::File(file.clone()), nbd(&dir.join("dst.sock")), Options::default(), Arc::default(), CancelToken::new())
        .await
        .unwrap();
    assert_eq!(report.bytes, 8 * MIB);
    assert_eq!(dest.read(0, 8 * MIB as usize), source.read(0, 8 * MIB as usize), "zero requests cleared the old data too");

    let report = copy(nbd(&dir.join("dst.sock")), Endpoint::Null, Options { connections: Some(1), ..Options::default() }, Arc::default(), CancelToken::new())
        .await
        .unwrap();
    assert_eq!(report.connections, 1);

    // Errors: null as a source, a destination smaller than the source, an early abort.
    let e = copy(Endpoint::Null, Endpoint::Null, Options::default(), Arc::default(), CancelToken::new()).await.unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    let small = MemoryServer::new(ServerOptions { size: MIB, ..ServerOptions::default() });
    let small_listener = small.listen_unix(&dir.join("small.sock")).unwrap();
    let e = copy(nbd(&dir.join("src.sock")), nbd(&dir.join("small.sock")), Options::default(), Arc::default(), CancelToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENOSPC);
    let cancel = CancelToken::new();
    cancel.cancel();
    let e = copy(nbd(&dir.join("src.sock")), Endpoint::Null, Options::default(), Arc::default(), cancel).await.unwrap_err();
    assert_eq!(e.errno(), Errno::ECANCELED);

    small_listener.close();
    src_listener.close();
    dst_listener.close();
    std::fs::remove_dir_all(&dir).unwrap();
}
