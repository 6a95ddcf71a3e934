//! Fuzz target: the bounded chunk, document-header and bloom-filter readers that see a peer's
//! bytes before automerge does. Neither may panic, whatever the input, and changes that pass
//! hold no more operations than their columns were charged for.

#![no_main]

use iq_protocol::chunks::{self, MAX_DECLARED_VALUES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let mut values_left = MAX_DECLARED_VALUES;
    if chunks::changes_in(data, &mut out, &mut values_left).is_ok() {
        let ops: u64 = out.iter().map(|c| c.len() as u64).sum();
        assert!(ops <= MAX_DECLARED_VALUES - values_left);
    }
    let _ = chunks::check_bloom(data);
    let _ = chunks::check_document(data);
});
