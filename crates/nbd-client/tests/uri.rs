//! NBD URI parsing, formatting and policy (crates/nbd-client/src/uri.rs).

use nbd_client::uri::{
    self, NbdUri, SshRemote, UriPolicy, UriTransport, ALLOW_TRANSPORT_MASK, ALLOW_TRANSPORT_SSH,
    ALLOW_TRANSPORT_TCP, ALLOW_TRANSPORT_UNIX, ALLOW_TRANSPORT_VSOCK,
};
use nbd_client::{Errno, Fault, TlsMode};

fn ok(s: &str) -> NbdUri {
    match uri::parse(s) {
        Ok(u) => u,
        Err(e) => panic!("{s:?} should parse, got: {e}"),
    }
}

/// Asserts that `s` is refused with EINVAL and a message containing `needle`.
fn bad(s: &str, needle: &str) {
    match uri::parse(s) {
        Ok(u) => panic!("{s:?} should be refused, parsed as {u:?}"),
        Err(e) => {
            assert_eq!(e.errno(), Errno::EINVAL, "{s:?}: {e}");
            assert_eq!(e.fault(), Fault::Usage, "{s:?}: {e}");
            assert!(
                e.message().contains(needle),
                "{s:?}: message {:?} lacks {needle:?}",
                e.message()
            );
        }
    }
}

fn tcp(host: &str, port: u16) -> UriTransport {
    UriTransport::Tcp {
        host: host.into(),
        port,
    }
}

fn plain(transport: UriTransport, export: &str) -> NbdUri {
    NbdUri {
        tls: false,
        transport,
        export_name: export.into(),
        tls_username: None,
        tls_certificates: None,
        tls_psk_file: None,
        tls_hostname: None,
        tls_verify_peer: None,
        unknown_params: vec![],
    }
}

// ------------------------------------------------------------------------------------------
// Schemes

#[test]
fn tcp_defaults() {
    assert_eq!(
        ok("nbd://example.com"),
        plain(tcp("example.com", 10809), "")
    );
    let u = ok("nbds://example.com:1234/disk");
    assert!(u.tls);
    assert_eq!(u.transport, tcp("example.com", 1234));
    assert_eq!(u.export_name, "disk");
    assert_eq!(u.scheme(), "nbds");
}

#[test]
fn tcp_missing_host_is_localhost_and_empty_port_is_default() {
    assert_eq!(ok("nbd:///x").transport, tcp("localhost", 10809));
    assert_eq!(ok("nbd://:1/").transport, tcp("localhost", 1));
    assert_eq!(ok("nbd://h:/").transport, tcp("h", 10809));
    assert_eq!(ok("nbd://192.0.2.1:99").transport, tcp("192.0.2.1", 99));
    assert_eq!(
        ok("nbd://Local%41host/").transport,
        tcp("LocalAhost", 10809)
    );
}

#[test]
fn scheme_is_case_insensitive() {
    assert_eq!(ok("NBD://h/e"), ok("nbd://h/e"));
    let u = ok("Nbds+UNIX:///e?socket=/s");
    assert!(u.tls);
    assert_eq!(u.scheme(), "nbds+unix");
    assert_eq!(
        ok("nBd+VsOcK://3").transport,
        UriTransport::Vsock {
            cid: 3,
            port: 10809
        }
    );
}

#[test]
fn unknown_and_missing_schemes() {
    bad("http://example.com/", "unknown URI scheme 'http'");
    bad("nbd+sftp://host/", "unknown URI scheme 'nbd+sftp'");
    bad("nbd+ssh:host", "must begin with 'nbd+ssh://'");
    bad("C:\\images\\disk.img", "unknown URI scheme 'C'");
    bad("", "the URI is empty");
    bad("nbd", "has no scheme");
    bad("/tmp/socket", "nbd+unix:///?socket=PATH");
    bad("localhost:10809", "use nbd://localhost:10809");
    bad("localhost", "nbd://localhost:PORT");
    bad(
        "server.example:10809",
        "to connect to TCP port 10809 on server.example use",
    );
    bad("disk.img", "has no scheme");
    bad("-nbd://h", "has no scheme");
    bad("nbd:", "must begin with 'nbd://'");
    bad("nbd:/x", "must begin with 'nbd://'");
    bad("nbds+unix:x?socket=/s", "must begin with 'nbds+unix://'");
}

// ------------------------------------------------------------------------------------------
// Export names (the table of the NBD URI standard, and more)

#[test]
fn export_names() {
    for (text, export) in [
        ("nbd://example.com/disk", "disk"),
        ("nbd+unix:///disk?socket=sock", "disk"),
        ("nbd://example.com/", ""),
        ("nbd://example.com", ""),
        ("nbd://example.com//disk", "/disk"),
        ("nbd://example.com/hello%20world", "hello world"),
        ("nbd://h/a/b/c", "a/b/c"),
        ("nbd://h/%3F%23%25%26", "?#%&"),
        ("nbd://h/caf%C3%A9", "café"),
        ("nbd://h/café", "café"),
        ("nbd://h/日本", "日本"),
        ("nbd://h/a:b@c!$&'()*+,;=", "a:b@c!$&'()*+,;="),
        ("nbd://h?x=1", ""),
        ("nbd://h#frag", ""),
        ("nbd://h/x#frag", "x"),
        ("nbd://h/x?#", "x"),
    ] {
        assert_eq!(ok(text).export_name, export, "{text}");
    }
}

