//! The topology log, as bytes: the header, the frames (damage skipped, a torn
//! tail cut), then a reopening and a rewrite. Its entries are opaque to the
//! store (the broker decodes them as JSON). Seeds: a real `topology.log`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| postbox_actors::fuzzing::read_meta(data));
