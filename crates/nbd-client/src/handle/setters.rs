//! The setters: one method per `nbd_set_*` call, each checking its own row of the state
//! table and its own argument before it changes the [`Settings`](crate::Settings).

use std::sync::atomic::Ordering;
use std::time::Duration;

use nbd_proto::consts::{FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, STRICT_MASK};
use nbd_proto::handshake::TlsMode;
use nbd_proto::state::{self, Call};
use nbd_proto::{Errno, Error, Result};

use super::{check_bits, check_string, Handle, Phase};
use crate::settings::{NegotiationSettings, Settings};
use crate::transport::subprocess;
use crate::uri::ALLOW_TRANSPORT_MASK;

impl Handle {
    /// Changes settings that shape the connection: only on a newly created handle.
    pub fn configure(&self, change: impl FnOnce(&mut Settings)) -> Result<()> {
        state::ensure_allowed(Call::Configure, self.state())?;
        self.update_settings(change);
        Ok(())
    }

    /// Changes what the handshake asks for where option mode may change it between
    /// requests (export name, meta contexts, info requests): before connecting or while
    /// negotiating. While negotiating, the handshake takes the new settings whole; another
    /// export name forgets what was learned about the previous export.
    pub fn negotiation_setting(&self, change: impl FnOnce(&mut NegotiationSettings)) -> Result<()> {
        state::ensure_allowed(Call::SetExportName, self.state())?;
        let mut phase = self.phase();
        self.update_settings(|s| change(&mut s.negotiation));
        if let Phase::Negotiating { negotiation, .. } = &mut *phase {
            let settings = self.settings().handshake();
            negotiation.hs.set_export_name(&settings.export_name);
            *negotiation.hs.config_mut() = settings;
        }
        Ok(())
    }

    /// `nbd_set_export_name`: before connecting, or while negotiating, where another name
    /// forgets what was learned about the previous export (the same name changes nothing).
    pub fn set_export_name(&self, name: &str) -> Result<()> {
        check_string("export name", name)?;
        self.negotiation_setting(|n| n.export_name = name.to_string())
    }

    /// `nbd_add_meta_context`. An empty name is accepted, as libnbd does (the server
    /// judges it).
    pub fn add_meta_context(&self, name: &str) -> Result<()> {
        check_string("meta context name", name)?;
        self.negotiation_setting(|n| n.meta_contexts.push(name.to_string()))
    }

    /// `nbd_clear_meta_contexts`.
    pub fn clear_meta_contexts(&self) -> Result<()> {
        self.negotiation_setting(|n| n.meta_contexts.clear())
    }

    /// `nbd_set_request_block_size`: before connecting or while negotiating.
    pub fn set_request_block_size(&self, on: bool) -> Result<()> {
        self.negotiation_setting(|n| n.request_block_size = on)
    }

    /// `nbd_set_full_info`: before connecting or while negotiating.
    pub fn set_full_info(&self, on: bool) -> Result<()> {
        self.negotiation_setting(|n| n.full_info = on)
    }

    /// `nbd_set_request_meta_context`: before connecting or while negotiating.
    pub fn set_request_meta_context(&self, on: bool) -> Result<()> {
        self.negotiation_setting(|n| n.request_meta_context = on)
    }

    /// `nbd_set_request_structured_replies`: only on a newly created handle.
    pub fn set_request_structured_replies(&self, on: bool) -> Result<()> {
        self.configure(|s| s.negotiation.request_structured_replies = on)
    }

    /// `nbd_set_request_extended_headers`: only on a newly created handle.
    pub fn set_request_extended_headers(&self, on: bool) -> Result<()> {
        self.configure(|s| s.negotiation.request_extended_headers = on)
    }

    /// `nbd_set_opt_mode`: only on a newly created handle.
    pub fn set_opt_mode(&self, on: bool) -> Result<()> {
        self.configure(|s| s.negotiation.opt_mode = on)
    }

    /// `nbd_set_handshake_flags`: `FLAG_C_FIXED_NEWSTYLE` and `FLAG_C_NO_ZEROES` only; only
    /// on a newly created handle.
    pub fn set_handshake_flags(&self, flags: u32) -> Result<()> {
        check_bits(flags, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, || {
            format!("handshake flags {flags:#x} include unknown bits")
        })?;
        self.configure(|s| s.negotiation.handshake_flags = flags)
    }