#[test]
fn export_names_must_be_utf8_without_nul() {
    bad("nbd://h/%ff", "export name in the URI is not valid UTF-8");
    bad("nbd://h/%C3", "not valid UTF-8");
    bad("nbd://h/a%00b", "NUL");
}

#[test]
fn percent_encoding_errors() {
    bad("nbd://h/%", "invalid percent-encoding at byte 8");
    bad("nbd://h/%4", "invalid percent-encoding");
    bad("nbd://h/%zz", "got '%zz'");
    bad("nbd://h/%é", "invalid percent-encoding");
    bad("nbd://h/x?socket=%", "invalid percent-encoding");
    bad("nbd://%/", "invalid percent-encoding");
    bad("nbd://u%@h/", "invalid percent-encoding");
    bad("nbd://h/#%", "invalid percent-encoding");
}

#[test]
fn characters_that_must_be_encoded() {
    for c in [
        ' ', '"', '<', '>', '\\', '^', '`', '{', '|', '}', '\u{1}', '\u{7f}', '[', ']',
    ] {
        bad(&format!("nbd://h/a{c}b"), "must be percent-encoded");
        bad(&format!("nbd://h/?a{c}b"), "must be percent-encoded");
        bad(&format!("nbd://h/#a{c}b"), "must be percent-encoded");
    }
    bad(
        "nbd://a b/",
        "host in the URI has a character that must be percent-encoded: ' '",
    );
    bad("nbd://h/a b", "at byte 9 (write it as %20)");
    bad("nbd://a[b/", "brackets may only surround an IPv6 address");
}

// ------------------------------------------------------------------------------------------
// Hosts and ports

#[test]
fn ipv6_literals() {
    assert_eq!(ok("nbd://[::1]:10810/x").transport, tcp("::1", 10810));
    assert_eq!(ok("nbd://[::1]").transport, tcp("::1", 10809));
    assert_eq!(ok("nbd://[::1]:/").transport, tcp("::1", 10809));
    assert_eq!(
        ok("nbd://[2001:db8::7]/").transport,
        tcp("2001:db8::7", 10809)
    );
    assert_eq!(
        ok("nbd://[::ffff:192.0.2.1]/").transport,
        tcp("::ffff:192.0.2.1", 10809)
    );
    assert_eq!(
        ok("nbd://[fe80::1%25eth0]:9/").transport,
        tcp("fe80::1%eth0", 9)
    );
    assert_eq!(
        ok("nbd://[fe80::1%25en%30]/").transport,
        tcp("fe80::1%en0", 10809)
    );
    bad("nbd://[::1/", "has no closing ']'");
    bad("nbd://[::g]/", "not a valid IPv6 address");
    bad("nbd://[192.0.2.1]/", "not a valid IPv6 address");
    bad("nbd://[]/", "not a valid IPv6 address");
    bad("nbd://[fe80::1%eth0]/", "must be written after %25");
    bad("nbd://[fe80::1%25]/", "zone");
    bad("nbd://[fe80::1%25a:b]/", "zone");
    bad("nbd://[v1.fe]/", "IPvFuture");
    bad("nbd://[::1]x/", "unexpected 'x' after the IPv6 address");
    bad("nbd://[::1]:x/", "port 'x' is not a number");
    bad("nbd://::1/", "is not a number");
}

#[test]
fn ports() {
    assert_eq!(ok("nbd://h:1").transport, tcp("h", 1));
    assert_eq!(ok("nbd://h:65535").transport, tcp("h", 65535));
    assert_eq!(ok("nbd://h:00080").transport, tcp("h", 80));
    bad("nbd://h:0/", "port 0 is out of range (1 to 65535)");
    bad("nbd://h:65536/", "port 65536 is out of range");
    bad("nbd://h:70000/", "port 70000 is out of range");
    bad("nbd://h:99999999999999999999999999/", "out of range");
    bad("nbd://h:abc/", "port 'abc' is not a number");
    bad("nbd://h:-1/", "not a number");
    bad("nbd://h:1:2/", "port '1:2' is not a number");
    bad("nbd://h: 1/", "not a number");
}

// ------------------------------------------------------------------------------------------
// User names

#[test]
fn user_names() {
    assert_eq!(ok("nbds://alice@h/").tls_username.as_deref(), Some("alice"));
    assert_eq!(ok("nbd://u%40x@h/").tls_username.as_deref(), Some("u@x"));
    assert_eq!(ok("nbd://%C3%A9@h/").tls_username.as_deref(), Some("é"));
    assert_eq!(ok("nbd://@h/").tls_username, None);
    assert_eq!(ok("nbd://h/").tls_username, None);
    // The user name is taken on plain schemes too, as libnbd takes it.
    assert_eq!(ok("nbd+vsock://bob@/").tls_username.as_deref(), Some("bob"));
    bad("nbd://alice:secret@h/", "password");
    bad("nbd://a@b@h/", "must be written %40");
    bad("nbd://%ff@h/", "user name in the URI is not valid UTF-8");
    bad("nbd://a b@h/", "user name in the URI has a character");
}

