//! Packets generated from the fuzzer's bytes through encode → decode.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cirrus_codec::fuzzing::roundtrip(data);
});
