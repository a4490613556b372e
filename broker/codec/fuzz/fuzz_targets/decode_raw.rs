//! Raw bytes into the decoder, as 3.1, 3.1.1 and 5.0; what decodes must
//! survive an encode → decode round trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cirrus_codec::fuzzing::decode_raw(data);
});