// ------------------------------------------------------------------------------------------
// Unix sockets

#[test]
fn unix_sockets() {
    assert_eq!(
        ok("nbd+unix:///foo?socket=/tmp/nbd.sock"),
        plain(
            UriTransport::Unix {
                socket: "/tmp/nbd.sock".into()
            },
            "foo"
        )
    );
    let u = ok("nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs");
    assert!(u.tls);
    assert_eq!(
        u.transport,
        UriTransport::Unix {
            socket: "/tmp/nbd.sock".into()
        }
    );
    assert_eq!(u.tls_username.as_deref(), Some("alice"));
    assert_eq!(u.tls_certificates.as_deref(), Some("certs"));
    assert_eq!(u.export_name, "");
    assert_eq!(
        ok("nbd+unix://?socket=rel%20ative").transport,
        UriTransport::Unix {
            socket: "rel ative".into()
        }
    );
    assert_eq!(
        ok("nbd+unix:///?socket=/a%26b%3Dc").transport,
        UriTransport::Unix {
            socket: "/a&b=c".into()
        }
    );
    // As libnbd: the last socket= wins.
    assert_eq!(
        ok("nbd+unix:///?socket=/a&socket=/b").transport,
        UriTransport::Unix {
            socket: "/b".into()
        }
    );
    bad(
        "nbd+unix:///x",
        "nbd+unix URI needs a socket= query parameter",
    );
    bad(
        "nbds+unix:///x?sock=/s",
        "nbds+unix URI needs a socket= query parameter",
    );
    bad(
        "nbd+unix:///x?socket=",
        "socket= query parameter of the URI is empty",
    );
    bad("nbd+unix:///x?socket", "is empty");
    bad(
        "nbd+unix://host/x?socket=/s",
        "name no host or port (got 'host')",
    );
    bad("nbd+unix://:10809/x?socket=/s", "name no host or port");
    bad("nbd+unix://[::1]/x?socket=/s", "name no host or port");
    bad("nbd+unix:///?socket=%00abstract", "abstract-namespace");
    bad("nbd+unix:///?socket=/a%00b", "NUL");
    bad(
        "nbd+unix:///?socket=%ff",
        "value of query parameter socket in the URI is not valid UTF-8",
    );
}

#[test]
fn socket_is_refused_on_other_transports() {
    bad(
        "nbd://h/x?socket=/s",
        "did you mean nbd+unix:///export?socket=...?",
    );
    bad("nbds://h/x?socket=/s", "did you mean nbds+unix:///");
    bad(
        "nbd+vsock:///?socket=/s",
        "only for Unix-socket URIs, not nbd+vsock:",
    );
    bad("nbd://h/x?socket", "only for Unix-socket URIs");
}

// ------------------------------------------------------------------------------------------
// Vsock

#[test]
fn vsock() {
    assert_eq!(
        ok("nbd+vsock:///"),
        plain(
            UriTransport::Vsock {
                cid: 2,
                port: 10809
            },
            ""
        )
    );
    assert_eq!(
        ok("nbd+vsock://"),
        plain(
            UriTransport::Vsock {
                cid: 2,
                port: 10809
            },
            ""
        )
    );
    let u = ok("nbds+vsock://3:1234/e");
    assert!(u.tls);
    assert_eq!(u.transport, UriTransport::Vsock { cid: 3, port: 1234 });
    assert_eq!(u.export_name, "e");
    assert_eq!(
        ok("nbd+vsock://:5/").transport,
        UriTransport::Vsock { cid: 2, port: 5 }
    );
    assert_eq!(
        ok("nbd+vsock://4294967295:4294967295").transport,
        UriTransport::Vsock {
            cid: u32::MAX,
            port: u32::MAX
        }
    );
    assert_eq!(
        ok("nbd+vsock://0:0").transport,
        UriTransport::Vsock { cid: 0, port: 0 }
    );
    assert_eq!(
        ok("nbd+vsock://%34/").transport,
        UriTransport::Vsock {
            cid: 4,
            port: 10809
        }
    );
    bad("nbd+vsock://abc/", "vsock CID 'abc' is not a number");
    bad("nbd+vsock://2abc/", "vsock CID '2abc' is not a number");
    bad(
        "nbd+vsock://4294967296/",
        "vsock CID 4294967296 is out of range (0 to 4294967295)",
    );
    bad(
        "nbd+vsock://2:4294967296/",
        "vsock port 4294967296 is out of range",
    );
    bad("nbd+vsock://2:x/", "vsock port 'x' is not a number");
    bad("nbd+vsock://[::1]/", "numeric CID");
}

// ------------------------------------------------------------------------------------------
// Query parameters

