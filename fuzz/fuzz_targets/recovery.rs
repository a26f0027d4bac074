//! Recovery of a message log of several segments, with some queues declared,
//! as `Broker::open` runs it (in memory). The input:
//!
//! ```text
//! input := queues:u8 file*          (at most 8 files)
//! file  := id:u64 LE  mode:u8  len:u16 LE  body[len]
//! ```
//!
//! Bit `i` of `queues` declares queue id `i + 1` (the others are deleted
//! queues, whose records are dead). A file is segment `id`; its body is cut
//! short by the end of the input. With bit 0 of `mode` set, the body is the
//! file as it is; otherwise it is record payloads, each `len:u16 LE payload`,
//! written in valid frames after the segment's header (so that they get past
//! the checksums), and the bytes left over that make no whole payload are
//! appended as they are (a torn tail, or damage).

#![no_main]

use libfuzzer_sys::fuzz_target;
use postbox_actors::fuzzing;

const FILE_HEAD: usize = 11;

fuzz_target!(|data: &[u8]| {
    let Some((&mask, mut rest)) = data.split_first() else {
        return;
    };
    let queues: Vec<u64> = (0..8)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| i + 1)
        .collect();
    let mut files: Vec<(u64, Vec<u8>)> = Vec::new();
    while rest.len() >= FILE_HEAD && files.len() < 8 {
        let id = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
        let mode = rest[8];
        let len = usize::from(u16::from_le_bytes([rest[9], rest[10]]));
        let body = &rest[FILE_HEAD..(FILE_HEAD + len).min(rest.len())];
        rest = &rest[FILE_HEAD + body.len()..];
        let bytes = if mode & 1 == 1 {
            body.to_vec()
        } else {
            framed(id, body)
        };
        files.push((id, bytes));
    }
    let files: Vec<(u64, &[u8])> = files.iter().map(|(id, b)| (*id, &b[..])).collect();
    fuzzing::recover_dir(&files, &queues);
});

fn framed(id: u64, mut body: &[u8]) -> Vec<u8> {
    let mut payloads = Vec::new();
    while let [a, b, tail @ ..] = body {
        let n = usize::from(u16::from_le_bytes([*a, *b]));
        if tail.len() < n {
            break;
        }
        payloads.push(&tail[..n]);
        body = &tail[n..];
    }
    let mut file = fuzzing::segment_file(id, &payloads);
    file.extend_from_slice(body);
    file
}