    /// `nbd_set_tls`: only on a newly created handle.
    pub fn set_tls(&self, mode: TlsMode) -> Result<()> {
        self.configure(|s| s.tls.mode = mode)
    }

    /// `nbd_set_tls_certificates`: only on a newly created handle.
    pub fn set_tls_certificates(&self, dir: &str) -> Result<()> {
        self.configure(|s| s.tls.certificates = Some(dir.into()))
    }

    /// `nbd_set_tls_verify_peer`: only on a newly created handle.
    pub fn set_tls_verify_peer(&self, on: bool) -> Result<()> {
        self.configure(|s| s.tls.verify_peer = on)
    }

    /// `nbd_set_tls_username`: only on a newly created handle.
    pub fn set_tls_username(&self, name: &str) -> Result<()> {
        self.configure(|s| s.tls.username = Some(name.to_string()))
    }

    /// `nbd_set_tls_psk_file`: only on a newly created handle.
    pub fn set_tls_psk_file(&self, path: &str) -> Result<()> {
        self.configure(|s| s.tls.psk_file = Some(path.into()))
    }

    /// `nbd_set_tls_hostname`: only on a newly created handle.
    pub fn set_tls_hostname(&self, host: &str) -> Result<()> {
        self.configure(|s| s.tls.hostname = Some(host.to_string()))
    }

    /// `nbd_set_uri_allow_transports`: `ALLOW_TRANSPORT_*` bits only; only on a newly
    /// created handle.
    pub fn set_uri_allow_transports(&self, mask: u32) -> Result<()> {
        check_bits(mask, ALLOW_TRANSPORT_MASK, || format!("uriAllowTransports {mask:#x} has unknown bits"))?;
        self.configure(|s| s.uri_policy.allow_transports = mask)
    }

    /// `nbd_set_uri_allow_tls`: only on a newly created handle.
    pub fn set_uri_allow_tls(&self, mode: TlsMode) -> Result<()> {
        self.configure(|s| s.uri_policy.allow_tls = mode)
    }

    /// `nbd_set_uri_allow_local_file`: only on a newly created handle.
    pub fn set_uri_allow_local_file(&self, on: bool) -> Result<()> {
        self.configure(|s| s.uri_policy.allow_local_file = on)
    }

    /// The limit on the whole connect and handshake, and in option mode on each option
    /// request (`None`: none): only on a newly created handle.
    pub fn set_connect_timeout(&self, limit: Option<Duration>) -> Result<()> {
        self.configure(|s| s.connect_timeout = limit)
    }

    /// Commands on the wire at once (at least 1): only on a newly created handle.
    pub fn set_max_in_flight(&self, n: usize) -> Result<()> {
        if n == 0 {
            return Err(Error::usage(Errno::EINVAL, "maxInFlight must be at least 1"));
        }
        self.configure(|s| s.max_in_flight = n)
    }

    /// `nbd_set_socket_activation_name`: `LISTEN_FDNAMES` for
    /// `connect_systemd_socket_activation` (empty: `unknown`). At most 255 printable ASCII
    /// characters other than `:`. Only on a newly created handle.
    pub fn set_socket_activation_name(&self, name: &str) -> Result<()> {
        subprocess::check_socket_name(name)?;
        self.configure(|s| s.socket_activation_name = name.to_string())
    }

    /// `nbd_set_strict_mode`: allowed in any state.
    pub fn set_strict_mode(&self, flags: u32) -> Result<()> {
        check_bits(flags, STRICT_MASK, || format!("strict mode flags {flags:#x} include unknown bits"))?;
        self.update_settings(|s| s.strict = flags);
        Ok(())
    }

    /// The strict-mode bits in force (`nbd_get_strict_mode`).
    pub fn strict_mode(&self) -> u32 {
        self.inner.strict.load(Ordering::Relaxed)
    }

    /// `nbd_set_pread_initialize`: allowed in any state.
    pub fn set_pread_initialize(&self, on: bool) {
        self.update_settings(|s| s.pread_initialize = on);
    }

    /// `nbd_set_handle_name`: allowed in any state.
    pub fn set_handle_name(&self, name: &str) {
        self.update_settings(|s| s.handle_name = name.to_string());
    }

    /// `nbd_set_debug`: allowed in any state (takes effect for what follows).
    pub fn set_debug(&self, on: bool) {
        self.update_settings(|s| s.debug = on);
    }
}
