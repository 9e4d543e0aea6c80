//! TLS against real servers: nbdkit and qemu-nbd (both GnuTLS), with X.509 certificates and
//! pre-shared keys, and against servers played by hand for what real ones will not do on
//! cue (hang up mid-handshake, answer in plaintext).
//!
//! Each test speaks the plaintext NBD newstyle handshake by hand up to `NBD_OPT_STARTTLS`,
//! calls `tls::upgrade`, then proves the channel with `NBD_OPT_LIST`, `NBD_OPT_GO` and a
//! write read back. libnbd's `nbdinfo` / `nbdcopy` connect to the same servers with the same
//! credentials, to prove the server setups right. Keys and certificates are made in the test
//! with the openssl crate: no certtool or psktool needed.
//!
//! A missing nbdkit, qemu-nbd or nbdinfo fails the test, unless `NBD_ALLOW_MISSING_SERVERS=1`
//! is set outside CI (as the JavaScript specs do).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use nbd_client::tls::{self, TlsAuth, TlsMode, TlsSettings, TlsStream};
use nbd_client::{Errno, Error};

// ---------------------------------------------------------------------------------------
// Scratch directories and tools

static COUNTER: AtomicU32 = AtomicU32::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("nbd-tls-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn sub(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_tool(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// True when the tools are there. Otherwise fails the test, unless missing servers are
/// tolerated (`NBD_ALLOW_MISSING_SERVERS=1`, never under CI), when it says so loudly.
fn require_tools(names: &[&str]) -> bool {
    let missing: Vec<&str> = names.iter().copied().filter(|n| !have_tool(n)).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!(
        "MISSING SERVER/TOOL: {} not found on PATH",
        missing.join(", ")
    );
    let tolerated = std::env::var_os("CI").is_none()
        && std::env::var("NBD_ALLOW_MISSING_SERVERS").as_deref() == Ok("1");
    if !tolerated {
        panic!("{message} (install nbdkit, qemu-utils and libnbd-bin)");
    }
    eprintln!("\n*** {message}; this test did NOT run ***\n");
    false
}

// ---------------------------------------------------------------------------------------
// Keys and certificates

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn serial() -> Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    bn.to_asn1_integer().unwrap()
}

struct Ca {
    cert: X509,
    key: PKey<Private>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = new_key();
        let mut subject = X509NameBuilder::new().unwrap();
        subject.append_entry_by_text("CN", name).unwrap();
        let subject = subject.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&subject).unwrap();
        b.set_issuer_name(&subject).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        )
        .unwrap();
        let ski = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(None, None))
            .unwrap();
        b.append_extension(ski).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        Ca {
            cert: b.build(),
            key,
        }
    }

    /// A leaf certificate for a server (`names` are DNS names or IP addresses) or a client.
    fn issue(&self, cn: &str, names: &[&str], server: bool) -> (X509, PKey<Private>) {
        let key = new_key();
        let mut subject = X509NameBuilder::new().unwrap();
        subject.append_entry_by_text("CN", cn).unwrap();
        let subject = subject.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(&serial()).unwrap();
        b.set_subject_name(&subject).unwrap();
        b.set_issuer_name(self.cert.subject_name()).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.append_extension(BasicConstraints::new().critical().build().unwrap())
            .unwrap();
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .unwrap(),
        )
        .unwrap();
        let mut eku = ExtendedKeyUsage::new();
        if server {
            eku.server_auth();
        } else {
            eku.client_auth();
        }
        b.append_extension(eku.build().unwrap()).unwrap();
        if !names.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for name in names {
                if name.parse::<std::net::IpAddr>().is_ok() {
                    san.ip(name);
                } else {
                    san.dns(name);
                }
            }
            let san = san
                .build(&b.x509v3_context(Some(&self.cert), None))
                .unwrap();
            b.append_extension(san).unwrap();
        }
        let ski = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(Some(&self.cert), None))
            .unwrap();
        b.append_extension(ski).unwrap();
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.cert), None))
            .unwrap();
        b.append_extension(aki).unwrap();
        b.sign(&self.key, MessageDigest::sha256()).unwrap();
        (b.build(), key)
    }
}