#[test]
fn tls_parameters() {
    let u = ok(
        "nbds://h/e?tls-certificates=/etc/pki/x&tls-psk-file=/k%20s.psk\
                &tls-hostname=server.example&tls-verify-peer=false",
    );
    assert_eq!(u.tls_certificates.as_deref(), Some("/etc/pki/x"));
    assert_eq!(u.tls_psk_file.as_deref(), Some("/k s.psk"));
    assert_eq!(u.tls_hostname.as_deref(), Some("server.example"));
    assert_eq!(u.tls_verify_peer, Some(false));
    assert!(u.unknown_params.is_empty());

    // Absent parameters stay unset.
    let u = ok("nbds://h/e");
    assert_eq!(
        (
            u.tls_certificates,
            u.tls_psk_file,
            u.tls_hostname,
            u.tls_verify_peer
        ),
        (None, None, None, None)
    );

    // As libnbd, TLS parameters are taken on plain schemes too.
    let u = ok("nbd://h/?tls-hostname=x&tls-psk-file=/p");
    assert!(!u.tls);
    assert_eq!(u.tls_hostname.as_deref(), Some("x"));
    assert_eq!(u.tls_psk_file.as_deref(), Some("/p"));

    // The last value wins; an empty value is a value.
    assert_eq!(
        ok("nbds://h/?tls-hostname=a&tls-hostname=b")
            .tls_hostname
            .as_deref(),
        Some("b")
    );
    assert_eq!(
        ok("nbds://h/?tls-hostname=").tls_hostname.as_deref(),
        Some("")
    );
}

#[test]
fn tls_verify_peer_booleans() {
    // libnbd's parse_bool: "1"/"0" exactly, the words in any case, one-letter forms too.
    for (word, value) in [
        ("1", true),
        ("true", true),
        ("TRUE", true),
        ("t", true),
        ("yes", true),
        ("Y", true),
        ("On", true),
        ("0", false),
        ("false", false),
        ("False", false),
        ("F", false),
        ("no", false),
        ("n", false),
        ("OFF", false),
    ] {
        let text = format!("nbds://h/?tls-verify-peer={word}");
        assert_eq!(ok(&text).tls_verify_peer, Some(value), "{text}");
    }
    assert_eq!(
        ok("nbds://h/?tls-verify-peer=%66alse").tls_verify_peer,
        Some(false)
    );
    bad(
        "nbds://h/?tls-verify-peer=maybe",
        "could not parse tls-verify-peer parameter, expecting tls-verify-peer=true|false",
    );
    // A bare name has the value "", which is neither (libnbd refuses it the same way).
    bad("nbds://h/?tls-verify-peer", "could not parse tls-verify-peer");
    bad("nbds://h/?tls-verify-peer=", "could not parse tls-verify-peer");
    bad("nbds://h/?tls-verify-peer=2", "could not parse");
    bad("nbds://h/?tls-verify-peer=yess", "could not parse");
    bad("nbds://h/?tls-verify-peer=%ff", "not valid UTF-8");
}

#[test]
fn query_syntax_as_libnbd() {
    // '&' and ';' both separate; empty pieces and "=value" pieces are skipped; a bare name
    // has the value "".
    let u = ok("nbd+unix:///?&&socket=/s;x-a=1&=ignored&x-b&x-c=&%78-d=%20");
    assert_eq!(
        u.transport,
        UriTransport::Unix {
            socket: "/s".into()
        }
    );
    let unknown: Vec<(&str, &str)> = u
        .unknown_params
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        unknown,
        [("x-a", "1"), ("x-b", ""), ("x-c", ""), ("x-d", " ")]
    );
    // A value may hold '=', '?', '/', ':' and '@'.
    let u = ok("nbd://h/?x=a=b?c/d:e@f");
    assert_eq!(
        u.unknown_params,
        [("x".to_string(), "a=b?c/d:e@f".to_string())]
    );
    // Unknown parameters change nothing else.
    let u = ok("nbd://h/e?tls=on&foo=bar");
    assert_eq!(u.transport, tcp("h", 10809));
    assert_eq!(u.tls_hostname, None);
    bad(
        "nbd://h/?%ff=1",
        "name of a query parameter in the URI is not valid UTF-8",
    );
    bad("nbd://h/?a%00=1", "NUL");
}

// ------------------------------------------------------------------------------------------
// Policy

