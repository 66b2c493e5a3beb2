#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| damselfly::fuzzing::request_head(data));
