//! Fuzz target: a whole sync message from a peer into the engine, the path a
//! network request takes. The engine must refuse or apply, never panic (a
//! panic inside automerge is caught and reported as `Poisoned`, which this
//! target treats as a finding). The message's last `len % 4` records of 72
//! bytes also go as its signatures in the short form (`signed` on the wire).

#![no_main]

use iq_protocol::authorship::{Signer, Writers};
use iq_protocol::engine::{Engine, Signatures, SyncError};
use iq_protocol::wire::PREFIXED_SIGNATURE_LEN;
use iq_protocol::{DocId, QuarterSlug};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(slug) = QuarterSlug::new("prohlis") else { return };
    let writer = Signer::from_secret([2; 32]);
    let mut writers = Writers::new([Signer::from_secret([1; 32]).actor()]);
    writers.set_quarters([(slug.clone(), [writer.actor()].into_iter().collect())].into_iter().collect());
    let mut engine: Engine<u8> = Engine::new(Signer::from_secret([1; 32]), writers, [slug.clone()]);
    let _ = engine.peer_up(7, vec![], 0);
    let records = data.len() % 4;
    let prefixed = &data[data.len().saturating_sub(records * PREFIXED_SIGNATURE_LEN)..];
    let sigs = Signatures {
        whole: &[],
        prefixed,
    };
    for doc in [DocId::City, DocId::quarter(&slug)] {
        if let Err(SyncError::Poisoned(d)) = engine.receive(&7, &doc, data, sigs, 1) {
            panic!("automerge panicked applying a message to {d}");
        }
    }
});