#[test]
fn policy_defaults_are_libnbds() {
    let p = UriPolicy::default();
    assert_eq!(p.allow_transports, ALLOW_TRANSPORT_MASK);
    assert_eq!(p.allow_tls, TlsMode::Allow);
    assert!(!p.allow_local_file);
    for text in [
        "nbd://h/",
        "nbds://h/",
        "nbd+unix:///?socket=/s",
        "nbds+unix:///?socket=/s",
        "nbd+vsock:///",
        "nbds+vsock:///",
        "nbds://h/?tls-hostname=x&tls-verify-peer=0",
        "nbds://alice@h/",
    ] {
        p.check(&ok(text)).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

fn denied(policy: &UriPolicy, text: &str, needle: &str) {
    let e = policy.check(&ok(text)).expect_err(text);
    assert_eq!(e.errno(), Errno::EPERM, "{text}: {e}");
    assert_eq!(e.fault(), Fault::Usage);
    assert!(
        e.message().contains(needle),
        "{text}: {:?} lacks {needle:?}",
        e.message()
    );
}

#[test]
fn policy_local_files() {
    let p = UriPolicy::default();
    denied(
        &p,
        "nbds://h/?tls-psk-file=/k",
        "URI parameter tls-psk-file is not allowed: uriAllowLocalFile is off",
    );
    denied(
        &p,
        "nbds://h/?tls-certificates=/d",
        "URI parameter tls-certificates is not allowed",
    );
    // Refused on plain schemes too: the parameter is still handed to the handle.
    denied(&p, "nbd://h/?tls-psk-file=/k", "tls-psk-file");
    let open = UriPolicy {
        allow_local_file: true,
        ..p
    };
    open.check(&ok("nbds://h/?tls-psk-file=/k&tls-certificates=/d"))
        .unwrap();
}

#[test]
fn policy_transports() {
    let cases = [
        ("nbd://h/", ALLOW_TRANSPORT_TCP, "TCP"),
        ("nbds+unix:///?socket=/s", ALLOW_TRANSPORT_UNIX, "UNIX"),
        ("nbd+vsock:///", ALLOW_TRANSPORT_VSOCK, "VSOCK"),
        ("nbd+ssh://h/", ALLOW_TRANSPORT_SSH, "SSH"),
    ];
    assert_eq!(ALLOW_TRANSPORT_MASK, 0xf, "libnbd's mask");
    for (text, bit, name) in cases {
        let only = UriPolicy {
            allow_transports: bit,
            ..UriPolicy::default()
        };
        only.check(&ok(text)).unwrap();
        let without = UriPolicy {
            allow_transports: ALLOW_TRANSPORT_MASK & !bit,
            ..only
        };
        let scheme = ok(text).scheme();
        denied(
            &without,
            text,
            &format!("URI transport {scheme} is not permitted: uriAllowTransports does not include {name}"),
        );
        for (other, other_bit, _) in cases {
            if other_bit != bit {
                assert!(only.check(&ok(other)).is_err(), "{other} with only {name}");
            }
        }
    }
    let none = UriPolicy {
        allow_transports: 0,
        ..UriPolicy::default()
    };
    denied(&none, "nbd://h/", "not permitted");
}

#[test]
fn policy_tls() {
    let disable = UriPolicy {
        allow_tls: TlsMode::Disable,
        ..UriPolicy::default()
    };
    disable.check(&ok("nbd://h/")).unwrap();
    disable.check(&ok("nbd+unix:///?socket=/s")).unwrap();
    denied(&disable, "nbds://h/", "uriAllowTls is 'disable'");
    denied(&disable, "nbds+unix:///?socket=/s", "use nbd+unix");
    denied(
        &disable,
        "nbds+vsock:///",
        "URI scheme nbds+vsock is not permitted",
    );

    let require = UriPolicy {
        allow_tls: TlsMode::Require,
        ..UriPolicy::default()
    };
    require.check(&ok("nbds://h/")).unwrap();
    require.check(&ok("nbds+vsock:///")).unwrap();
    denied(&require, "nbd://h/", "uriAllowTls is 'require'");
    denied(&require, "nbd+unix:///?socket=/s", "use nbds+unix");
}

#[test]
fn policy_checks_run_in_libnbds_order() {
    // Transport first, then TLS, then local files.
    let strict = UriPolicy {
        allow_transports: ALLOW_TRANSPORT_UNIX,
        allow_tls: TlsMode::Disable,
        allow_local_file: false,
    };
    denied(&strict, "nbds://h/?tls-psk-file=/k", "transport");
    denied(
        &strict,
        "nbds+unix:///?socket=/s&tls-psk-file=/k",
        "uriAllowTls",
    );
    denied(
        &strict,
        "nbd+unix:///?socket=/s&tls-psk-file=/k",
        "uriAllowLocalFile",
    );
}

// ------------------------------------------------------------------------------------------
// is_uri, supports_uri

#[test]
fn is_uri_is_a_scheme_check() {
    assert!(uri::supports_uri());
    for yes in [
        "nbd://h",
        "nbds://h",
        "nbd+unix:///?socket=/s",
        "nbds+unix://",
        "nbd+vsock:///",
        "nbds+vsock://",
        "nbd+ssh://h",
        "NBDS+SSH://h/x",
        "NBD://h",
        "nbd://garbage that parse refuses",
    ] {
        assert!(uri::is_uri(yes), "{yes}");
    }
    // As libnbd: the scheme must be followed by "://".
    for no in [
        "",
        "nbd:",
        "nbds+vsock:",
        "nbd:foo",
        "nbd:/x",
        "nbd:/",
        "nbd",
        "nbds",
        "nbdx://h",
        "nbd+ssh:h",
        "nbd+sshx://h",
        "http://h",
        "/tmp/disk.img",
        "disk.img",
        "localhost:10809",
        " nbd://h",
        "é",
    ] {
        assert!(!uri::is_uri(no), "{no}");
    }
}

fn ssh(host: &str, port: Option<u16>, remote: SshRemote, compress: bool) -> UriTransport {
    UriTransport::Ssh {
        host: host.into(),
        port,
        remote,
        compress,
    }
}

#[test]
fn ssh_uris() {
    let u = ok("nbd+ssh://example.com/disk");
    assert_eq!(u, plain(ssh("example.com", None, SshRemote::Tcp(10809), false), "disk"));
    assert_eq!(u.scheme(), "nbd+ssh");
    let u = ok("nbds+ssh://alice@example.com:2222/?socket=/run/nbd.sock&compress=y");
    assert!(u.tls);
    assert_eq!(u.tls_username.as_deref(), Some("alice"));
    assert_eq!(
        u.transport,
        ssh("example.com", Some(2222), SshRemote::Unix("/run/nbd.sock".into()), true)
    );
    let u = ok("nbd+ssh://[::1]/?nbd-port=10810&compress=no");
    assert_eq!(u.transport, ssh("::1", None, SshRemote::Tcp(10810), false));
    // The parameters are matched in any case, as the others.
    let u = ok("nbd+ssh://h/?NBD-PORT=7&Compress=ON");
    assert_eq!(u.transport, ssh("h", None, SshRemote::Tcp(7), true));

    bad("nbd+ssh:///disk", "need the host");
    bad("nbd+ssh://:22/", "need the host");
    bad("nbd+ssh://-oProxyCommand=evil/", "begins with '-'");
    bad("nbd+ssh://%2DoProxyCommand=evil/", "begins with '-'");
    bad("nbd+ssh://h/?socket=/s&nbd-port=1", "not both");
    bad("nbd+ssh://h/?socket=", "empty");
    bad("nbd+ssh://h/?nbd-port=0", "out of range");
    bad("nbd+ssh://h/?nbd-port=65536", "out of range");
    bad("nbd+ssh://h/?nbd-port=x", "not a number");
    bad("nbd+ssh://h:0/", "out of range");
    bad("nbd+ssh://h/?compress=maybe", "could not parse compress parameter");
    bad("nbd+ssh://h/?compress", "could not parse compress parameter");

    // Elsewhere nbd-port and compress are parameters like any unknown one: ignored, kept.
    let u = ok("nbd://h/?nbd-port=x&compress=maybe");
    assert_eq!(u.transport, tcp("h", 10809));
    assert_eq!(
        u.unknown_params,
        vec![("nbd-port".to_string(), "x".to_string()), ("compress".to_string(), "maybe".to_string())]
    );
}

#[test]
fn ssh_commands() {
    let argv = |s: &str| uri::ssh_argv(&ok(s)).expect("an ssh URI");
    assert_eq!(argv("nbd+ssh://h/"), ["ssh", "--", "h", "nc", "localhost", "10809"]);
    assert_eq!(
        argv("nbd+ssh://bob@h:2200/x?nbd-port=10900&compress=1"),
        ["ssh", "-C", "-p", "2200", "-o", "User=bob", "--", "h", "nc", "localhost", "10900"]
    );
    assert_eq!(
        argv("nbd+ssh://h/?socket=/run/nbd.sock"),
        ["ssh", "--", "h", "nc", "-U", "/run/nbd.sock"]
    );
    // The remote shell sees the socket path as one word, whatever it holds.
    assert_eq!(
        argv("nbd+ssh://h/?socket=/tmp/a%20b%3Brm%20-rf%20~"),
        ["ssh", "--", "h", "nc", "-U", "'/tmp/a b;rm -rf ~'"]
    );
    assert_eq!(
        argv("nbd+ssh://h/?socket=/tmp/it%27s"),
        ["ssh", "--", "h", "nc", "-U", "'/tmp/it'\\''s'"]
    );
    assert_eq!(argv("nbd+ssh://[fe80::1%25eth0]/")[2], "fe80::1%eth0");
    assert!(uri::ssh_argv(&ok("nbd://h/")).is_none());
    // Written back in libnbd's forms: the default remote port and a false compress left out.
    assert_eq!(uri::format(&ok("nbd+ssh://h/?nbd-port=10809&compress=no")), "nbd+ssh://h/");
    assert_eq!(
        uri::format(&ok("NBDS+SSH://u@h:22/e?nbd-port=9&compress=TRUE")),
        "nbds+ssh://u@h:22/e?compress=true&nbd-port=9"
    );
    assert_eq!(
        uri::format(&ok("nbd+ssh://h/?socket=/s")),
        "nbd+ssh://h/?socket=/s"
    );
}

// ------------------------------------------------------------------------------------------
// Formatting

#[test]
fn format_uses_libnbd_forms() {
    let mut u = plain(tcp("example.com", 10809), "disk");
    assert_eq!(uri::format(&u), "nbd://example.com:10809/disk");
    u.tls = true;
    u.tls_username = Some("alice".into());
    assert_eq!(uri::format(&u), "nbds://alice@example.com:10809/disk");

    let u = plain(
        UriTransport::Unix {
            socket: "/tmp/nbd.sock".into(),
        },
        "foo",
    );
    assert_eq!(uri::format(&u), "nbd+unix:///foo?socket=/tmp/nbd.sock");
    let u = plain(
        UriTransport::Unix {
            socket: "/tmp/nbd.sock".into(),
        },
        "",
    );
    assert_eq!(uri::format(&u), "nbd+unix:///?socket=/tmp/nbd.sock");

    let u = plain(
        UriTransport::Vsock {
            cid: 2,
            port: 10809,
        },
        "",
    );
    assert_eq!(uri::format(&u), "nbd+vsock://2:10809/");

    assert_eq!(
        uri::format(&plain(tcp("::1", 10809), "")),
        "nbd://[::1]:10809/"
    );
    assert_eq!(
        uri::format(&plain(tcp("fe80::1%eth0", 1), "")),
        "nbd://[fe80::1%25eth0]:1/"
    );
    // Not an IPv6 address: written as a name, ':' escaped so it cannot read as a port.
    assert_eq!(uri::format(&plain(tcp("a:b", 1), "")), "nbd://a%3Ab:1/");
    assert_eq!(ok("nbd://a%3Ab:1/").transport, tcp("a:b", 1));
}

#[test]
fn format_percent_encodes() {
    let mut u = plain(
        UriTransport::Unix {
            socket: "/run/my sock&x=1#?".into(),
        },
        "a b?c#d%e/f:g@h é",
    );
    u.tls = true;
    u.tls_username = Some("al ice@x:y".into());
    u.tls_certificates = Some("/etc/pki dir".into());
    u.tls_psk_file = Some("/k;s".into());
    u.tls_hostname = Some("host.example".into());
    u.tls_verify_peer = Some(false);
    u.unknown_params = vec![("x-y z".into(), "v&w".into())];
    let text = uri::format(&u);
    assert_eq!(
        text,
        "nbds+unix://al%20ice%40x%3Ay@/a%20b%3Fc%23d%25e/f%3Ag%40h%20%C3%A9\
         ?socket=/run/my%20sock%26x%3D1%23%3F&tls-certificates=/etc/pki%20dir\
         &tls-psk-file=/k%3Bs&tls-hostname=host.example&tls-verify-peer=false&x-y%20z=v%26w"
    );
    assert_eq!(ok(&text), u);
    // Display and FromStr are format and parse.
    assert_eq!(u.to_string(), text);
    assert_eq!(text.parse::<NbdUri>().unwrap(), u);
}

#[test]
fn round_trips_of_parsed_uris() {
    for text in [
        "nbd://example.com",
        "nbds://alice@example.com:1234/disk",
        "nbd://[::1]:10810/x",
        "nbd://[fe80::1%25eth0]/",
        "nbd://h//leading/slash",
        "nbd://h/hello%20world?x-extra=1",
        "nbd+unix:///foo?socket=/tmp/nbd.sock",
        "nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs",
        "nbd+vsock:///",
        "nbds+vsock://3:99/e?tls-verify-peer=no&tls-hostname=h",
        "NBD://H/%E6%97%A5",
        "nbd:///",
        "nbd+ssh://h/",
        "nbds+ssh://bob@[::1]:2222/d?socket=/a%20b&compress=true",
        "nbd+ssh://h/?nbd-port=10809",
        "nbd+ssh://h/?nbd-port=7&compress=off",
    ] {
        let u = ok(text);
        let written = uri::format(&u);
        assert_eq!(ok(&written), u, "{text} -> {written}");
        // Formatting is stable: a second round writes the same text.
        assert_eq!(uri::format(&ok(&written)), written, "{text}");
    }
}

// ------------------------------------------------------------------------------------------
// Robustness

#[test]
fn huge_inputs() {
    let export = "é".repeat(300_000);
    let u = plain(tcp("h", 1), &export);
    let text = uri::format(&u);
    assert_eq!(ok(&text), u);

    // Messages stay short however long the input.
    let e = uri::parse(&"x".repeat(1 << 20)).unwrap_err();
    assert!(e.message().len() < 400, "{} bytes", e.message().len());
    let e = uri::parse(&format!("{}://h", "a".repeat(1 << 20))).unwrap_err();
    assert!(e.message().len() < 400, "{} bytes", e.message().len());
    let e = uri::parse(&format!("nbd://h:{}", "9".repeat(1 << 20))).unwrap_err();
    assert!(e.message().len() < 400, "{} bytes", e.message().len());
    let e = uri::parse(&format!("nbd+unix://{}/?socket=/s", "h".repeat(1 << 20))).unwrap_err();
    assert!(e.message().len() < 400, "{} bytes", e.message().len());
    let e = uri::parse(&format!(
        "nbds://h/?tls-verify-peer={}",
        "y".repeat(1 << 20)
    ))
    .unwrap_err();
    assert!(e.message().len() < 400, "{} bytes", e.message().len());
}

/// xorshift64*: small, deterministic, good enough to shuffle test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn string(&mut self, pieces: &[&str], max: usize) -> String {
        let n = self.below(max + 1);
        (0..n).map(|_| *self.pick(pieces)).collect()
    }
}

