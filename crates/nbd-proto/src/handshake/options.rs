//! Option requests: the ones the machine sends by itself (TLS, extended headers, structured
//! replies, meta contexts, GO) and the application's in option mode ([`OptRequest`]).

use crate::consts::*;
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::wire::{put_u16, put_u32, put_u64};

use super::config::TlsMode;
use super::negotiated::{ExportEntry, ExportInfo, Protocol};
use super::steps::{Awaiting, Purpose, Step};
use super::{Handshake, Outcome};

/// An option request in option mode (libnbd's `nbd_opt_*` calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptRequest {
    /// `NBD_OPT_GO` for the configured export (with meta contexts first, as configured).
    Go,
    /// `NBD_OPT_INFO` for the configured export.
    Info,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_LIST_META_CONTEXT` with these queries, or the configured contexts.
    ListMetaContext(Option<Vec<String>>),
    /// `NBD_OPT_SET_META_CONTEXT` with these queries, or the configured contexts.
    SetMetaContext(Option<Vec<String>>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_ABORT`: end the connection politely.
    Abort,
}

/// The answer to an [`OptRequest`] (`Go` answers with [`Outcome::Ready`] instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptReply {
    /// `NBD_OPT_INFO`: the export's details.
    Info(ExportInfo),
    /// `NBD_OPT_LIST`: the exports.
    List(Vec<ExportEntry>),
    /// `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT`: the contexts' names.
    MetaContexts(Vec<String>),
    /// Whether the server agreed (structured replies, extended headers, TLS).
    Agreed(bool),
    /// The server acknowledged `NBD_OPT_ABORT` (or hung up): the connection is over.
    Aborted,
}

impl Handshake {
    /// Starts option request `req` (option mode only, while negotiating).
    pub fn request(&mut self, req: OptRequest) -> Result<()> {
        if !self.is_negotiating() {
            return Err(Error::usage(
                Errno::EINVAL,
                "invalid state: option requests need a connection in option negotiation, \
                 with no other option request in progress",
            ));
        }
        if self.protocol == Some(Protocol::Newstyle) {
            return self.request_plain_newstyle(req);
        }
        match req {
            OptRequest::Go => self.start_go_info(OPT_GO, false)?,
            OptRequest::Info => self.start_go_info(OPT_INFO, false)?,
            OptRequest::List => self.send_option(OPT_LIST, &[], Purpose::list()),
            OptRequest::ListMetaContext(queries) => {
                let data = self.meta_request(queries.as_deref())?;
                self.send_option(OPT_LIST_META_CONTEXT, &data, Purpose::list_meta());
            }
            OptRequest::SetMetaContext(queries) => {
                if !self.settled.structured_replies {
                    self.outcome = Some(Outcome::Reply(Err(Error::usage(
                        Errno::ENOTSUP,
                        "meta contexts need structured replies, which were not negotiated",
                    ))));
                    return Ok(());
                }
                let data = self.meta_request(queries.as_deref())?;
                self.meta = None;
                self.send_option(OPT_SET_META_CONTEXT, &data, Purpose::set_meta(None));
            }
            OptRequest::StructuredReply => self.send_option(
                OPT_STRUCTURED_REPLY,
                &[],
                Purpose::StructuredReply { auto: false },
            ),
            OptRequest::ExtendedHeaders => self.send_option(
                OPT_EXTENDED_HEADERS,
                &[],
                Purpose::ExtendedHeaders { auto: false },
            ),
            OptRequest::StartTls => {
                if self.settled.tls {
                    self.outcome = Some(Outcome::Reply(Ok(OptReply::Agreed(false))));
                    return Ok(());
                }
                self.send_option(OPT_STARTTLS, &[], Purpose::StartTls { auto: false })
            }
            OptRequest::Abort => self.send_option(OPT_ABORT, &[], Purpose::Abort),
        }
        self.run();
        Ok(())
    }

    /// Option mode against a server without fixed newstyle negotiation: `NBD_OPT_EXPORT_NAME`
    /// stands in for GO, ending the connection needs no message (the server knows no
    /// NBD_OPT_ABORT), and every other option is unsupported.
    fn request_plain_newstyle(&mut self, req: OptRequest) -> Result<()> {
        match req {
            OptRequest::Go => self.send_export_name()?,
            OptRequest::Abort => self.aborted(),
            _ => {
                return Err(Error::server(
                    Errno::ENOTSUP,
                    "the server is not using fixed newstyle negotiation: only optGo and \
                     optAbort are possible",
                ))
            }
        }
        self.run();
        Ok(())
    }

    pub(super) fn refuse_without_tls(&self, what: &str) -> Result<()> {
        if self.config.tls == TlsMode::Require {
            return Err(Error::server(
                Errno::ENOTSUP,
                format!("TLS is required (tls mode 'require') but {what} cannot start TLS"),
            ));
        }
        Ok(())
    }

