//! One record payload, written in a valid frame of a valid segment and read
//! back like `log_reader`. Mutated bytes of a real file almost never keep
//! their frame's CRC-32C, so `log_reader` rarely reaches the decoders with
//! new records: here every input does. Seeds: the payloads of real records.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postbox_actors::fuzzing;

fuzz_target!(|data: &[u8]| fuzzing::read_segment(&fuzzing::segment_file(1, &[data])));