/// Bits of URI syntax and awkward characters to build and mutate URIs from.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "0",
    "9",
    "-",
    ".",
    "_",
    "~",
    "%",
    "%2",
    "%25",
    "%00",
    "%ff",
    "%C3%A9",
    "%zz",
    ":",
    "/",
    "//",
    "?",
    "#",
    "[",
    "]",
    "@",
    "&",
    ";",
    "=",
    "+",
    "!",
    "$",
    "'",
    "(",
    "*",
    ",",
    " ",
    "\"",
    "<",
    "\\",
    "^",
    "`",
    "{",
    "|",
    "\u{0}",
    "\u{1}",
    "\u{7f}",
    "é",
    "日",
    "\u{1F600}",
    "nbd",
    "nbds",
    "+unix",
    "+vsock",
    "socket=",
    "tls-verify-peer=",
    "tls-psk-file=",
    "::1",
    "65535",
    "65536",
    "4294967296",
    "localhost",
];

const SEEDS: &[&str] = &[
    "nbd://example.com:10809/disk",
    "nbds://alice@[fe80::1%25eth0]:1/e?tls-hostname=h&tls-verify-peer=0",
    "nbd+unix:///foo?socket=/tmp/nbd.sock",
    "nbds+unix://bob@/?socket=/s&tls-certificates=c&tls-psk-file=p",
    "nbd+vsock://3:99/x#frag",
    "nbds+vsock:///?x-y=z;w",
    "nbd://h/a%20b?x",
];

