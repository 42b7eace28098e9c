//! The NBD wire format for servers: protocol constants, a sans-IO fixed-newstyle handshake,
//! request decoding and validation, and reply encoding. No IO happens here, so every decoder
//! can be fed arbitrary bytes in tests.

pub mod consts;
pub mod handshake;
pub mod transmission;

pub use handshake::{
    ExportCatalog, ExportInfo, HandshakeError, Negotiated, Outcome, Refusal, ServerHandshake,
};
pub use transmission::{validate, BadRequestMagic, Command, ExportLimits, RequestHeader};

#[cfg(test)]
mod tests;