fn write(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn write_cert(path: &Path, cert: &X509) {
    write(path, &cert.to_pem().unwrap());
}

fn write_key(path: &Path, key: &PKey<Private>) {
    write(path, &key.private_key_to_pem_pkcs8().unwrap());
}

/// A server directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) for a server
/// known as `names`, issued by `ca`.
fn server_dir(dir: &Path, ca: &Ca, names: &[&str]) {
    let (cert, key) = ca.issue("nbd test server", names, true);
    write_cert(&dir.join("ca-cert.pem"), &ca.cert);
    write_cert(&dir.join("server-cert.pem"), &cert);
    write_key(&dir.join("server-key.pem"), &key);
}

/// A client directory trusting `trusted`, with a client certificate from `issuer` if any.
fn client_dir(dir: &Path, trusted: &Ca, issuer: Option<&Ca>) {
    write_cert(&dir.join("ca-cert.pem"), &trusted.cert);
    if let Some(issuer) = issuer {
        let (cert, key) = issuer.issue("nbd test client", &[], false);
        write_cert(&dir.join("client-cert.pem"), &cert);
        write_key(&dir.join("client-key.pem"), &key);
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    openssl::rand::rand_bytes(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Servers

struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Server {
    /// Runs `argv` (which must serve on `dir/sock`) and waits until the socket accepts.
    fn start(dir: TempDir, argv: &[String]) -> Server {
        let socket = dir.join("sock");
        let log = dir.join("server.log");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // SAFETY: prctl is async-signal-safe; the server dies with this process even if
        // a test is killed before its Drop runs.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                #[cfg(target_os = "linux")]
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", argv[0]));
        let mut server = Server {
            child,
            socket,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&server.socket).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "{} exited ({status}) before serving: {}",
                    argv[0],
                    server.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start: {}",
                argv[0],
                server.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).await.unwrap()
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SIZE: u64 = 1024 * 1024;

fn nbdkit(dir: TempDir, tls_args: &[String]) -> Server {
    let mut argv: Vec<String> = ["nbdkit", "-f", "--exit-with-parent", "-U"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(dir.join("sock").display().to_string());
    argv.push("--tls=require".into());
    argv.extend(tls_args.iter().cloned());
    argv.extend(["memory".to_string(), SIZE.to_string()]);
    Server::start(dir, &argv)
}

/// qemu-nbd serving a fresh raw image, with `object` as its TLS credentials object
/// (id `tls0`).
fn qemu_nbd(dir: TempDir, object: String) -> Server {
    let image = dir.join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    let argv: Vec<String> = vec![
        "qemu-nbd".into(),
        "--persistent".into(),
        "--shared=8".into(),
        "-f".into(),
        "raw".into(),
        "-x".into(),
        "".into(),
        "-k".into(),
        dir.join("sock").display().to_string(),
        "--object".into(),
        object,
        "--tls-creds".into(),
        "tls0".into(),
        image.display().to_string(),
    ];
    Server::start(dir, &argv)
}

// ---------------------------------------------------------------------------------------
// NBD by hand

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg).await?;
    s.flush().await
}

/// One option reply: (type, payload).
async fn read_reply<S: AsyncRead + Unpin>(
    s: &mut S,
    option: u32,
) -> std::io::Result<(u32, Vec<u8>)> {
    assert_eq!(s.read_u64().await?, REPLY_MAGIC, "option reply magic");
    assert_eq!(
        s.read_u32().await?,
        option,
        "option reply for another option"
    );
    let kind = s.read_u32().await?;
    let len = s.read_u32().await?;
    assert!(len < 1 << 20, "option reply of {len} bytes");
    let mut payload = vec![0; len as usize];
    s.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

/// The plaintext part: greeting, client flags, and NBD_OPT_STARTTLS, acknowledged.
async fn starttls(s: &mut UnixStream) {
    assert_eq!(s.read_u64().await.unwrap(), NBDMAGIC);
    assert_eq!(
        s.read_u64().await.unwrap(),
        IHAVEOPT,
        "not a newstyle server"
    );
    let _server_flags = s.read_u16().await.unwrap();
    // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    send_option(s, OPT_STARTTLS, &[]).await.unwrap();
    let (kind, _) = read_reply(s, OPT_STARTTLS).await.unwrap();
    assert_eq!(kind, REP_ACK, "STARTTLS was not acknowledged");
}

/// NBD_OPT_LIST over the channel: the export names.
async fn opt_list<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<Vec<String>> {
    send_option(s, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (kind, payload) = read_reply(s, OPT_LIST).await?;
        match kind {
            REP_SERVER => {
                let len = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(payload[4..4 + len].to_vec()).unwrap());
            }
            REP_ACK => return Ok(names),
            other => panic!("NBD_OPT_LIST reply type {other:#x}"),
        }
    }
}

/// NBD_OPT_GO for the default export: its size.
async fn opt_go<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> u64 {
    // Empty name, no information requests.
    send_option(s, OPT_GO, &[0, 0, 0, 0, 0, 0]).await.unwrap();
    let mut size = None;
    loop {
        let (kind, payload) = read_reply(s, OPT_GO).await.unwrap();
        match kind {
            REP_INFO if payload.len() >= 12 && payload[..2] == [0, 0] => {
                size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
            }
            REP_INFO => {}
            REP_ACK => return size.expect("NBD_INFO_EXPORT before the ACK"),
            other => panic!("NBD_OPT_GO reply type {other:#x}: {payload:?}"),
        }
    }
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&cookie.to_be_bytes());
    msg.extend_from_slice(&offset.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg).await.unwrap();
    s.flush().await.unwrap();
}

async fn simple_reply<S: AsyncRead + Unpin>(s: &mut S, cookie: u64) {
    assert_eq!(s.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(
        s.read_u32().await.unwrap(),
        0,
        "the server answered with an error"
    );
    assert_eq!(s.read_u64().await.unwrap(), cookie);
}

/// The whole proof over an upgraded channel: LIST, GO, a write, a read of it, DISC.
/// Returns the bytes written at `offset`.
async fn prove<S: AsyncRead + AsyncWrite + Unpin>(tls: &mut TlsStream<S>, offset: u64) -> Vec<u8> {
    let names = opt_list(tls).await.expect("NBD_OPT_LIST over TLS");
    assert!(!names.is_empty(), "the server lists no export");
    assert_eq!(opt_go(tls).await, SIZE);
    let data: Vec<u8> = (0..4096u32)
        .map(|i| (i * 7 + offset as u32) as u8)
        .collect();
    command(tls, CMD_WRITE, 1, offset, data.len() as u32, &data).await;
    simple_reply(tls, 1).await;
    command(tls, CMD_READ, 2, offset, data.len() as u32, &[]).await;
    simple_reply(tls, 2).await;
    let mut back = vec![0; data.len()];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(
        back, data,
        "read back differs from what was written over TLS"
    );
    command(tls, CMD_DISC, 3, 0, 0, &[]).await;
    tls.shutdown().await.unwrap();
    data
}

/// Upgrades with a limit well above any real handshake: a failure must be prompt.
async fn upgrade_within(
    stream: UnixStream,
    settings: &TlsSettings,
    host: Option<&str>,
) -> Result<TlsStream<UnixStream>, Error> {
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        tls::upgrade(stream, settings, host),
    )
    .await
    .expect("tls::upgrade hung");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "upgrade took {:?}",
        started.elapsed()
    );
    r
}

async fn connect_and_upgrade(
    server: &Server,
    settings: &TlsSettings,
    host: Option<&str>,
) -> Result<TlsStream<UnixStream>, Error> {
    let mut s = server.connect().await;
    starttls(&mut s).await;
    upgrade_within(s, settings, host).await
}

#[track_caller]
fn expect_err<T>(r: Result<T, Error>, errno: Errno, words: &[&str]) -> Error {
    let e = match r {
        Ok(_) => panic!("expected {errno} mentioning {words:?}, got success"),
        Err(e) => e,
    };
    // Shown with --nocapture, to read what users will read.
    eprintln!("expected error: {e}");
    assert_eq!(e.errno(), errno, "{e}");
    for w in words {
        assert!(e.message().contains(w), "{e:?} should mention {w:?}");
    }
    e
}

fn psk_settings(file: &Path, user: &str) -> TlsSettings {
    TlsSettings {
        mode: TlsMode::Require,
        psk_file: Some(file.to_owned()),
        username: Some(user.into()),
        ..TlsSettings::default()
    }
}

fn x509_settings(dir: &Path) -> TlsSettings {
    TlsSettings {
        mode: TlsMode::Require,
        certificates: Some(dir.to_owned()),
        ..TlsSettings::default()
    }
}

/// libnbd's nbdinfo reports the export size over the same URI.
fn nbdinfo_size(uri: &str) -> u64 {
    let out = Command::new("nbdinfo")
        .arg("--size")
        .arg(uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo {uri} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// What libnbd's nbdcopy reads from the export over `uri`.
fn nbdcopy_read(uri: &str) -> Vec<u8> {
    let out = Command::new("nbdcopy").arg(uri).arg("-").output().unwrap();
    assert!(
        out.status.success(),
        "nbdcopy {uri} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A PSK key file with `users`, each with a fresh key; returns the keys.
fn psk_file(path: &Path, users: &[&str]) -> Vec<String> {
    let keys: Vec<String> = users.iter().map(|_| random_hex(32)).collect();
    let text: String = users
        .iter()
        .zip(&keys)
        .map(|(u, k)| format!("{u}:{k}\n"))
        .collect();
    write(path, text.as_bytes());
    keys
}

// ---------------------------------------------------------------------------------------
// PSK

#[tokio::test]
async fn psk_with_nbdkit() {
    if !require_tools(&["nbdkit", "nbdinfo", "nbdcopy"]) {
        return;
    }
    let dir = TempDir::new("nbdkit-psk");
    let keys = dir.join("keys.psk");
    let server_keys = psk_file(&keys, &["alice", "bob"]);
    let server = nbdkit(dir, &[format!("--tls-psk={}", keys.display())]);
    let client = TempDir::new("client");

    // Success, with the key file the server uses; then proof that libnbd agrees.
    let settings = psk_settings(&keys, "alice");
    let mut tls = connect_and_upgrade(&server, &settings, None).await.unwrap();
    assert_eq!(tls.auth(), TlsAuth::Psk);
    assert_eq!(tls.protocol_version(), "TLSv1.3");
    let data = prove(&mut tls, 8192).await;
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        server.socket(),
        keys.display()
    );
    assert_eq!(nbdinfo_size(&uri), SIZE);
    let image = nbdcopy_read(&uri);
    assert_eq!(
        &image[8192..8192 + data.len()],
        &data[..],
        "libnbd reads what we wrote over TLS"
    );

    // The same, with the reader and writer split before the upgrade and joined for it,
    // as a driver that split the plaintext socket would do.
    let mut s = server.connect().await;
    starttls(&mut s).await;
    let (r, w) = s.into_split();
    let joined = tokio::io::join(r, w);
    let tls = tls::upgrade(joined, &psk_settings(&keys, "bob"), None)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    send_option(&mut wr, OPT_LIST, &[]).await.unwrap();
    let (kind, _) = read_reply(&mut rd, OPT_LIST).await.unwrap();
    assert_eq!(kind, REP_SERVER);

    // Wrong key for a user the server knows.
    let wrong = client.join("wrong.psk");
    write(&wrong, format!("alice:{}\n", random_hex(32)).as_bytes());
    assert_ne!(
        server_keys[0],
        std::fs::read_to_string(&wrong).unwrap()[6..70]
    );
    // GnuTLS servers hang up without an alert, for this and for an unknown user alike.
    let e = connect_and_upgrade(&server, &psk_settings(&wrong, "alice"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"alice\"", "wrong.psk", "key"],
    );

    // A user the server does not know.
    let stranger = client.join("stranger.psk");
    psk_file(&stranger, &["mallory"]);
    let e = connect_and_upgrade(&server, &psk_settings(&stranger, "mallory"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"mallory\""],
    );

    // Local mistakes: no key for the user, no file, a malformed key.
    let e = connect_and_upgrade(&server, &psk_settings(&keys, "carol"), None).await;
    expect_err(e, Errno::EINVAL, &["carol", "keys.psk"]);
    let missing = client.join("missing.psk");
    let e = connect_and_upgrade(&server, &psk_settings(&missing, "alice"), None).await;
    expect_err(e, Errno::ENOENT, &["missing.psk"]);
    let bad = client.join("bad.psk");
    write(&bad, b"alice:not-hex\n");
    let e = connect_and_upgrade(&server, &psk_settings(&bad, "alice"), None).await;
    expect_err(e, Errno::EINVAL, &["not hexadecimal", "line 1"]);
}

#[tokio::test]
async fn psk_with_qemu_nbd() {
    if !require_tools(&["qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("qemu-psk");
    let creds = dir.sub("creds");
    let keys = creds.join("keys.psk");
    psk_file(&keys, &["alice"]);
    let object = format!(
        "tls-creds-psk,id=tls0,dir={},endpoint=server",
        creds.display()
    );
    let server = qemu_nbd(dir, object);

    let mut tls = connect_and_upgrade(&server, &psk_settings(&keys, "alice"), None)
        .await
        .unwrap();
    assert_eq!(tls.auth(), TlsAuth::Psk);
    assert_eq!(tls.protocol_version(), "TLSv1.3");
    prove(&mut tls, 0).await;
    let uri = format!(
        "nbds+unix://alice@/?socket={}&tls-psk-file={}",
        server.socket(),
        keys.display()
    );
    assert_eq!(nbdinfo_size(&uri), SIZE);

    let client = TempDir::new("client");
    let wrong = client.join("wrong.psk");
    write(&wrong, format!("alice:{}\n", random_hex(32)).as_bytes());
    let e = connect_and_upgrade(&server, &psk_settings(&wrong, "alice"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"alice\"", "key"],
    );
    let stranger = client.join("stranger.psk");
    psk_file(&stranger, &["mallory"]);
    let e = connect_and_upgrade(&server, &psk_settings(&stranger, "mallory"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"mallory\""],
    );
}

/// TLS 1.2 PSK cipher suites, with a server that will not speak TLS 1.3.
#[tokio::test]
async fn psk_over_tls12_with_qemu_nbd() {
    if !require_tools(&["qemu-nbd", "nbdinfo"]) {
        return;
    }
    let dir = TempDir::new("qemu-psk12");
    let creds = dir.sub("creds");
    let keys = creds.join("keys.psk");
    psk_file(&keys, &["alice"]);
    let object = format!(
        "tls-creds-psk,id=tls0,dir={},endpoint=server,priority=NORMAL:-VERS-TLS1.3",
        creds.display()
    );
    let server = qemu_nbd(dir, object);
    let mut tls = connect_and_upgrade(&server, &psk_settings(&keys, "alice"), None)
        .await
        .unwrap();
    assert_eq!(tls.protocol_version(), "TLSv1.2");
    // A forward-secret PSK suite is preferred.
    let cipher = tls.cipher().unwrap();
    assert!(
        cipher.starts_with("ECDHE-PSK-") || cipher.starts_with("DHE-PSK-"),
        "{cipher}"
    );
    prove(&mut tls, 4096).await;

    let client = TempDir::new("client");
    let wrong = client.join("wrong.psk");
    write(&wrong, format!("alice:{}\n", random_hex(32)).as_bytes());
    let e = connect_and_upgrade(&server, &psk_settings(&wrong, "alice"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"alice\""],
    );
}

// ---------------------------------------------------------------------------------------
// X.509

#[tokio::test]
async fn x509_with_nbdkit() {
    if !require_tools(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let ca = Ca::new("nbd test CA");
    let dir = TempDir::new("nbdkit-x509");
    let certs = dir.sub("certs");
    server_dir(&certs, &ca, &["localhost", "127.0.0.1"]);
    let server = nbdkit(dir, &[format!("--tls-certificates={}", certs.display())]);
    let client = TempDir::new("client");
    let good = client.sub("good");
    client_dir(&good, &ca, None);

    // The chain is checked even with no host name (a Unix socket).
    let mut tls = connect_and_upgrade(&server, &x509_settings(&good), None)
        .await
        .unwrap();
    assert_eq!(tls.auth(), TlsAuth::Certificate);
    assert_eq!(tls.protocol_version(), "TLSv1.3");
    prove(&mut tls, 0).await;
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket(),
        good.display()
    );
    assert_eq!(nbdinfo_size(&uri), SIZE);

    // Host names: from the connect call (an IP address here), or set, which wins.
    let tls = connect_and_upgrade(&server, &x509_settings(&good), Some("127.0.0.1")).await;
    tls.unwrap();
    let named = TlsSettings {
        hostname: Some("localhost".into()),
        ..x509_settings(&good)
    };
    connect_and_upgrade(&server, &named, Some("wrong.example"))
        .await
        .unwrap();
    let e = connect_and_upgrade(&server, &x509_settings(&good), Some("wrong.example")).await;
    expect_err(e, Errno::EPERM, &["not valid for host \"wrong.example\""]);
    let wrong_ip = connect_and_upgrade(&server, &x509_settings(&good), Some("127.0.0.2")).await;
    expect_err(wrong_ip, Errno::EPERM, &["127.0.0.2"]);
    let unverified = TlsSettings {
        verify_peer: false,
        ..x509_settings(&good)
    };
    connect_and_upgrade(&server, &unverified, Some("wrong.example"))
        .await
        .unwrap();

    // A CA that did not sign the server's certificate.
    let other = Ca::new("some other CA");
    let stranger = client.sub("stranger");
    client_dir(&stranger, &other, None);
    let e = connect_and_upgrade(&server, &x509_settings(&stranger), None).await;
    let e = expect_err(e, Errno::EPERM, &["failed verification", "ca-cert.pem"]);
    assert!(
        e.message().contains("issuer"),
        "OpenSSL's reason is missing: {e}"
    );
    let unverified = TlsSettings {
        verify_peer: false,
        ..x509_settings(&stranger)
    };
    let mut tls = connect_and_upgrade(&server, &unverified, None)
        .await
        .unwrap();
    prove(&mut tls, 4096).await;

    // A directory without ca-cert.pem: the system's CAs are used (as libnbd), which do not
    // know this test's CA, and the message says where the trust came from.
    let empty = client.sub("empty");
    let e = connect_and_upgrade(&server, &x509_settings(&empty), None).await;
    expect_err(
        e,
        Errno::EPERM,
        &["failed verification", "the system's", "empty/ca-cert.pem"],
    );

    // Local mistakes.
    let e = connect_and_upgrade(&server, &x509_settings(&client.join("nowhere")), None).await;
    expect_err(e, Errno::ENOENT, &["nowhere"]);
    let half = client.sub("half");
    client_dir(&half, &ca, Some(&ca));
    std::fs::remove_file(half.join("client-key.pem")).unwrap();
    let e = connect_and_upgrade(&server, &x509_settings(&half), None).await;
    expect_err(e, Errno::ENOENT, &["client-key.pem"]);
    let garbage = client.sub("garbage");
    write(&garbage.join("ca-cert.pem"), b"this is not a certificate\n");
    let e = connect_and_upgrade(&server, &x509_settings(&garbage), None).await;
    expect_err(e, Errno::EINVAL, &["ca-cert.pem", "no PEM certificate"]);
    let mismatched = client.sub("mismatched");
    client_dir(&mismatched, &ca, Some(&ca));
    write_key(&mismatched.join("client-key.pem"), &new_key());
    let e = connect_and_upgrade(&server, &x509_settings(&mismatched), None).await;
    expect_err(e, Errno::EINVAL, &["does not belong"]);

    // A PSK client against a certificate-only server.
    let keys = client.join("keys.psk");
    psk_file(&keys, &["alice"]);
    let e = connect_and_upgrade(&server, &psk_settings(&keys, "alice"), None).await;
    let e = e.unwrap_err();
    eprintln!("expected error: {e}");
    assert!(
        matches!(e.errno(), Errno::EPERM | Errno::ECONNREFUSED),
        "{e}"
    );
}

/// nbdkit asking for client certificates (`--tls-verify-peer`).
#[tokio::test]
async fn x509_client_certificates_with_nbdkit() {
    if !require_tools(&["nbdkit", "nbdinfo"]) {
        return;
    }
    let ca = Ca::new("nbd test CA");
    let dir = TempDir::new("nbdkit-x509-peer");
    let certs = dir.sub("certs");
    server_dir(&certs, &ca, &["localhost"]);
    let server = nbdkit(
        dir,
        &[
            format!("--tls-certificates={}", certs.display()),
            "--tls-verify-peer".into(),
        ],
    );
    let client = TempDir::new("client");
    let with_cert = client.sub("with");
    client_dir(&with_cert, &ca, Some(&ca));
    let mut tls = connect_and_upgrade(&server, &x509_settings(&with_cert), None)
        .await
        .unwrap();
    prove(&mut tls, 0).await;
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket(),
        with_cert.display()
    );
    assert_eq!(nbdinfo_size(&uri), SIZE);

    // No client certificate, or one from a CA the server does not trust: with TLS 1.3 the
    // client's side of the handshake completes before the server judges the certificate,
    // so the refusal arrives on the first read. It must say what happened.
    let without = client.sub("without");
    client_dir(&without, &ca, None);
    let other = Ca::new("some other CA");
    let foreign = client.sub("foreign");
    client_dir(&foreign, &ca, Some(&other));
    for (dir, words) in [
        (&without, "require a client certificate and none is set"),
        (&foreign, "reject the client certificate"),
    ] {
        let mut tls = connect_and_upgrade(&server, &x509_settings(dir), None)
            .await
            .unwrap();
        assert_eq!(tls.protocol_version(), "TLSv1.3");
        let e = opt_list(&mut tls)
            .await
            .expect_err("the server took a bad client");
        let text = e.to_string();
        eprintln!("expected error: {text}");
        assert!(
            text.contains("TLS: the server ended the session before answering"),
            "{text}"
        );
        assert!(text.contains(words), "{text}");
    }
}

#[tokio::test]
async fn x509_with_qemu_nbd() {
    if !require_tools(&["qemu-nbd", "nbdinfo"]) {
        return;
    }
    let ca = Ca::new("nbd test CA");
    let dir = TempDir::new("qemu-x509");
    let certs = dir.sub("certs");
    server_dir(&certs, &ca, &["localhost"]);
    // qemu's server credentials verify clients by default (verify-peer=on).
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server",
        certs.display()
    );
    let server = qemu_nbd(dir, object);
    let client = TempDir::new("client");
    let good = client.sub("good");
    client_dir(&good, &ca, Some(&ca));

    let named = TlsSettings {
        hostname: Some("localhost".into()),
        ..x509_settings(&good)
    };
    let mut tls = connect_and_upgrade(&server, &named, None).await.unwrap();
    assert_eq!(tls.auth(), TlsAuth::Certificate);
    prove(&mut tls, 12288).await;
    let uri = format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        server.socket(),
        good.display()
    );
    assert_eq!(nbdinfo_size(&uri), SIZE);

    let e = connect_and_upgrade(&server, &x509_settings(&good), Some("wrong.example")).await;
    expect_err(e, Errno::EPERM, &["wrong.example"]);
    let other = Ca::new("some other CA");
    let stranger = client.sub("stranger");
    client_dir(&stranger, &other, Some(&ca));
    let e = connect_and_upgrade(&server, &x509_settings(&stranger), None).await;
    expect_err(e, Errno::EPERM, &["failed verification"]);
}

/// TLS 1.2 with certificates. qemu-nbd checks the client's certificate only after the
/// handshake, so a refusal shows on the first exchange, as with TLS 1.3.
#[tokio::test]
async fn x509_over_tls12_with_qemu_nbd() {
    if !require_tools(&["qemu-nbd"]) {
        return;
    }
    let ca = Ca::new("nbd test CA");
    let dir = TempDir::new("qemu-x509-12");
    let certs = dir.sub("certs");
    server_dir(&certs, &ca, &["localhost"]);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=server,priority=NORMAL:-VERS-TLS1.3",
        certs.display()
    );
    let server = qemu_nbd(dir, object);
    let client = TempDir::new("client");
    let good = client.sub("good");
    client_dir(&good, &ca, Some(&ca));
    let mut tls = connect_and_upgrade(&server, &x509_settings(&good), Some("localhost"))
        .await
        .unwrap();
    assert_eq!(tls.protocol_version(), "TLSv1.2");
    prove(&mut tls, 0).await;

    let without = client.sub("without");
    client_dir(&without, &ca, None);
    let mut tls = connect_and_upgrade(&server, &x509_settings(&without), None)
        .await
        .unwrap();
    let e = opt_list(&mut tls)
        .await
        .expect_err("the server took a client without a certificate");
    let text = e.to_string();
    eprintln!("expected error: {text}");
    assert!(
        text.contains("TLS: the server ended the session before answering"),
        "{text}"
    );
    assert!(
        text.contains("require a client certificate and none is set"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Servers that misbehave

/// A listener whose one connection gets the plaintext NBD handshake up to STARTTLS, then
/// `then` with the socket.
async fn fake_server<F, Fut>(then: F) -> (UnixStream, TempDir, tokio::task::JoinHandle<()>)
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = TempDir::new("fake");
    let path = dir.join("sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(&NBDMAGIC.to_be_bytes()).await.unwrap();
        s.write_all(&IHAVEOPT.to_be_bytes()).await.unwrap();
        s.write_all(&3u16.to_be_bytes()).await.unwrap();
        let _flags = s.read_u32().await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        assert_eq!(s.read_u32().await.unwrap(), OPT_STARTTLS);
        assert_eq!(s.read_u32().await.unwrap(), 0);
        let mut reply = Vec::new();
        reply.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
        reply.extend_from_slice(&REP_ACK.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&reply).await.unwrap();
        then(s).await;
    });
    let mut client = UnixStream::connect(&path).await.unwrap();
    starttls(&mut client).await;
    (client, dir, task)
}

#[tokio::test]
async fn server_hanging_up_mid_handshake() {
    let (client, _dir, task) = fake_server(|mut s| async move {
        // Read some of the ClientHello, then hang up.
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf[0], 22, "not a TLS handshake record");
    })
    .await;
    let keys = TempDir::new("keys");
    let file = keys.join("keys.psk");
    psk_file(&file, &["alice"]);
    let e = upgrade_within(client, &psk_settings(&file, "alice"), None).await;
    expect_err(
        e,
        Errno::ECONNRESET,
        &["closed the connection", "\"alice\""],
    );
    task.await.unwrap();
}

#[tokio::test]
async fn server_answering_in_plaintext() {
    let (client, _dir, task) = fake_server(|mut s| async move {
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.unwrap();
        // An NBD option reply where a ServerHello belongs.
        let mut reply = Vec::new();
        reply.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&OPT_STARTTLS.to_be_bytes());
        reply.extend_from_slice(&REP_ERR_TLS_REQD.to_be_bytes());
        reply.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&reply).await.unwrap();
        // Stay open: the client must not wait for more.
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let certs = TempDir::new("certs");
    client_dir(certs.path(), &Ca::new("unused"), None);
    let e = upgrade_within(client, &x509_settings(certs.path()), None).await;
    expect_err(e, Errno::EPROTO, &["did not answer in TLS"]);
    task.abort();
}
