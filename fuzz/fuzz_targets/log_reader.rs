//! One segment file of the message log, as bytes: the header, the frames
//! (damage skipped, a torn tail found), the records and their envelopes.
//! Seeds: real segment files (`corpus/log_reader`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| postbox_actors::fuzzing::read_segment(data));
