//! Fuzz target: the versioned CBOR envelope of a sync request and response,
//! decoded exactly as libp2p's codec decodes it, and a `/iq/sync/2` request
//! body (plain or deflated, `codec::unframe`) before it. Decoding must not
//! panic, and what decodes must re-encode to something that decodes the
//! same.

#![no_main]

use iq_protocol::codec;
use iq_protocol::wire::{Request, Response};
use libfuzzer_sys::fuzz_target;

fn request(data: &[u8]) {
    if let Ok(request) = cbor4ii::serde::from_slice::<Request>(data) {
        let again = cbor4ii::serde::to_vec(Vec::new(), &request).expect("a decoded request encodes");
        let back: Request = cbor4ii::serde::from_slice(&again).expect("a re-encoded request decodes");
        assert_eq!(back, request);
    }
}

fuzz_target!(|data: &[u8]| {
    request(data);
    if let Ok(plain) = codec::unframe(data) {
        request(&plain);
    }
    let _ = cbor4ii::serde::from_slice::<Response>(data);
});