    /// The automatic negotiations after the greeting, then option mode or GO.
    pub(super) fn continue_auto(&mut self) -> Result<()> {
        if self.config.tls != TlsMode::Disable && !self.settled.tried_tls {
            self.settled.tried_tls = true;
            self.send_option(OPT_STARTTLS, &[], Purpose::StartTls { auto: true });
            return Ok(());
        }
        let want_structured = self.config.request_structured_replies;
        if want_structured && self.config.request_extended_headers && !self.settled.tried_extended {
            self.settled.tried_extended = true;
            self.send_option(OPT_EXTENDED_HEADERS, &[], Purpose::ExtendedHeaders { auto: true });
            return Ok(());
        }
        if want_structured && !self.settled.extended_headers && !self.settled.tried_structured {
            self.settled.tried_structured = true;
            self.send_option(OPT_STRUCTURED_REPLY, &[], Purpose::StructuredReply { auto: true });
            return Ok(());
        }
        if self.config.opt_mode {
            self.step = Step::Negotiating;
            self.log(|| "option mode: negotiating".to_string());
            self.outcome = Some(Outcome::Negotiating);
            return Ok(());
        }
        self.start_go_info(OPT_GO, true)
    }

    fn send_option(&mut self, option: u32, data: &[u8], purpose: Purpose) {
        if self.config.debug {
            self.debug.push(format!(
                "sending {} ({} bytes of data)",
                option_name(option),
                data.len()
            ));
        }
        self.put_option(option, data);
        self.step = Step::OptionReply(Awaiting { option, purpose });
    }

    fn put_option(&mut self, option: u32, data: &[u8]) {
        put_u64(&mut self.output, IHAVEOPT);
        put_u32(&mut self.output, option);
        put_u32(&mut self.output, data.len() as u32);
        self.output.extend_from_slice(data);
    }

    fn checked_name(&self) -> Result<Vec<u8>> {
        let name = self.config.export_name.as_bytes();
        if name.len() > MAX_STRING {
            return Err(Error::usage(
                Errno::ENAMETOOLONG,
                format!("export name is {} bytes, longer than {MAX_STRING}", name.len()),
            ));
        }
        Ok(name.to_vec())
    }

    pub(super) fn send_export_name(&mut self) -> Result<()> {
        let name = self.checked_name()?;
        if self.config.debug {
            self.debug.push(format!(
                "sending NBD_OPT_EXPORT_NAME for export {:?}",
                self.config.export_name
            ));
        }
        self.put_option(OPT_EXPORT_NAME, &name);
        self.step = Step::ExportNameReply;
        Ok(())
    }

    /// The data of SET/LIST_META_CONTEXT: the export name and the queries.
    fn meta_request(&self, queries: Option<&[String]>) -> Result<Vec<u8>> {
        let name = self.checked_name()?;
        let queries = queries.unwrap_or(&self.config.meta_contexts);
        let mut data = Vec::new();
        put_u32(&mut data, name.len() as u32);
        data.extend_from_slice(&name);
        put_u32(&mut data, queries.len() as u32);
        for q in queries {
            if q.len() > MAX_STRING {
                return Err(Error::usage(
                    Errno::ENAMETOOLONG,
                    format!("meta context query is {} bytes, longer than {MAX_STRING}", q.len()),
                ));
            }
            put_u32(&mut data, q.len() as u32);
            data.extend_from_slice(q.as_bytes());
        }
        Ok(data)
    }

    /// GO or INFO, after SET_META_CONTEXT when configured.
    fn start_go_info(&mut self, option: u32, auto: bool) -> Result<()> {
        let want_meta = self.config.request_meta_context
            && !self.config.meta_contexts.is_empty()
            && self.settled.structured_replies;
        if want_meta {
            let data = self.meta_request(None)?;
            self.meta = None;
            self.send_option(OPT_SET_META_CONTEXT, &data, Purpose::set_meta(Some(option)));
            return Ok(());
        }
        self.send_go_info(option, auto)
    }

    pub(super) fn send_go_info(&mut self, option: u32, auto: bool) -> Result<()> {
        let name = self.checked_name()?;
        let mut infos = Vec::new();
        if self.config.request_block_size {
            infos.push(INFO_BLOCK_SIZE);
        }
        if self.config.full_info {
            infos.push(INFO_NAME);
            infos.push(INFO_DESCRIPTION);
        }
        let mut data = Vec::with_capacity(4 + name.len() + 2 + 2 * infos.len());
        put_u32(&mut data, name.len() as u32);
        data.extend_from_slice(&name);
        put_u16(&mut data, infos.len() as u16);
        for info in infos {
            put_u16(&mut data, info);
        }
        if self.config.debug {
            self.debug.push(format!(
                "asking about export {:?} with {}",
                self.config.export_name,
                option_name(option)
            ));
        }
        self.send_option(option, &data, Purpose::go_info(option, auto));
        Ok(())
    }
}