#[test]
fn random_mutations_never_panic_and_accepted_uris_round_trip() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let policies = [
        UriPolicy::default(),
        UriPolicy {
            allow_local_file: true,
            ..UriPolicy::default()
        },
        UriPolicy {
            allow_transports: ALLOW_TRANSPORT_TCP,
            allow_tls: TlsMode::Require,
            allow_local_file: false,
        },
    ];
    let mut accepted = 0;
    for _ in 0..30_000 {
        let mut chars: Vec<char> = rng.pick(SEEDS).chars().collect();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(chars.len() + 1);
            match rng.below(3) {
                0 => {
                    let piece: Vec<char> = rng.pick(PIECES).chars().collect();
                    chars.splice(at..at, piece);
                }
                1 => {
                    let end = (at + 1 + rng.below(4)).min(chars.len());
                    chars.drain(at.min(end)..end);
                }
                _ => {
                    if at < chars.len() {
                        chars[at] = rng.pick(PIECES).chars().next().unwrap_or('x');
                    }
                }
            }
        }
        let text: String = chars.into_iter().collect();
        let _ = uri::is_uri(&text);
        match uri::parse(&text) {
            Ok(u) => {
                accepted += 1;
                let written = uri::format(&u);
                assert_eq!(
                    uri::parse(&written).as_ref(),
                    Ok(&u),
                    "{text:?} -> {written:?}"
                );
                for p in &policies {
                    let _ = p.check(&u);
                }
            }
            Err(e) => {
                assert_eq!(e.errno(), Errno::EINVAL, "{text:?}: {e}");
                assert!(!e.message().is_empty());
            }
        }
    }
    // The mutations are mild enough that a fair share still parses, so the round-trip
    // assertion above is really exercised.
    assert!(accepted > 3_000, "only {accepted} mutated URIs parsed");
}

