//! Fuzz target: the bounded chunk, document-header and bloom-filter readers that see a peer's
//! bytes before automerge does. Neither may panic, whatever the input.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let _ = iq_protocol::chunks::changes_in(data, &mut out);
    let _ = iq_protocol::chunks::check_bloom(data);
    let _ = iq_protocol::chunks::check_document(data);
});
