//! Fuzzes the target's host PDU framing: the first byte picks the connection state
//! (negotiated or not, header/data digests), the rest is a byte stream cut into PDUs
//! exactly as a connection would, until it needs more bytes or hits a fatal error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmf::framing::{FrameCtx, HostPdu, next_host_pdu};
use nvmf::pdu::Digests;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, mut stream)) = input.split_first() else {
        return;
    };
    let mut ctx = FrameCtx {
        negotiated: mode & 1 != 0,
        digests: Digests {
            header: mode & 2 != 0,
            data: mode & 4 != 0,
        },
        max_pdu: 16384 + 80,
        max_h2c_data: 8192,
    };
    while let Ok(Some((pdu, len))) = next_host_pdu(stream, &ctx) {
        assert!(len >= 8 && len <= stream.len());
        match pdu {
            HostPdu::IcReq(req) => {
                ctx.negotiated = true;
                ctx.digests = Digests {
                    header: req.hdgst,
                    data: req.ddgst,
                };
            }
            HostPdu::Capsule { sqe, data, .. } => {
                let _ = (sqe.direction(), sqe.sgl_len(), data.map(<[u8]>::len));
            }
            HostPdu::H2CData { header, data, .. } => {
                assert_eq!(header.length as usize, data.len());
                assert!(data.len() <= ctx.max_h2c_data as usize);
            }
            HostPdu::TermReq => break,
        }
        stream = &stream[len..];
    }
});