#[test]
fn random_values_round_trip_through_format() {
    const TEXT: &[&str] = &[
        "a",
        "B",
        "7",
        "-",
        ".",
        "_",
        "~",
        " ",
        "/",
        "?",
        "#",
        "%",
        "&",
        ";",
        "=",
        "+",
        ":",
        "@",
        "[",
        "]",
        "\"",
        "\\",
        "é",
        "日",
        "\u{1F600}",
        "\u{1}",
        "%41",
    ];
    let mut rng = Rng(42);
    for _ in 0..5_000 {
        let nonempty = |rng: &mut Rng| loop {
            let s = rng.string(TEXT, 12);
            if !s.is_empty() {
                break s;
            }
        };
        let transport = match rng.below(4) {
            0 => UriTransport::Tcp {
                host: nonempty(&mut rng),
                port: 1 + rng.below(65535) as u16,
            },
            1 => UriTransport::Tcp {
                host: rng
                    .pick(&["::1", "2001:db8::1", "fe80::1%eth0", "fe80::1%a%b"])
                    .to_string(),
                port: 10809,
            },
            2 => UriTransport::Unix {
                socket: nonempty(&mut rng),
            },
            _ => UriTransport::Vsock {
                cid: rng.next() as u32,
                port: rng.next() as u32,
            },
        };
        let maybe = |rng: &mut Rng| (rng.below(2) == 0).then(|| rng.string(TEXT, 8));
        let mut u = plain(transport, &rng.string(TEXT, 16));
        u.tls = rng.below(2) == 0;
        u.tls_username = Some(rng.string(TEXT, 6)).filter(|s| !s.is_empty());
        u.tls_certificates = maybe(&mut rng);
        u.tls_psk_file = maybe(&mut rng);
        u.tls_hostname = maybe(&mut rng);
        u.tls_verify_peer = [None, Some(true), Some(false)][rng.below(3)];
        for _ in 0..rng.below(3) {
            let name = format!("x-{}", rng.string(TEXT, 4));
            u.unknown_params.push((name, rng.string(TEXT, 6)));
        }
        let text = uri::format(&u);
        assert!(uri::is_uri(&text), "{text}");
        assert_eq!(uri::parse(&text).as_ref(), Ok(&u), "{text}");
        UriPolicy {
            allow_local_file: true,
            ..UriPolicy::default()
        }
        .check(&u)
        .unwrap();
    }
}

#[test]
fn query_parameter_names_are_case_insensitive() {
    // libnbd compares query keys without regard to case.
    let u = ok("NBD+UNIX:///?SOCKET=/tmp/s");
    assert_eq!(u.transport, UriTransport::Unix { socket: "/tmp/s".into() });
    let u = ok("nbds://h/?Tls-Verify-Peer=false&TLS-HOSTNAME=x&Tls-Psk-File=/k");
    assert_eq!(u.tls_verify_peer, Some(false));
    assert_eq!(u.tls_hostname.as_deref(), Some("x"));
    assert_eq!(u.tls_psk_file.as_deref(), Some("/k"));
    bad("nbd://h/?Socket=/s", "socket");
}
